"""The attention backends at the encoder and decoder shapes of each arch.

    python -m bench.attention [--device cpu|cuda] [--arch vit_b,vit_g] [--batch N]

Forward + backward of ``vmae_fast.attention.attention`` per backend (``math``: the official
naive attention; ``sdpa`` and, on CUDA, each SDPA kernel forced alone; ``flash_attn`` /
``xformers`` when installed). Reports ms, TFLOP/s (forward 4·B·H·N²·d, backward 2x that; no
recompute counted) and the peak memory the call adds.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import sys
from pathlib import Path

import torch

from vmae_fast.attention import attention, why_not
from vmae_fast.config import config_for
from vmae_fast.masking import cell_masked_slots, num_encoder_masked

from . import device as devmod
from vmae_fast.config import ARCH_ALIASES

from .dual_masking import _arch
from .output import result_path, write_json
from .runner import short_arch
from .timing import PeakMemory, time_fn

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def attn_shapes(arch: str, batch: int) -> list[dict]:
    """Encoder (visible tokens) and decoder shapes (dual 0.5 and encoder-only) of ``arch`` 16x224."""
    cfg = config_for(arch, num_frames=16, img_size=224)
    n = cfg.num_tokens
    masked = num_encoder_masked(cfg.grid, 0.9)
    nv = n - masked
    nd_dual = n * (4 - cell_masked_slots(0.5)) // 4
    dh = cfg.decoder_embed_dim // cfg.decoder_num_heads
    return [
        dict(where="encoder", B=batch, N=nv, H=cfg.num_heads, d=cfg.embed_dim // cfg.num_heads),
        dict(where="decoder dual 0.5", B=batch, N=nv + nd_dual, H=cfg.decoder_num_heads, d=dh),
        dict(where="decoder encoder-only", B=batch, N=nv + masked, H=cfg.decoder_num_heads, d=dh),
    ]


def sdpa_kernels(device: torch.device) -> list[tuple[str, object]]:
    if device.type != "cuda":
        return []
    from torch.nn.attention import SDPBackend

    return [(f"sdpa[{n}]", getattr(SDPBackend, k)) for n, k in
            (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"))
            if hasattr(SDPBackend, k)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    ap.add_argument("--arch", default=None, help=f"comma list (default vit_b,vit_g); {sorted(ARCH_ALIASES)}")
    ap.add_argument("--batch", type=int, help="default 32 (ViT-B) / 8 (ViT-g) on GPU, 1 on CPU")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, help="default 30 on GPU, 5 on CPU")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--name")
    ns = ap.parse_args(argv)
    try:
        dev = devmod.select_device(ns.device)  # cuda:N also becomes the current device
    except ValueError as exc:
        ap.error(str(exc))
    try:
        archs = [_arch(a) for a in (ns.arch or "vit_b,vit_g").split(",")]
    except ValueError as exc:
        ap.error(str(exc))
    if ns.batch is not None and ns.batch < 1:
        ap.error(f"--batch must be >= 1, got {ns.batch}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        ns.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    repeats = ns.repeats or (30 if dev.type == "cuda" else 5)
    info = devmod.device_info(dev)
    rows = []
    for arch in archs:
        batch = ns.batch or ((8 if "giant" in arch else 32) if dev.type == "cuda" else 1)
        for shp in attn_shapes(arch, batch):
            B, N, H, d = shp["B"], shp["N"], shp["H"], shp["d"]
            g = torch.Generator().manual_seed(0)
            qkv = torch.randn(B, N, 3, H, d, generator=g).to(dev, dtype).requires_grad_(True)
            grad = torch.randn(B, N, H * d, generator=g).to(dev, dtype)
            fwd_flops = 4 * B * H * N * N * d
            variants = [(b, b, contextlib.nullcontext) for b in ("math", "sdpa", "flash_attn", "xformers")]
            from torch.nn.attention import sdpa_kernel

            variants += [(label, "sdpa", (lambda k=k: sdpa_kernel([k]))) for label, k in sdpa_kernels(dev)]
            for label, backend, ctx in variants:
                row = {"arch": arch, **shp, "backend": label, "dtype": str(dtype).replace("torch.", "")}
                why = why_not(backend, qkv)
                if why is not None:
                    rows.append({**row, "ok": False, "why": why})
                    continue

                def step():
                    qkv.grad = None
                    with ctx():
                        attention(qkv, backend).backward(grad)
                try:
                    with ctx():
                        with torch.no_grad():
                            fwd = time_fn(lambda: attention(qkv, backend), dev, warmup=ns.warmup, repeats=repeats)
                    both = time_fn(step, dev, warmup=ns.warmup, repeats=repeats)
                    with PeakMemory(dev) as mem:
                        step()
                    rows.append({**row, "ok": True, "fwd_s": fwd.to_dict(), "fwd_bwd_s": both.to_dict(),
                                 "fwd_tflops": fwd_flops / fwd.median / 1e12,
                                 "fwd_bwd_tflops": 3 * fwd_flops / both.median / 1e12,
                                 "peak_mem_delta_bytes": mem.delta, "memory_kind": mem.kind})
                except Exception as exc:  # a kernel that rejects the shape/dtype, OOM
                    rows.append({**row, "ok": False, "why": f"{type(exc).__name__}: {exc}"[:200]})
                print(f"  {short_arch(arch)} {shp['where']} | {label}: " +
                      (f"{rows[-1]['fwd_bwd_s']['median'] * 1e3:.2f} ms" if rows[-1]["ok"] else rows[-1]["why"]),
                      file=sys.stderr, flush=True)
    lines = [f"## Attention backends: {info['name']} (torch {info['torch']}, {str(dtype).replace('torch.', '')})", "",
             "| arch | where | B x N x H x d | backend | fwd ms | fwd+bwd ms (min–max) | fwd+bwd TFLOP/s | mem added |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {short_arch(r['arch'])} | {r['where']} | {r['B']}x{r['N']}x{r['H']}x{r['d']} | {r['backend']} | "
        if not r["ok"]:
            lines.append(head + f"n/a: {r['why'][:60]} | | | |")
            continue
        s = r["fwd_bwd_s"]
        mem = "n/a" if r["peak_mem_delta_bytes"] is None else f"{r['peak_mem_delta_bytes'] / 2**20:,.0f} MiB"
        lines.append(head + f"{r['fwd_s']['median'] * 1e3:.2f} | {s['median'] * 1e3:.2f} ({s['min'] * 1e3:.2f}–"
                     f"{s['max'] * 1e3:.2f}) | {r['fwd_bwd_tflops']:.2f} | {mem} |")
    print("\n".join(lines))
    result = {"schema": 1, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m bench.attention " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": info, "config": {"repeats": repeats, "warmup": ns.warmup, "dtype": str(dtype)},
              "rows": rows}
    path = result_path(ns.out, ns.name, "attention", info)
    write_json(result, path)
    print(f"\nraw results: {path}")
    return result


if __name__ == "__main__":
    main()
