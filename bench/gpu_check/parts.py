"""One function per part of the plan: ``part(ctx) -> dict``.

Each part runs the project's own entry point (pytest, ``bench.kernels.main``,
``bench.dual_masking.main``, ``bench.memory.measure``, ``train.pretrain.main``,
``bench.attention.measure_shape``, torchcodec), full size on the GPU, toy size on the CPU with
``--dry-run``: the same calls either way, so the check cannot rot unseen. A part returns what it
measured and a one-line ``summary``; ``status`` is ``"ok"`` unless it says ``"failed"`` (it ran and
something it checks did not hold) or ``"not run"`` (with the ``reason``, e.g. a package that is
not installed). Raising, or running past its share, is recorded by ``run`` and the rest goes on.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.paths import SOURCE_ROOT
from . import plan

# A fused kernel counts as "near HBM bandwidth" at this share of the measured device copy
# bandwidth (a copy is the fastest anything reads and writes bytes on this device).
NEAR_COPY_BW = 0.70


@dataclass
class Context:
    device: torch.device
    dry_run: bool
    parts_dir: Path  # where the parts' own result files go: <part>.json (every raw number)
    info: dict  # bench.common.device.device_info

    def argv_out(self, part: str) -> list[str]:
        return ["--out", str(self.parts_dir), "--name", part]


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


# ------------------------------------------------------------------------------ CUDA tests
def cuda_tests(ctx: Context, share_s: float) -> dict:
    """``pytest -m 'gpu and not interpret'`` in this checkout, in a subprocess killed a little
    before the share ends (so its output is kept). On a CPU every selected test skips."""
    if SOURCE_ROOT is None or not (SOURCE_ROOT / "tests").is_dir():
        return {"status": "not run", "reason": "no tests/ folder: bench is installed, not a source checkout"}
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the GPU tests run the compiled kernels
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu and not interpret", "-p", "no:cacheprovider",
           "-rfE", "tests"]
    timeout = max(5.0, share_s - 5.0)
    try:
        r = subprocess.run(cmd, cwd=SOURCE_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"status": "failed", "reason": f"pytest killed after {timeout:.0f} s", "command": " ".join(cmd),
                "output_tail": _tail(out), "counts": pytest_counts(out)}
    counts = pytest_counts(r.stdout)
    bad = counts.get("failed", 0) + counts.get("error", 0)
    out = {"command": " ".join(cmd), "returncode": r.returncode, "counts": counts,
           "output_tail": _tail(r.stdout + r.stderr),
           "summary": ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary line"}
    if r.returncode not in (0, 5) or bad:
        out.update(status="failed", reason=f"pytest exit status {r.returncode}: {out['summary']}")
    return out


def pytest_counts(output: str) -> dict[str, int]:
    """``{"passed": 30, "skipped": 4, ...}`` from pytest's last summary line."""
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)", ln)]
    if not lines:
        return {}
    counts = {}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)", lines[-1]):
        counts[word.rstrip("s") if word.startswith("error") or word.startswith("warning") else word] = int(n)
    return counts


# ------------------------------------------------------------------------------ kernels
def kernels(ctx: Context, share_s: float) -> dict:
    """``bench.kernels.main``: every fused op's GB/s against the copy bandwidth it measures and
    the datasheet HBM bandwidth (no ``torch.compile`` rows: they compile for minutes)."""
    from .. import kernels as bk

    k = plan.DRY["kernels"] if ctx.dry_run else plan.KERNELS
    argv = ["--device", str(ctx.device), "--no-compile", "--warmup", str(k["warmup"]), "--repeats", str(k["repeats"])]
    if ctx.dry_run:
        argv += ["--batch", str(k["batch"]), "--arch", "vit_b"]
    res = bk.main(argv + ctx.argv_out("kernels"))
    copy = res["copy_bandwidth"]["gbps"]
    hbm = ctx.info.get("hbm_gbps")
    rows = []
    for r in res["rows"]:
        row = {"setup": r.get("setup"), "op": r["op"], "variant": r["variant"], "ok": bool(r.get("ok")),
               "why": r.get("why"), "gbps": r.get("gbps")}
        if row["gbps"]:
            row["of_copy_bw"] = row["gbps"] / copy
            row["of_hbm_datasheet"] = row["gbps"] / hbm if hbm else None
        rows.append(row)
    fused = [r for r in rows if r["variant"].startswith("fused")]
    ran = [r for r in fused if r["ok"]]
    worst = min((r["of_copy_bw"] for r in ran), default=None)
    return {"copy_gbps": copy, "hbm_datasheet_gbps": hbm, "near_threshold_of_copy_bw": NEAR_COPY_BW,
            "rows": rows, "fused_ran": len(ran), "fused_total": len(fused), "worst_fused_of_copy_bw": worst,
            "file": str(ctx.parts_dir / "kernels.json"),
            "summary": f"copy {copy:.0f} GB/s; {len(ran)}/{len(fused)} fused rows ran"
                       + (f", slowest at {worst:.0%} of copy bandwidth" if worst is not None else "")}


# ------------------------------------------------------------------------------ dual masking
def _dual_masking_argv(ctx: Context, index: int, maskings=None) -> list[str]:
    """The preset ``gpu``'s setup ``index`` alone (so a part that runs out of time keeps the
    other setup's rows), at toy size with ``--smoke`` on a dry run."""
    from ..dual_masking.plan import PRESETS

    setup, preset_maskings = PRESETS["gpu"].setups[index]
    masks = (0.0, 0.5) if ctx.dry_run else (maskings or preset_maskings)
    k = plan.DRY["dual_masking"] if ctx.dry_run else plan.DUAL_MASKING
    argv = ["--preset", "gpu", "--device", str(ctx.device), "--arch", setup.arch,
            "--ckpt", "on" if setup.ckpt else "off", "--warmup", str(k["warmup"]), "--repeats", str(k["repeats"]),
            "--masking", ",".join("enc" if r == 0 else str(r) for r in masks), "--no-plot", "--no-progress",
            "--no-interleave"]  # the GPU's way: one implementation alive at a time
    if ctx.dry_run:
        # toy sizes; the batch search --smoke adds starts and ends at batch 2
        return argv + ["--smoke", "--max-batch-cap", "2"]
    return argv + ["--batch", str(setup.batch), "--frames", str(setup.frames), "--img-size", str(setup.img_size)]


_ROW_KEYS = ("masking", "impl", "status", "error", "clips_per_s", "mfu_datasheet", "hfu_datasheet", "peak_mem_bytes",
             "speedup_dual_vs_enc", "speedup_vs_reference", "mem_vs_reference", "exact_peak_bytes",
             "cuda_max_allocated_bytes", "exact_over_cuda_allocated")


def _dual_masking(ctx: Context, name: str, index: int, maskings=None) -> dict:
    from ..dual_masking import main as dm_main

    res = dm_main(_dual_masking_argv(ctx, index, maskings) + ctx.argv_out(name))
    rows = [{"setup": x["setup"]["label"], **{k: x.get(k) for k in _ROW_KEYS}} for x in res["rows"]]
    errors = [x for x in rows if x["status"] == "error"]
    out = {"rows": rows, "goals": res["goals"], "file": res["files"]["json"],
           "summary": f"{len(rows) - len(errors)}/{len(rows)} cells measured"}
    if errors:
        out.update(status="failed", reason=f"{len(errors)} cell(s) failed: "
                   + "; ".join(f"{x['masking']} {x['impl']}: {(x['error'] or '')[:100]}" for x in errors[:3]))
    return out


def dual_masking_vit_b(ctx: Context, share_s: float) -> dict:
    return _dual_masking(ctx, "dual_masking_vit_b", 0)


def dual_masking_vit_g(ctx: Context, share_s: float) -> dict:
    return _dual_masking(ctx, "dual_masking_vit_g", 1, plan.DUAL_MASKING_VIT_G_MASKINGS)


# ------------------------------------------------------------------------------ exact memory
def memory_count(ctx: Context, share_s: float) -> dict:
    """``bench.memory.measure`` of the goals' step (ViT-B 16x224 b32, dual 0.9/0.5, vmae_fast,
    bf16, no checkpointing): the exact count and, on CUDA, ``max_memory_allocated`` of the same
    step. On a CPU the count is made under CUDA's autocast rules and has no allocator beside it."""
    from ..dual_masking.plan import PRESETS, smoke_setup
    from ..memory import measure

    setup = PRESETS["gpu"].setups[0][0]
    if ctx.dry_run:
        setup = smoke_setup(setup)
    m = measure(setup, "vmae_fast", False, 0.5, dtype=torch.bfloat16, device=ctx.device, flops=False)["step_memory"]
    exact, cuda = m["peak_total"], m["cuda_max_allocated"]
    out = {"setup": setup.label(), "exact_peak_bytes": exact, "cuda_max_allocated_bytes": cuda,
           "cuda_base_allocated_bytes": m["cuda_base_allocated"], "peak_phase": m["peak_phase"], "step_memory": m}
    if cuda is None:
        out["summary"] = f"exact count {exact / 2**20:,.1f} MiB; no allocator to compare on {ctx.device.type}"
        return out
    # What the allocator held before the step that the count does not see (a cuBLAS workspace,
    # another part's leftovers): its base less the tensors the count registered at the start.
    held = sum(m[k] for k in ("parameters", "buffers", "gradients", "optimizer_state", "inputs"))
    untracked = m["cuda_base_allocated"] - held
    out.update(difference_bytes=cuda - exact, untracked_before_step_bytes=untracked,
               difference_in_step_bytes=cuda - untracked - exact)
    out["relative_difference"] = out["difference_in_step_bytes"] / cuda
    out["summary"] = (f"exact {exact / 2**20:,.1f} MiB, max_memory_allocated {cuda / 2**20:,.1f} MiB "
                      f"({(cuda - exact) / cuda:+.2%}; {untracked / 2**20:,.1f} MiB held before the step by "
                      f"no counted tensor; in the step {out['relative_difference']:+.2%})")
    return out


# ------------------------------------------------------------------------------ pretraining
def pretrain(ctx: Context, share_s: float) -> dict:
    """``train.pretrain.main`` for a few bf16 steps on videos ``train.make_synthetic`` writes
    into a temporary folder: the loop, the data pipeline and the checkpoint on this device."""
    from train import pretrain as tp
    from train.make_synthetic import make_dataset

    k = plan.DRY["pretrain"] if ctx.dry_run else plan.PRETRAIN
    with tempfile.TemporaryDirectory(prefix="gpu-check-pretrain-") as tmp:
        root = Path(tmp)
        make_dataset(root / "data", n=k["videos"], frames=k["frames"], height=k["height"], width=k["width"], seed=0)
        run_dir = root / "run"
        if ctx.dry_run:  # the tiny model of tests/test_train_loop.py
            model = ["--model", "vit_small_patch16_224", "--model-overrides",
                     "depth=2,embed_dim=64,num_heads=2,decoder_embed_dim=32,decoder_num_heads=2,patch_size=8",
                     "--decoder-depth", "1", "--num-frames", "4", "--sampling-rate", "2", "--img-size", "32",
                     "--num-workers", "0"]
        else:
            model = ["--model", "vit_base_patch16_224", "--num-frames", "16", "--img-size", "224",
                     "--num-workers", str(min(8, os.cpu_count() or 1))]
        argv = ["--data-list", str(root / "data" / "pretrain.txt"), "--data-root", str(root / "data"),
                "--output-dir", str(run_dir), *model, "--batch-size", str(k["batch"]),
                "--num-sample", str(k["num_sample"]), "--steps", str(k["steps"]), "--warmup-steps", "2",
                "--precision", "bf16", "--device", str(ctx.device), "--log-every", "1", "--no-progress"]
        t0 = time.perf_counter()
        summary = tp.main(argv)
        wall = time.perf_counter() - t0
        rows = _metrics(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    last = next((r for r in reversed(rows) if "clips_per_s" in r), {})
    out = {"argv": argv, "steps": summary.get("step") if isinstance(summary, dict) else None, "losses": losses,
           "clips_per_s_last": last.get("clips_per_s"), "mfu_last": last.get("mfu"), "wall_s": wall,
           "summary": f"{len(losses)} logged steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else
                      "no loss logged"}
    if len(losses) != k["steps"] or not all(math.isfinite(x) for x in losses):
        out.update(status="failed", reason=f"expected {k['steps']} finite losses, got {losses}")
    return out


def _metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (a line cut short is left out)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


# ------------------------------------------------------------------------------ attention
ATTENTION_EXTRAS = ("flash_attn", "xformers")


def attention(ctx: Context, share_s: float) -> dict:
    """``bench.attention.measure_shape`` at ViT-B's three attention shapes: every backend, so the
    flash-attn and xformers rows stand beside SDPA's (or say why they cannot run)."""
    from ..attention import attn_shapes, measure_shape

    k = plan.DRY["attention"] if ctx.dry_run else plan.ATTENTION
    arch = "vit_base_patch16_224"
    if ctx.dry_run:
        shapes, dtype = [dict(where="toy", B=1, N=16, H=2, d=8)], torch.float32
    else:
        shapes, dtype = attn_shapes(arch, k["batch"]), torch.bfloat16
    pl = {"device": ctx.device, "dtype": dtype, "repeats": k["repeats"]}
    rows = []
    for shp in shapes:
        for r in measure_shape(arch, shp, pl, k["warmup"]):
            rows.append({key: r.get(key) for key in ("where", "B", "N", "H", "d", "backend", "ok", "why")}
                        | {"fwd_bwd_ms": r["fwd_bwd_s"]["median"] * 1e3 if r.get("ok") else None,
                           "fwd_bwd_tflops": r.get("fwd_bwd_tflops")})
    extras = {}
    for b in ATTENTION_EXTRAS:
        mine = [r for r in rows if r["backend"] == b]
        extras[b] = ("ran" if all(r["ok"] for r in mine) else
                     "not run: " + next(r["why"] for r in mine if not r["ok"]))
    return {"rows": rows, "extras": extras, "summary": "; ".join(f"{b}: {v}" for b, v in extras.items())}


# ------------------------------------------------------------------------------ torchcodec
def torchcodec_cuda(ctx: Context, share_s: float) -> dict:
    """Decode one H.264 clip (``train.make_synthetic.write_mp4``) with torchcodec on the
    CPU and, on CUDA, on the GPU: frames/s of each and the largest pixel difference."""
    if importlib.util.find_spec("torchcodec") is None:
        return {"status": "not run", "reason": "torchcodec is not installed"}
    try:
        from torchcodec.decoders import VideoDecoder

        VideoDecoder(torch.zeros(64, dtype=torch.uint8))  # loads FFmpeg's libraries; bytes that are no video
    except Exception as exc:
        if "libtorchcodec" in str(exc) or isinstance(exc, (ImportError, OSError)):
            return {"status": "not run", "reason": f"torchcodec does not load here: {str(exc).splitlines()[0][:150]} "
                                                   "(it needs FFmpeg 4-9 shared libraries and the torch it was built for)"}
    if importlib.util.find_spec("av") is None:
        return {"status": "not run", "reason": "PyAV (which writes the clip) is not installed"}
    import numpy as np

    from train.make_synthetic import render, write_mp4

    frames = plan.DRY["torchcodec_frames"] if ctx.dry_run else plan.TORCHCODEC_FRAMES
    with tempfile.TemporaryDirectory(prefix="gpu-check-torchcodec-") as tmp:
        path = str(Path(tmp) / "clip.mp4")
        write_mp4(path, render(0, frames, 256, 340, np.random.default_rng(0)), fps=25)  # H.264 where PyAV has it
        out = {"clip": f"{frames} frames, 25 fps, 340x256"}
        cpu, out["cpu"] = _decode(VideoDecoder, path, "cpu")
        if ctx.device.type != "cuda":
            out["cuda"] = None
            out["summary"] = (f"CPU {out['cpu']['frames_per_s']:.0f} frames/s; CUDA decoding not run "
                              f"({ctx.device.type} run)")
            return out
        try:
            gpu, out["cuda"] = _decode(VideoDecoder, path, "cuda")
        except Exception as exc:  # a torchcodec built without CUDA, no NVDEC for this codec
            out.update(status="not run", reason=f"CUDA decoding failed: {type(exc).__name__}: {str(exc)[:200]}")
            return out
        out["max_abs_diff_vs_cpu"] = int((gpu.cpu().int() - cpu.int()).abs().max())
        out["summary"] = (f"CPU {out['cpu']['frames_per_s']:.0f} frames/s, CUDA {out['cuda']['frames_per_s']:.0f} "
                          f"frames/s, largest pixel difference {out['max_abs_diff_vs_cpu']}")
        return out


def _decode(decoder_cls, path: str, device: str):
    t0 = time.perf_counter()
    dec = decoder_cls(path, device=device)
    frames = dec.get_frames_in_range(0, dec.metadata.num_frames).data
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return frames, {"frames": int(frames.shape[0]), "seconds": dt, "frames_per_s": frames.shape[0] / dt,
                    "device": str(frames.device)}


FUNCTIONS = {"cuda_tests": cuda_tests, "kernels": kernels, "dual_masking_vit_b": dual_masking_vit_b,
             "dual_masking_vit_g": dual_masking_vit_g, "memory_count": memory_count, "pretrain": pretrain,
             "attention": attention, "torchcodec_cuda": torchcodec_cuda}
