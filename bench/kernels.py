"""Each fused op against its eager reference, ``torch.compile`` of the reference, and the native
CPU extension, at the shapes of ViT-B and ViT-g pretraining (smaller batches on CPU).

    python -m bench.kernels [--device cpu|cuda] [--batch N] [--repeats N] [--no-compile]

Reports ms (median, min-max), GB/s over the fewest bytes each op must move (every input read
once, every output written once) and that as a % of the measured device copy bandwidth.
Variants that cannot run here (no native build, no compiler, no GPU) are listed with why.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vmae_fast import ops
from vmae_fast.config import config_for
from vmae_fast.masking import DualMask

from . import device as devmod
from .output import result_path, write_json
from .runner import kernels_env
from .timing import time_fn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROTATE = 4  # input sets cycled through, so repeated calls do not time a warm cache


@dataclass
class Shape:
    name: str
    arch: str
    batch: int


def shapes(device: torch.device, batch: int | None) -> list[Shape]:
    gpu = device.type == "cuda"
    return [Shape("ViT-B 16x224 dual 0.9/0.5", "vit_base_patch16_224", batch or (32 if gpu else 2)),
            Shape("ViT-g 16x224 dual 0.9/0.5", "vit_giant_patch14_224", batch or (8 if gpu else 1))]


def make_inputs(shape: Shape, device, act_dtype, seed):
    cfg = config_for(shape.arch, num_frames=16, img_size=224)
    g = torch.Generator().manual_seed(seed)
    B = shape.batch
    video = torch.randn(B, 3, 16, 224, 224, generator=g).to(device)
    m = DualMask.sample(B, cfg.grid, 0.9, 0.5, generator=g).to(device)
    nv, nd, D, P = m.n_visible, m.n_decoder, cfg.decoder_embed_dim, cfg.cube_numel
    z = torch.randn(B, nv, D, generator=g).to(device, act_dtype)
    pos = torch.randn(cfg.num_tokens, D, generator=g).to(device)
    tok = torch.randn(1, 1, D, generator=g).to(device)
    pred = torch.randn(B, nd, P, generator=g).to(device, act_dtype)
    return dict(cfg=cfg, video=video, masks=m, z=z, pos=pos, mask_token=tok, pred=pred,
                weight=m.loss_weight())


def op_cases(x: dict) -> dict[str, dict]:
    """Per op: the reference, the fused entry point, the native op name, and minimal bytes."""
    cfg, video, m = x["cfg"], x["video"], x["masks"]
    t, p = cfg.tubelet_size, cfg.patch_size
    B, nv, nd = m.batch_size, m.n_visible, m.n_decoder
    P, D, N = cfg.cube_numel, x["z"].shape[-1], cfg.num_tokens
    es = lambda a: a.element_size()  # noqa: E731
    idx_b = lambda n: B * n * 8  # noqa: E731

    def gather_ref():
        return ops.gather_cubes_ref(video, m.visible_idx, tubelet=t, patch=p, layout="cthw")

    def gather_fused():
        return ops.gather_cubes(video, m.visible_idx, tubelet=t, patch=p, layout="cthw")

    z, pos, tok = x["z"], x["pos"], x["mask_token"]
    out_es = torch.promote_types(z.dtype, pos.dtype).itemsize

    def dec_ref():
        return ops.decoder_input_ref(z, pos, tok, m.visible_idx, m.decoder_idx)

    def dec_fused():
        return ops.decoder_input(z, pos, tok, m.visible_idx, m.decoder_idx)

    pred, w = x["pred"], x["weight"]

    def mse_ref():
        return ops.masked_mse_loss_ref(pred, video, m.decoder_idx, w, tubelet=t, patch=p)

    def mse_fused():
        return ops.masked_mse_loss(pred, video, m.decoder_idx, w, tubelet=t, patch=p)

    return {
        "gather_cubes": dict(ref=gather_ref, fused=gather_fused, native="gather_cubes_cpu",
                             native_call=lambda f: f(video, m.visible_idx, t, p, False),
                             bytes=B * nv * P * es(video) * 2 + idx_b(nv),
                             shape=f"video {tuple(video.shape)} -> ({B}, {nv}, {P})"),
        "decoder_input": dict(ref=dec_ref, fused=dec_fused, native="decoder_input_fwd_cpu",
                              native_call=lambda f: f(z, pos, tok.reshape(-1), m.visible_idx, m.decoder_idx),
                              bytes=z.numel() * es(z) + N * D * es(pos) + idx_b(nv + nd)
                              + B * (nv + nd) * D * out_es,
                              shape=f"z {tuple(z.shape)}, pos ({N}, {D}) -> ({B}, {nv + nd}, {D})"),
        "masked_mse_loss": dict(ref=mse_ref, fused=mse_fused, native="masked_mse_fwd_cpu",
                                native_call=lambda f: f(pred, video, m.decoder_idx, w, t, p, True, 1e-6),
                                bytes=pred.numel() * es(pred) + B * nd * P * es(video) + idx_b(nd) + B * nd * 4,
                                shape=f"pred {tuple(pred.shape)}, video {tuple(video.shape)} -> ()"),
    }


def fused_backend(device: torch.device, native_name: str) -> str:
    from vmae_fast.ops._dispatch import backend

    return backend(device, native_name)


def _run(fn: Callable, device, warmup, repeats) -> dict:
    st = time_fn(fn, device, warmup=warmup, repeats=repeats)
    return {"ok": True, "seconds": st.to_dict()}


def bench_op(name: str, cases_by_set: list[dict], device, warmup, repeats, compile_: bool,
             copy_gbps: float) -> list[dict]:
    """All variants of one op; each call cycles over ``ROTATE`` input sets."""
    c0 = cases_by_set[0][name]
    rows = []

    def cycled(key):
        fns = [c[name][key] for c in cases_by_set]
        i = [0]

        def f():
            i[0] = (i[0] + 1) % len(fns)
            return fns[i[0]]()
        return f

    variants: list[tuple[str, Callable | None, str | None]] = [("eager ref", cycled("ref"), None)]
    if compile_:
        try:
            compiled = [torch.compile(c[name]["ref"], dynamic=False) for c in cases_by_set]
            j = [0]

            def comp():
                j[0] = (j[0] + 1) % len(compiled)
                return compiled[j[0]]()
            variants.append(("torch.compile(ref)", comp, None))
        except Exception as exc:
            variants.append(("torch.compile(ref)", None, f"{type(exc).__name__}: {exc}"[:200]))
    which = fused_backend(device, c0["native"])
    if which == "ref":
        variants.append(("fused (dispatch)", None, "dispatch picks the reference here "
                         "(no native build on CPU / no Triton on GPU)"))
    else:
        variants.append((f"fused (dispatch: {which})", cycled("fused"), None))
    if device.type == "cpu":
        from vmae_fast.ops._dispatch import native_op

        f = native_op(c0["native"])
        if f is None:
            variants.append(("native ext", None, "vmae_fast._C not built (" + devmod.native_status() + ")"))
        else:
            calls = [c[name]["native_call"] for c in cases_by_set]
            k = [0]

            def nat():
                k[0] = (k[0] + 1) % len(calls)
                return calls[k[0]](f)
            variants.append(("native ext", nat, None))
    for label, fn, why in variants:
        row = {"op": name, "variant": label, "shape": c0["shape"], "bytes": c0["bytes"]}
        if fn is None:
            row.update(ok=False, why=why)
        else:
            try:
                with torch.no_grad(), kernels_env(True):
                    row.update(_run(fn, device, warmup, repeats))
                med = row["seconds"]["median"]
                row["gbps"] = c0["bytes"] / med / 1e9
                row["pct_copy_bw"] = row["gbps"] / copy_gbps
            except Exception as exc:
                row.update(ok=False, why=f"{type(exc).__name__}: {exc}"[:200])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, help="clips (default: 32 / 8 on GPU, 2 / 1 on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, help="default 50 on GPU, 10 on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    ap.add_argument("--only", help="comma list of ops")
    ap.add_argument("--arch", choices=["vit_b", "vit_g", "both"], default="both")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--name")
    ns = ap.parse_args(argv)
    dev = torch.device("cuda" if (ns.device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if ns.device == "auto" else ns.device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    if ns.batch is not None and ns.batch < 1:
        ap.error(f"--batch must be >= 1, got {ns.batch}")
    repeats = ns.repeats or (50 if dev.type == "cuda" else 10)
    act_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    info = devmod.device_info(dev)
    copy = devmod.copy_bandwidth(dev)
    wanted = set(ns.only.split(",")) if ns.only else None
    rows = []
    for shp in shapes(dev, ns.batch):
        if ns.arch != "both" and shp.arch != {"vit_b": "vit_base_patch16_224", "vit_g": "vit_giant_patch14_224"}[ns.arch]:
            continue
        sets = [op_cases(make_inputs(shp, dev, act_dtype, seed)) for seed in range(ROTATE)]
        for name in sets[0]:
            if wanted and name not in wanted:
                continue
            for r in bench_op(name, sets, dev, ns.warmup, repeats, not ns.no_compile, copy["gbps"]):
                r["setup"] = shp.name
                rows.append(r)
                print(f"  {shp.name} | {name} | {r['variant']}: " +
                      (f"{r['seconds']['median'] * 1e3:.3f} ms" if r.get("ok") else f"skipped ({r['why']})"),
                      file=sys.stderr, flush=True)
        del sets
    result = {"schema": 1, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m bench.kernels " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": info, "copy_bandwidth": copy,
              "config": {"repeats": repeats, "warmup": ns.warmup, "rotate_inputs": ROTATE,
                         "activation_dtype": str(act_dtype), "video_dtype": "float32",
                         "bytes": "fewest bytes: inputs read once, outputs written once"},
              "rows": rows}
    lines = [f"## Fused ops: {info['name']} (torch {info['torch']}, triton {info['triton']}, "
             f"native ext: {info['native_ext'].split(' (')[0]})",
             f"copy bandwidth {copy['gbps']:.1f} GB/s (read + write); forward only, median of {repeats}", "",
             "| setup | op | shape | variant | ms median (min–max) | GB/s | % of copy BW | vs eager ref |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['setup']} | {r['op']} | {r['shape']} | {r['variant']} | n/a: {r['why'][:70]} | | | |")
            continue
        ref = next(x for x in rows if x["setup"] == r["setup"] and x["op"] == r["op"] and x["variant"] == "eager ref")
        s = r["seconds"]
        lines.append(f"| {r['setup']} | {r['op']} | {r['shape']} | {r['variant']} | {s['median'] * 1e3:.3f} "
                     f"({s['min'] * 1e3:.3f}–{s['max'] * 1e3:.3f}) | {r['gbps']:.1f} | {r['pct_copy_bw']:.0%} | "
                     f"{ref['seconds']['median'] / s['median']:.2f}x |")
    print("\n".join(lines))
    path = result_path(ns.out, ns.name, "kernels", info)
    write_json(result, path)
    print(f"\nraw results: {path}")
    return result


if __name__ == "__main__":
    main()
