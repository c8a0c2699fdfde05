"""Dual masking vs encoder-only masking, and vmae_fast vs the official computation, on this machine.

    python -m bench.dual_masking                      # --preset auto: what fits this machine
    python -m bench.dual_masking --preset table2      # ViT-B and ViT-g at 16x224, as the paper's Table 2
    python -m bench.dual_masking --arch vit_b --batch 8 --frames 16 --img-size 224 --masking enc,0.5
    python -m bench.dual_masking --preset table2 --smoke --device cpu --out /tmp/smoke   # code paths only

Per cell (setup x masking x implementation): parameters, forward GMACs in both conventions
(``vmae_fast.flops``), the FLOPs ``torch.utils.flop_counter`` counts for one forward+backward
(attention by the analytic rule; kernels the counter misses are named), train-step time
(median/min/max/IQR), clips/s, achieved TFLOP/s, MFU (model FLOPs: forward + backward, no
recomputation) and HFU (hardware FLOPs: with the recomputation of activation checkpointing),
peak and per-clip activation memory, optionally the largest batch that fits. Prints Markdown
tables (one in the shape of the paper's Table 2, beside its numbers), writes every raw number to
a JSON file under ``bench/results/`` and a PNG plot beside it. ``--smoke`` runs a preset's plan
at toy sizes, to check its code paths (search, FLOPs, tables, plot) on any machine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
import time
from pathlib import Path

import torch

import vmae_fast
from vmae_fast.config import ARCH_ALIASES, ARCHS, arch_spec, resolve_arch
from vmae_fast.flops import count_macs
from vmae_fast.masking import running_cell_patterns

from . import device as devmod
from .output import result_path, write_json
from .runner import (DTYPES, IMPL_HELP, IMPLS, CellOptions, Setup, build, make_optimizer,
                     masking_label, master_state, measure_cell, measure_cells_interleaved, param_count,
                     unsupported)
from .timing import free_memory, is_oom, pin_malloc_mmap_threshold

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# docs/semantics.md §10: the paper's Table 2 (forward GMACs per 16x224 clip, fvcore convention),
# the decoder-ratio ablation, speedups of dual masking, and "Mems" (meaning undefined there).
PAPER = {
    ("vit_base_patch16_224", 0.0): {"gmacs": 35.48, "mems": "631M"},
    ("vit_base_patch16_224", 0.25): {"gmacs": 31.63},
    ("vit_base_patch16_224", 0.5): {"gmacs": 25.87, "mems": "328M", "speedup": 1.79},
    ("vit_base_patch16_224", 0.75): {"gmacs": 21.06},
    ("vit_giant_patch14_224", 0.0): {"gmacs": 263.93, "mems": "1753M"},
    ("vit_giant_patch14_224", 0.5): {"gmacs": 241.61, "mems": "1050M", "speedup": 1.48},
}
GOAL_SPEEDUP_VS_REF = 2.0
GOAL_MEM_FRACTION = 0.5
GOAL_MFU_HOPPER = 0.45


CPU_IMPLS = ["vmae_fast", "vmae_fast-unfused", "reference"]
PRESETS = {
    # About a minute on 2 idle CPU cores: ViT-S on 16x160 clips (8x10x10 = 800 tokens, 80
    # encoder-visible at 0.9, the paper's 16 frames), both maskings, the three implementations.
    # At 8x128 (28 visible tokens) the AdamW step dominates and every row looks alike.
    "cpu": {"setups": [(Setup("vit_small_patch16_224", 16, 160, 2), [0.0, 0.5])],
            "impls": CPU_IMPLS, "warmup": 2, "repeats": 7},
    "gpu": {"setups": [(Setup("vit_base_patch16_224", 16, 224, 32), [0.0, 0.25, 0.5, 0.75]),
                       (Setup("vit_giant_patch14_224", 16, 224, 8, ckpt=True), [0.0, 0.25, 0.5, 0.75])],
            "impls": CPU_IMPLS, "warmup": 3, "repeats": 10},
    # The paper's Table 2 rows: ViT-B (decoder 384) with the decoder-ratio ablation, ViT-g
    # (decoder 512, activation checkpointing as the official recipe); 16x224, tube 0.9.
    "table2": {"setups": [(Setup("vit_base_patch16_224", 16, 224, 32), [0.0, 0.25, 0.5, 0.75]),
                          (Setup("vit_giant_patch14_224", 16, 224, 8, ckpt=True), [0.0, 0.5])],
               "impls": CPU_IMPLS, "warmup": 3, "repeats": 10},
}


# ------------------------------------------------------------------------------- arguments
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.dual_masking", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="implementations:\n" + "\n".join(f"  {k}: {v}" for k, v in IMPL_HELP.items()))
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="auto: 'gpu' on a CUDA device, else 'cpu' (default: auto)")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda (the current CUDA device) | cuda:N (made current) (default: auto)")
    p.add_argument("--arch", action="append",
                   help=f"model (repeatable): one of {sorted(ARCHS)} or {sorted(ARCH_ALIASES)}; replaces the preset's")
    p.add_argument("--batch", type=int, help="clips per step (all setups)")
    p.add_argument("--frames", type=int, help="frames per clip (multiple of the tubelet, 2)")
    p.add_argument("--img-size", type=int, help="frame size in pixels (H = W)")
    p.add_argument("--depth", type=int, help="encoder depth override (for tiny smoke runs)")
    p.add_argument("--decoder-depth", type=int, help="decoder depth (paper: 4)")
    p.add_argument("--masking", help="comma list of decoder masks: enc (encoder-only), 0.25, 0.5, 0.75")
    p.add_argument("--encoder-ratio", type=float, default=0.9, help="tube masking ratio (default 0.9)")
    p.add_argument("--impl", help=f"comma list of implementations: {', '.join(IMPLS)}")
    p.add_argument("--compile", action="store_true", help="add reference+compile to the implementations")
    p.add_argument("--ckpt", choices=["preset", "off", "on", "both"], default="preset",
                   help="activation checkpointing of every block (default: as the preset)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, help="timed steps per cell")
    p.add_argument("--no-optimizer", action="store_true", help="time forward+backward only (no AdamW step)")
    p.add_argument("--max-batch", action="store_true",
                   help="find the largest batch that fits (doubling, then bisection; on CPU only with --max-batch-cap)")
    p.add_argument("--max-batch-cap", type=int,
                   help="largest batch --max-batch tries (default 4096 on GPU; on CPU the search runs "
                        "only with a cap, since an out-of-memory there kills the process)")
    p.add_argument("--smoke", action="store_true",
                   help="the preset's plan at toy sizes, to check its code paths (not its numbers): per setup "
                        "depth 1, decoder depth 1, head width 8, 4 frames, a 2x2 patch grid, batch 2; 1 warm-up, "
                        "2 repeats, --max-batch up to 4, a small matmul ceiling; explicit overrides still apply")
    p.add_argument("--interleave", dest="interleave", action="store_true", default=None,
                   help="time the implementations of a cell round-robin, all alive at once "
                        "(default on CPU, where other load would otherwise fall on one row)")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="one implementation at a time, alone in memory (default on GPU)")
    p.add_argument("--no-flops", action="store_true", help="skip torch.utils.flop_counter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON and PNG")
    p.add_argument("--name", help="file stem (default: <preset or custom-setups>-<device>-<date>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _arch(name: str) -> str:
    try:
        return resolve_arch(name)
    except ValueError as exc:
        raise ValueError(f"--arch: {exc}") from None


def _maskings(text: str) -> list[float]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok in ("enc", "encoder", "encoder-only", "0", "0.0", "none"):
            out.append(0.0)
            continue
        try:
            r = float(tok)
        except ValueError:
            r = None
        if r not in (0.25, 0.5, 0.75):
            raise ValueError(f"--masking takes 'enc' or a running-cell decoder ratio 0.25, 0.5, 0.75; got {tok!r}")
        out.append(r)
    if not out:
        raise ValueError("--masking is empty")
    return list(dict.fromkeys(out))


def _impls(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in IMPLS]
    if bad or not out:
        raise ValueError(f"--impl takes a comma list of {list(IMPLS)}; got {text!r}")
    return list(dict.fromkeys(out))


def _device(text: str) -> torch.device:
    return devmod.select_device(text)  # parse; a cuda:N device becomes the current one


SMOKE = {"frames": 4, "batch": 2, "depth": 1, "decoder_depth": 1}
SMOKE_MAX_BATCH_CAP = 4


def _smoke(s: Setup) -> Setup:
    """``s`` at toy size: the smallest grid the running-cell masks take (2x2 patches), head
    width 8 with the arch's head counts (a full-width ViT-g block alone makes each AdamW step
    cost ~0.2 s on 2 CPU cores)."""
    a = arch_spec(s.arch)
    return Setup(**{**s.__dict__, **SMOKE, "img_size": 2 * a.patch_size, "embed_dim": 8 * a.num_heads,
                    "decoder_embed_dim": 8 * a.decoder_num_heads})


def plan_from_args(ns: argparse.Namespace) -> dict:
    """Resolve presets and overrides into a plan; bad values raise ``ValueError``."""
    device = _device(ns.device)
    preset = ns.preset if ns.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    base = PRESETS[preset]
    for name in ("batch", "frames", "img_size", "depth", "decoder_depth", "warmup", "repeats", "max_batch_cap"):
        v = getattr(ns, name)
        lo = 0 if name in ("warmup", "decoder_depth") else 1
        if v is not None and v < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    if not 0.0 <= ns.encoder_ratio < 1.0:
        raise ValueError(f"--encoder-ratio must be in [0, 1), got {ns.encoder_ratio}")
    maskings = _maskings(ns.masking) if ns.masking else None
    setups = list(base["setups"])
    smoke = getattr(ns, "smoke", False)
    if ns.arch:
        archs = [_arch(a) for a in ns.arch]
        default_batch = 2 if device.type == "cpu" else 32
        setups = [(Setup(a, 16, 224, default_batch if "giant" not in a else 8, ckpt="giant" in a
                         and device.type == "cuda"), maskings or [0.0, 0.5]) for a in archs]
    if smoke:
        setups = [(_smoke(s), m) for s, m in setups]
    out = []
    for s, m in setups:
        kw = {k: getattr(ns, a) for k, a in (("batch", "batch"), ("frames", "frames"), ("img_size", "img_size"),
                                             ("depth", "depth"), ("decoder_depth", "decoder_depth"))
              if getattr(ns, a) is not None}
        s = Setup(**{**s.__dict__, **kw})
        ckpts = {"preset": [s.ckpt], "off": [False], "on": [True], "both": [False, True]}[ns.ckpt]
        for c in ckpts:
            out.append((Setup(**{**s.__dict__, "ckpt": c}), maskings or m))
    for s, m in out:
        try:
            cfg = s.config()
            for r in m:
                vmae_fast.DualMask.sample(1, cfg.grid, ns.encoder_ratio, r)
                if r:
                    running_cell_patterns(cfg.grid, r)
        except ValueError as exc:
            raise ValueError(f"setup {s.label()}: {exc}") from None
    impls = _impls(ns.impl) if ns.impl else list(base["impls"])
    if ns.compile and "reference+compile" not in impls:
        impls.append("reference+compile")
    if ns.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[ns.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("--dtype fp16 is not supported on CPU; use fp32 or bf16")
    # The search needs a bound on CPU, where an out-of-memory kills the process instead of raising.
    cap = ns.max_batch_cap if ns.max_batch_cap is not None else (
        SMOKE_MAX_BATCH_CAP if smoke else (4096 if device.type == "cuda" else None))
    return {"preset": preset, "device": device, "dtype": dtype, "setups": out, "impls": impls, "smoke": smoke,
            "warmup": 1 if smoke and ns.warmup is None else (base["warmup"] if ns.warmup is None else ns.warmup),
            "repeats": 2 if smoke and ns.repeats is None else (base["repeats"] if ns.repeats is None else ns.repeats),
            "max_batch": ns.max_batch or smoke, "max_batch_cap": cap}


# ------------------------------------------------------------------------------------- run
def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=disable, file=sys.stderr, unit="cell", dynamic_ncols=True)
    except ImportError:
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                if not disable:
                    print(f"[{self.n}/{total}]", file=sys.stderr, flush=True)

            def set_description(self, s):
                if not disable:
                    print(s, file=sys.stderr, flush=True)

            def close(self):
                pass
        return _Plain()


def run(plan: dict, ns: argparse.Namespace) -> dict:
    device, dtype = plan["device"], plan["dtype"]
    t_start = time.time()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if device.type == "cpu":
        pin_malloc_mmap_threshold()  # before any model exists, so RSS tracks live tensors
    info = devmod.device_info(device)
    smoke = plan.get("smoke", False)
    ceiling = devmod.matmul_ceiling(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                    **({"n": 256, "repeats": 3} if smoke else {}))
    opt = CellOptions(device=device, dtype=dtype, warmup=plan["warmup"], repeats=plan["repeats"],
                      encoder_ratio=ns.encoder_ratio, optimizer=not ns.no_optimizer,
                      max_batch=plan.get("max_batch", ns.max_batch), max_batch_cap=plan.get("max_batch_cap"),
                      count_flops=not ns.no_flops, seed=ns.seed)
    rows = []
    n_cells = sum(len(m) for _, m in plan["setups"]) * len(plan["impls"])
    bar = _progress(n_cells, ns.no_progress)
    interleave = ns.interleave if ns.interleave is not None else device.type == "cpu"
    for setup, maskings in plan["setups"]:
        state = master_state(setup, ns.seed)
        params = param_count(setup)
        cfg = setup.config()

        def base_row(impl, r):
            return {"setup": setup.__dict__ | {"label": setup.label()}, "arch": setup.arch,
                    "decoder_ratio": r, "encoder_ratio": ns.encoder_ratio, "masking": masking_label(r),
                    "impl": impl, "params": params, "dtype": str(dtype).replace("torch.", ""),
                    "gmacs_official": count_macs(cfg, ns.encoder_ratio, r, "official")["total"] / 1e9,
                    "gmacs_vmae_fast": count_macs(cfg, ns.encoder_ratio, r, "vmae_fast")["total"] / 1e9,
                    "status": "ok"}

        def built(impl):
            try:
                module = build(impl, setup, state, device)
                return module, (make_optimizer(module, device) if opt.optimizer else None), None
            except Exception as exc:  # e.g. OOM for the weights, a missing compiler
                return None, None, f"{type(exc).__name__}: {exc}"[:300]

        def error_of(exc):
            # Only a description is kept: the exception's traceback holds the failed step's
            # tensors, so memory is freed after the except block, once they are gone.
            return "oom" if is_oom(exc) else "error", f"{type(exc).__name__}: {exc}"[:300]

        if interleave:  # every implementation alive at once, timed round-robin
            mods, errors = {}, {}
            for impl in plan["impls"]:
                module, optimizer, err = built(impl)
                if err:
                    errors[impl] = err
                else:
                    mods[impl] = (module, optimizer)
            for r in maskings:
                bar.set_description(f"{setup.label()} | {masking_label(r)} | all (interleaved)")
                err = None
                active = {impl: m for impl, m in mods.items() if not unsupported(impl, r)}
                try:
                    measured = measure_cells_interleaved(active, setup, r, opt) if active else {}
                except Exception as exc:
                    measured, err = {}, error_of(exc)
                if err:
                    for module, _ in mods.values():
                        module.zero_grad(set_to_none=True)
                    free_memory(device)
                for impl in plan["impls"]:
                    row = base_row(impl, r)
                    if impl in errors:
                        row.update(status="error", error=errors[impl])
                    elif unsupported(impl, r):
                        row.update(status="unsupported", error=unsupported(impl, r))
                    elif err is not None:
                        row.update(status=err[0], error=err[1])
                    else:
                        row.update(measured[impl])
                    rows.append(row)
                    bar.update(1)
            del mods
            free_memory(device)
            continue
        for impl in plan["impls"]:
            module, optimizer, build_error = built(impl)
            for r in maskings:
                bar.set_description(f"{setup.label()} | {masking_label(r)} | {impl}")
                row = base_row(impl, r)
                if build_error:
                    row.update(status="error", error=build_error)
                elif unsupported(impl, r):
                    row.update(status="unsupported", error=unsupported(impl, r))
                else:
                    err = None
                    try:
                        row.update(measure_cell(impl, module, setup, r, opt, optimizer))
                    except Exception as exc:
                        err = error_of(exc)
                    if err:
                        row.update(status=err[0], error=err[1])
                        module.zero_grad(set_to_none=True)
                        free_memory(device)
                rows.append(row)
                bar.update(1)
            del module, optimizer
            free_memory(device)
    bar.close()
    derive(rows, info, ceiling)
    return {"schema": 2, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m bench.dual_masking " + " ".join(sys.argv[1:] if ns._argv is None else ns._argv),
            "preset": plan["preset"], "device": info, "matmul_ceiling": ceiling,
            "config": {"dtype": str(dtype).replace("torch.", ""), "warmup": plan["warmup"],
                       "repeats": plan["repeats"], "encoder_ratio": ns.encoder_ratio, "smoke": smoke,
                       "max_batch_cap": opt.max_batch_cap if opt.max_batch else None,
                       "optimizer": "none (forward+backward)" if ns.no_optimizer else
                       "AdamW lr=0 (full update cost, weights unchanged)",
                       "impls": plan["impls"], "seed": ns.seed,
                       "timing": "interleaved (round-robin over implementations)" if
                       (ns.interleave if ns.interleave is not None else device.type == "cpu") else
                       "sequential (one implementation alive at a time)",
                       "setups": [{**s.__dict__, "maskings": m} for s, m in plan["setups"]],
                       "clips": "vmae_fast: uint8 (normalized on the device, as train/pretrain.py feeds it); "
                                "reference: ImageNet-normalized float32 of the same pixels",
                       "flops": "torch.utils.flop_counter; attention from q/k/v shapes by the analytic rule "
                                "(backward = 2x forward) on every torch build, also where the counter counts 0 "
                                "(flop_counter_missed names those ops). model FLOPs: forward + backward of "
                                "the vmae_fast row, no recomputation (MFU); hardware FLOPs: what the row's "
                                "step ran, recomputation of checkpointed blocks included (HFU)",
                       "memory": "GPU: torch.cuda.max_memory_allocated; CPU: RSS high-water (VmHWM) after "
                                 "resetting it via /proc/self/clear_refs; act/clip = (peak - memory in use "
                                 "before the step) / batch"},
            "rows": rows, "goals": goals(rows, info), "wall_s": time.time() - t_start,
            # other load on the machine (1/5/15-minute load averages) at start and end of the run
            "loadavg": {"start": load_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None}}


def _find(rows, setup_label, r, impl):
    for x in rows:
        if x["setup"]["label"] == setup_label and x["decoder_ratio"] == r and x["impl"] == impl and x["status"] == "ok":
            return x
    return None


def derive(rows: list[dict], info: dict, ceiling: dict) -> None:
    """Add TFLOP/s, MFU, HFU and the two speedups to every measured row."""
    peak = info.get("bf16_dense_peak_tflops")
    for x in rows:
        if x["status"] != "ok":
            continue
        t = x["step_s"]["median"]
        # Hardware FLOPs: what this row's step ran, the forward of checkpointed blocks again in
        # backward included. Model FLOPs: the work the function needs (the vmae_fast row's
        # forward + backward without recomputation, the same for every implementation of the
        # cell), so MFU does not reward recomputing or computing what the function discards.
        hw = x.get("counted_flops_train_step")
        fast = _find(rows, x["setup"]["label"], x["decoder_ratio"], "vmae_fast")
        model = (fast or {}).get("counted_flops_model_step") or x.get("counted_flops_model_step")
        x["hardware_flops_train_step"] = hw
        x["model_flops_train_step"] = model
        x["achieved_tflops"] = hw / t / 1e12 if hw else None
        x["model_tflops"] = model / t / 1e12 if model else None
        bf16_peak = peak if x["dtype"] != "float32" else None  # the datasheet peak is a bf16 number
        for kind, tf in (("mfu", x["model_tflops"]), ("hfu", x["achieved_tflops"])):
            x[f"{kind}_datasheet"] = tf / bf16_peak if (tf and bf16_peak) else None
            x[f"{kind}_measured_ceiling"] = tf / ceiling["tflops"] if tf else None
        enc = _find(rows, x["setup"]["label"], 0.0, x["impl"])
        x["speedup_dual_vs_enc"] = enc["step_s"]["median"] / t if (enc and x["decoder_ratio"] != 0) else None
        ref = _find(rows, x["setup"]["label"], x["decoder_ratio"], "reference")
        x["speedup_vs_reference"] = ref["step_s"]["median"] / t if ref else None
        # Interleaved rows share one process, so their peaks are the same number: compare the
        # activations each step saves for backward instead (exact, unlike an RSS delta).
        key = "saved_act_per_clip_bytes" if x.get("timing") == "interleaved" else "peak_mem_bytes"
        x["mem_vs_reference_basis"] = key
        ok = ref and (ref.get(key) or 0) > 0 and (x.get(key) or 0) > 0  # RSS deltas can read <= 0
        x["mem_vs_reference"] = x[key] / ref[key] if ok else None
        x["speedup_vs_reference_min"] = ref["step_s"]["min"] / x["step_s"]["min"] if ref else None


def goals(rows: list[dict], info: dict) -> dict:
    """The issue's GPU goals (ViT-B 16x224, dual 0.9/0.5, 1 GPU), judged from this run."""
    cand = [x for x in rows if x["status"] == "ok" and x["impl"] == "vmae_fast" and x["arch"] == "vit_base_patch16_224"
            and x["setup"]["frames"] == 16 and x["setup"]["img_size"] == 224 and x["decoder_ratio"] == 0.5
            and x["encoder_ratio"] == 0.9 and x["setup"]["depth"] is None and not x["setup"]["ckpt"]]
    if info["device_type"] != "cuda":
        return {"applicable": False, "why": "the goals are for a GPU with bf16; this run is on CPU"}
    if not cand:
        return {"applicable": False, "why": "no ok vmae_fast row of ViT-B 16x224 dual 0.9/0.5 without checkpointing"}
    x = cand[0]
    hopper = any(k in info.get("name", "") for k in ("H100", "H200"))
    out = {"applicable": True, "row": x["setup"]["label"],
           "speedup_vs_reference": x["speedup_vs_reference"], "goal_speedup_vs_reference": GOAL_SPEEDUP_VS_REF,
           "mem_vs_reference": x["mem_vs_reference"], "goal_mem_vs_reference": GOAL_MEM_FRACTION,
           "mfu": x["mfu_datasheet"], "goal_mfu": GOAL_MFU_HOPPER if hopper else None, "hfu": x["hfu_datasheet"],
           "speedup_dual_vs_enc": x["speedup_dual_vs_enc"], "goal_speedup_dual_vs_enc": PAPER[(x["arch"], 0.5)]["speedup"]}
    out["pass"] = {
        "speedup_vs_reference": None if x["speedup_vs_reference"] is None else x["speedup_vs_reference"] >= GOAL_SPEEDUP_VS_REF,
        "mem_vs_reference": None if x["mem_vs_reference"] is None else x["mem_vs_reference"] <= GOAL_MEM_FRACTION,
        "mfu": None if (not hopper or x["mfu_datasheet"] is None) else x["mfu_datasheet"] >= GOAL_MFU_HOPPER,
        "speedup_dual_vs_enc": None if x["speedup_dual_vs_enc"] is None else x["speedup_dual_vs_enc"] >= out["goal_speedup_dual_vs_enc"],
    }
    return out


# ---------------------------------------------------------------------------------- output
def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


def _x(v, fmt="{:.2f}x") -> str:
    return "–" if v is None else fmt.format(v)


def _load(v) -> str:
    return "n/a" if not v else f"{v[0]:.1f}"


def render(result: dict) -> str:
    rows = result["rows"]
    info = result["device"]
    out = [f"## Dual masking benchmark: {info['name']}",
           f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, commit {info['git_commit']}, "
           f"dtype {result['config']['dtype']}, native ext: {info['native_ext'].split(' (')[0]}, "
           f"step = {result['config']['optimizer']}, median of {result['config']['repeats']} "
           f"after {result['config']['warmup']} warm-up",
           f"matmul ceiling: {result['matmul_ceiling']['tflops']:.2f} TFLOP/s "
           f"({result['matmul_ceiling']['dtype']} {result['matmul_ceiling']['n']}^3)"
           + (f"; datasheet bf16 dense peak {info['bf16_dense_peak_tflops']:.0f} TFLOP/s"
              if info.get("bf16_dense_peak_tflops") else ""),
           f"timing: {result['config']['timing']}; machine load average at start/end: "
           f"{_load(result['loadavg']['start'])} / {_load(result['loadavg']['end'])} "
           f"({info.get('cpu_count')} CPUs)"]
    if any(x.get("timing") == "interleaved" for x in rows):
        out.append("CPU memory: peak = the process's RSS high-water mark (all implementations alive), "
                   "act/clip = what one train step adds to it, per clip (rough); saved/clip = bytes autograd "
                   "saves for backward per clip (exact)")
    out.append("")
    out += ["| setup | masking | impl | params | GMACs official / ours | step ms median (min–max) | clips/s "
            "| TFLOP/s hw | MFU peak / ceiling | HFU peak / ceiling | peak mem | act/clip | saved/clip | max batch "
            "| dual÷enc | vs reference |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        head = (f"| {x['setup']['label']} | {x['masking']} | {x['impl']} | {x['params'] / 1e6:.1f}M | "
                f"{x['gmacs_official']:.2f} / {x['gmacs_vmae_fast']:.2f} | ")
        if x["status"] != "ok":
            out.append(head + f"**{x['status']}**: {x.get('error', '')[:80]} |" + " |" * 10)
            continue
        s = x["step_s"]
        mb = x.get("max_batch")
        mbs = "–" if mb is None else (f"{mb['max_batch']}{'+' if mb.get('capped') else ''}"
                                      if mb.get("max_batch") is not None else "n/a")
        mfu, hfu = (f"{_x(x[k + '_datasheet'], '{:.0%}')} / {_x(x[k + '_measured_ceiling'], '{:.0%}')}"
                    for k in ("mfu", "hfu"))
        out.append(head + f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}–{s['max'] * 1e3:.1f}) | "
                   f"{x['clips_per_s']:.2f} | {_x(x['achieved_tflops'], '{:.2f}')} | {mfu} | {hfu} | "
                   f"{_mb(x['peak_mem_bytes'])} | {_mb(x['act_mem_per_clip_bytes'])} | "
                   f"{_mb(x.get('saved_act_per_clip_bytes'))} | {mbs} | "
                   f"{_x(x['speedup_dual_vs_enc'])} | {_x(x['speedup_vs_reference'])} |")
    out += ["", "### Beside the paper's Table 2 (forward GMACs per clip; speedup = time ratio of encoder-only "
            "to dual masking)", "",
            "| model | masking | paper GFLOPs | ours, official conv. | ours, vmae_fast conv. | paper speedup "
            "| speedup vmae_fast | speedup reference | paper Mems | peak mem vmae_fast | peak mem reference |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for x in rows:
        key = (x["setup"]["label"], x["decoder_ratio"])
        if key in seen:
            continue
        seen.add(key)
        s = x["setup"]
        paper = PAPER.get((x["arch"], x["decoder_ratio"]), {}) \
            if (s["frames"], s["img_size"], s["depth"], s["decoder_depth"], x["encoder_ratio"]) == (16, 224, None, 4, 0.9) else {}
        fast = _find(rows, key[0], key[1], "vmae_fast") or {}
        ref = _find(rows, key[0], key[1], "reference") or {}
        out.append(f"| {s['label']} | {x['masking']} | {paper.get('gmacs', '–')} | {x['gmacs_official']:.2f} | "
                   f"{x['gmacs_vmae_fast']:.2f} | {_x(paper.get('speedup'))} | {_x(fast.get('speedup_dual_vs_enc'))} | "
                   f"{_x(ref.get('speedup_dual_vs_enc'))} | {paper.get('mems', '–')} | "
                   f"{_mb(fast.get('peak_mem_bytes'))} | {_mb(ref.get('peak_mem_bytes'))} |")
    out += ["", "### vmae_fast against the official computation (same weights, masks, dtype)", ""]
    for x in rows:
        if x["impl"] == "vmae_fast" and x["status"] == "ok":
            ref = _find(rows, x["setup"]["label"], x["decoder_ratio"], "reference")
            if ref:
                dl = abs(x["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
                out.append(f"- {x['setup']['label']}, {x['masking']}: reference {ref['step_s']['median'] * 1e3:.1f} ms, "
                           f"vmae_fast {x['step_s']['median'] * 1e3:.1f} ms -> **{x['speedup_vs_reference']:.2f}x** "
                           f"on medians, {x['speedup_vs_reference_min']:.2f}x on the fastest steps "
                           f"({ref['step_s']['min'] * 1e3:.1f} / {x['step_s']['min'] * 1e3:.1f} ms) "
                           f"({'saved activation' if x['mem_vs_reference_basis'].startswith('saved') else 'peak'} memory "
                           f"{_x(x['mem_vs_reference'], '{:.2f}')} of reference; loss rel. diff {dl:.1e})")
    g = result["goals"]
    out += ["", "### GPU goals (ViT-B 16x224, dual 0.9/0.5, bf16)", ""]
    if not g.get("applicable"):
        out.append(f"- not judged: {g['why']}")
    else:
        for k, label, fmt in (("speedup_vs_reference", ">= 2x clips/s of reference", "{:.2f}x"),
                              ("mem_vs_reference", "<= 0.5 of reference peak memory", "{:.2f}"),
                              ("mfu", ">= 45% MFU (H100-class)", "{:.1%}"),
                              ("speedup_dual_vs_enc", ">= 1.79x dual over encoder-only", "{:.2f}x")):
            ok = g["pass"][k]
            out.append(f"- {label}: {_x(g[k], fmt)} -> {'PASS' if ok else ('FAIL' if ok is False else 'n/a')}")
    out += ["", "MFU: model FLOPs (forward + backward of the vmae_fast row, no recomputation) per second; "
            "HFU: hardware FLOPs (what the row's step ran, activation-checkpointing recomputation included); "
            "peak = datasheet bf16 dense peak, ceiling = the measured matmul ceiling; max batch N+ = the search "
            "stopped at its cap"]
    missed = sorted({op for x in rows for op in x.get("flop_counter_missed") or ()})
    if missed:
        out.append(f"torch.utils.flop_counter counted 0 FLOPs for {', '.join(missed)}: filled in from the "
                   "q/k/v shapes by the analytic rule (vmae_fast.flops.attention_flops)")
    return "\n".join(out)


def _plan_slug(plan: dict, ns: argparse.Namespace) -> str:
    """The preset's name, or for a customized grid its setups (so that runs of one day don't
    overwrite each other's files)."""
    custom = any(getattr(ns, k) is not None for k in ("arch", "batch", "frames", "img_size", "depth",
                                                      "decoder_depth", "masking", "impl"))
    if not custom:
        return plan["preset"] + ("-smoke" if plan.get("smoke") else "")
    labels = sorted({s.label() for s, _ in plan["setups"]})
    return "custom-" + "_".join(re.sub(r"[^A-Za-z0-9]+", "-", x).strip("-").lower() for x in labels)


def main(argv: list[str] | None = None) -> dict:
    parser = _parser()
    ns = parser.parse_args(argv)
    ns._argv = argv
    try:
        plan = plan_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    result = run(plan, ns)
    info = result["device"]
    json_path = result_path(ns.out, ns.name, _plan_slug(plan, ns), info)
    out_dir, stem = json_path.parent, json_path.stem
    result["files"] = {"json": str(json_path)}
    if not ns.no_plot:
        try:
            from .plot import plot_dual_masking

            png = out_dir / f"{stem}.png"
            out_dir.mkdir(parents=True, exist_ok=True)
            plot_dual_masking(result, png)
            result["files"]["png"] = str(png)
        except ImportError as exc:
            print(f"no plot: {exc} (pip install 'vmae-fast[bench]')", file=sys.stderr)
    write_json(result, json_path)
    print(render(result))
    print(f"\nraw results: {json_path}" + (f", plot: {result['files']['png']}" if "png" in result["files"] else "")
          + f" ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(x["status"] == "error" for x in res["rows"]) else 0)
