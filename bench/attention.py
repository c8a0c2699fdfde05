"""The attention backends at the encoder and decoder shapes of each arch.

    python -m bench.attention [--device cpu|cuda] [--arch vit_b,vit_g] [--batch N]

Forward + backward of ``vmae_fast.attention.attention`` per backend (``math``: the official
naive attention; ``sdpa`` and, on CUDA, each SDPA kernel forced alone; ``flash_attn`` /
``xformers`` when installed). Reports ms, TFLOP/s (forward 4·B·H·N²·d, backward 2x that; no
recompute counted) and the peak memory the call adds.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from vmae_fast.attention import attention, why_not
from vmae_fast.config import config_for
from vmae_fast.device import select_device
from vmae_fast.errors import check_at_least
from vmae_fast.flops import attention_flops
from vmae_fast.masking import num_decoder_tokens

from .common import device as devmod
from .common.cli import add_arch_arg, add_device_arg, add_output_args, check_timing_counts, make_parser, parse_plan
from .common.output import result_header, save_result
from .common.timing import PeakMemory, time_fn
from .runner import DTYPES, short_arch


def attn_shapes(arch: str, batch: int) -> list[dict]:
    """Encoder (visible tokens) and decoder shapes (dual 0.5 and encoder-only) of ``arch`` 16x224."""
    cfg = config_for(arch, num_frames=16, img_size=224)
    n = cfg.num_tokens
    masked = num_decoder_tokens(cfg.grid, 0.0)  # encoder-only: every masked token
    nv = n - masked
    nd_dual = num_decoder_tokens(cfg.grid, 0.5)
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


def _parser():
    p = make_parser("attention", __doc__)
    add_device_arg(p)
    add_arch_arg(p, "comma list of models", "vit_b,vit_g", many="comma")
    p.add_argument("--batch", type=int, help="default 32 (ViT-B) / 8 (ViT-g) on GPU, 1 on CPU")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, help="default 30 on GPU, 5 on CPU")
    add_output_args(p, "attention-<device>-<date>")
    return p


def plan(ns) -> dict:
    dev = select_device(ns.device)  # cuda:N also becomes the current device
    check_at_least(ns, {"batch": 1})
    check_timing_counts(ns)
    return {"device": dev, "archs": ns.arch, "dtype": DTYPES[ns.dtype or ("bf16" if dev.type == "cuda" else "fp32")],
            "repeats": ns.repeats or (30 if dev.type == "cuda" else 5)}


def measure_variant(row: dict, backend: str, ctx, qkv, grad, dev, warmup: int, repeats: int) -> dict:
    """Forward, and forward + backward, of one backend at one shape (``row``), under ``ctx`` (entered
    once, outside the timed calls)."""
    why = why_not(backend, qkv)
    if why is not None:
        return {**row, "ok": False, "why": why}

    def step():
        qkv.grad = None
        attention(qkv, backend).backward(grad)

    B, N, H, d = row["B"], row["N"], row["H"], row["d"]
    fwd_flops = attention_flops(B * H, N, N, d)
    try:
        with ctx():
            with torch.no_grad():
                fwd = time_fn(lambda: attention(qkv, backend), dev, warmup=warmup, repeats=repeats)
            both = time_fn(step, dev, warmup=warmup, repeats=repeats)
            with PeakMemory(dev) as mem:
                step()
        return {**row, "ok": True, "fwd_s": fwd.to_dict(), "fwd_bwd_s": both.to_dict(),
                "fwd_tflops": fwd_flops / fwd.median / 1e12,
                "fwd_bwd_tflops": (fwd_flops + attention_flops(B * H, N, N, d, backward=True)) / both.median / 1e12,
                "peak_mem_delta_bytes": mem.delta, "memory_kind": mem.kind}
    except Exception as exc:  # a kernel that rejects the shape/dtype, OOM
        return {**row, "ok": False, "why": f"{type(exc).__name__}: {exc}"[:200]}


def measure_shape(arch: str, shp: dict, pl: dict, warmup: int) -> list[dict]:
    """Every backend (and, on CUDA, every SDPA kernel forced alone) at one shape."""
    from torch.nn.attention import sdpa_kernel

    dev, dtype = pl["device"], pl["dtype"]
    B, N, H, d = shp["B"], shp["N"], shp["H"], shp["d"]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(dev, dtype).requires_grad_(True)
    grad = torch.randn(B, N, H * d, generator=g).to(dev, dtype)
    variants = [(b, b, contextlib.nullcontext) for b in ("math", "sdpa", "flash_attn", "xformers")]
    variants += [(label, "sdpa", (lambda k=k: sdpa_kernel([k]))) for label, k in sdpa_kernels(dev)]
    rows = []
    for label, backend, ctx in variants:
        row = {"arch": arch, **shp, "backend": label, "dtype": str(dtype).replace("torch.", "")}
        rows.append(measure_variant(row, backend, ctx, qkv, grad, dev, warmup, pl["repeats"]))
        print(f"  {short_arch(arch)} {shp['where']} | {label}: " +
              (f"{rows[-1]['fwd_bwd_s']['median'] * 1e3:.2f} ms" if rows[-1]["ok"] else rows[-1]["why"]),
              file=sys.stderr, flush=True)
    return rows


def _mem_cell(r: dict) -> str:
    if r["peak_mem_delta_bytes"] is not None:
        return f"{r['peak_mem_delta_bytes'] / 2**20:,.0f} MiB"
    if r.get("memory_kind") == "rss_vmhwm":  # bench.common.timing.PeakMemory on the CPU
        return "n/a: the resident set did not grow (memory reused) or its peak cannot be reset here"
    return "n/a: no peak reading on this device"


def render(rows: list[dict], info: dict, dtype: torch.dtype) -> str:
    lines = [f"## Attention backends: {info['name']} (torch {info['torch']}, {str(dtype).replace('torch.', '')})", "",
             "| arch | where | B x N x H x d | backend | fwd ms | fwd+bwd ms (min–max) | fwd+bwd TFLOP/s | mem added |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {short_arch(r['arch'])} | {r['where']} | {r['B']}x{r['N']}x{r['H']}x{r['d']} | {r['backend']} | "
        if not r["ok"]:
            lines.append(head + f"n/a: {r['why'][:60]} | | | |")
            continue
        s = r["fwd_bwd_s"]
        mem = _mem_cell(r)
        lines.append(head + f"{r['fwd_s']['median'] * 1e3:.2f} | {s['median'] * 1e3:.2f} ({s['min'] * 1e3:.2f}–"
                     f"{s['max'] * 1e3:.2f}) | {r['fwd_bwd_tflops']:.2f} | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ns, pl = parse_plan(_parser(), argv, plan)
    dev = pl["device"]
    info = devmod.device_info(dev)
    rows = []
    for arch in pl["archs"]:
        batch = ns.batch or ((8 if "giant" in arch else 32) if dev.type == "cuda" else 1)
        for shp in attn_shapes(arch, batch):
            rows += measure_shape(arch, shp, pl, ns.warmup)
    print(render(rows, info, pl["dtype"]))
    result = {**result_header("attention", argv, device=info),
              "config": {"repeats": pl["repeats"], "warmup": ns.warmup, "dtype": str(pl["dtype"])}, "rows": rows}
    save_result(result, ns, "attention")
    return result


if __name__ == "__main__":
    main()
