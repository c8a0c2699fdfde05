"""The plan's wall time on a GPU, estimated before any GPU runs it.

Per part: the device work of every step it runs at full size, as exact FLOPs (``vmae_fast.flops``:
the analytic MACs of each train step, the attention rule of ``attention_flops``) and bytes (every
parameter's AdamW and bf16-cast traffic; activations and the reference's attention scores at the
exact token counts of the masks), at datasheet rates (H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s
HBM3), times ``SAFETY``; plus the host time the part spends outside the device (``HOST_S``: model
builds, compilers, op-by-op counting in Python, a subprocess), stated as assumptions with why. The
device work is a small part of the total: on an H100 the check is bounded by its host time, so a
run's JSON records every part's measured seconds beside its estimate, to correct ``HOST_S``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from vmae_fast.config import config_for
from vmae_fast.flops import attention_flops, count_macs
from vmae_fast.masking import num_decoder_tokens, num_encoder_masked

from ..runner import Setup, param_count
from . import plan

# Measured steps reach a fraction of the datasheet rates: the goal is 45% MFU for our step, and
# the reference rows, small kernels and the first (compiling) calls run further from the peak.
SAFETY = 4.0
ADAMW_BYTES_PER_PARAM = 28  # fp32 parameter, gradient, two moments read; parameter and moments written
CAST_BYTES_PER_PARAM = 12  # bf16 weight cast: fp32 read, bf16 written, in forward and again in backward
# bf16 activation traffic per token, block and unit of width: the matmuls' inputs and outputs
# (15 widths with an MLP ratio of 4) and about 10 widths of elementwise ops (LayerNorm, GELU,
# residual adds), written and read once in forward and twice in backward (2 bytes x 5).
ACT_BYTES_PER_TOKEN_WIDTH = 25 * 2 * 3
SCORE_PASSES = 8  # the reference's naive attention: scores written, softmaxed, read, and twice in backward


@dataclass(frozen=True)
class Rates:
    name: str
    tflops: float  # dense bf16
    hbm_gbps: float


H100 = Rates("H100 SXM (989 TFLOP/s bf16, 3.35 TB/s)", 989.0, 3350.0)
H200 = Rates("H200 141GB (989 TFLOP/s bf16, 4.8 TB/s)", 989.0, 4800.0)
A100 = Rates("A100 80GB (312 TFLOP/s bf16, 2.0 TB/s)", 312.0, 2039.0)

HOST_S: dict[str, tuple[float, str]] = {
    "cuda_tests": (60.0, "pytest's start and collection (12 s on a 2-core CPU), Triton compiling each kernel "
                         "variant the 34 tests launch (1-2 s each)"),
    "kernels": (20.0, "Triton compiling the 3 fused kernels at 2 shapes; 4 input sets a shape made on the "
                      "host (a ViT-B b32 clip is 308 MB of float32) and copied to the device"),
    "dual_masking_vit_b": (45.0, "3 model builds; per cell (12) the FLOP counter and the exact memory count "
                                 "run op by op in Python, about 2 s"),
    "dual_masking_vit_g": (50.0, "ViT-g's 1.0B weights initialized on the host (about 15 s), 3 builds moving "
                                 "4 GB each, about 4 s of op-by-op counting per cell (6)"),
    "memory_count": (10.0, "a ViT-B build and one step counted op by op in Python"),
    "pretrain": (35.0, "96 small videos written, loader workers started (3 epochs), ViT-B built, the final "
                       "checkpoint with AdamW state (1.3 GB) written"),
    "attention": (5.0, "input creation and kernel selection per shape"),
    "torchcodec_cuda": (5.0, "100 frames rendered and encoded with libx264 (ultrafast), two decoders opened"),
}


def _masks(cfg, decoder_ratio: float, encoder_ratio: float = 0.9) -> tuple[int, int]:
    n_vis = cfg.num_tokens - num_encoder_masked(cfg.grid, encoder_ratio, "tube")
    return n_vis, num_decoder_tokens(cfg.grid, decoder_ratio, encoder_ratio, "tube")


@functools.lru_cache(maxsize=None)
def _params(arch: str, frames: int, img_size: int) -> int:
    """Exact: counted on the model built on the ``meta`` device."""
    return param_count(Setup(arch, frames, img_size))


def train_step(arch: str, batch: int, decoder_ratio: float, impl: str, ckpt: bool = False,
               frames: int = 16, img_size: int = 224) -> dict:
    """FLOPs and bytes of one train step (forward, backward, AdamW) of ``impl`` on ``batch`` clips."""
    cfg = config_for(arch, num_frames=frames, img_size=img_size)
    conv = "official" if impl.startswith("reference") else "vmae_fast"
    macs = count_macs(cfg, 0.9, decoder_ratio, conv)
    blocks = sum(v for k, v in macs.items() if k.startswith(("encoder_", "decoder_")) and k != "encoder_to_decoder")
    flops = batch * (6 * macs["total"] + (2 * blocks if ckpt else 0))  # checkpointing runs the blocks' forward again
    n_vis, n_dec = _masks(cfg, decoder_ratio)
    act = ACT_BYTES_PER_TOKEN_WIDTH * batch * (n_vis * cfg.embed_dim * cfg.depth
                                               + (n_vis + n_dec) * cfg.decoder_embed_dim * cfg.decoder_depth)
    params = _params(arch, frames, img_size)
    nbytes = params * (ADAMW_BYTES_PER_PARAM + CAST_BYTES_PER_PARAM) + act
    if impl.startswith("reference"):  # naive attention materializes the scores of every head
        scores = cfg.depth * cfg.num_heads * n_vis ** 2 + cfg.decoder_depth * cfg.decoder_num_heads * (n_vis + n_dec) ** 2
        nbytes += SCORE_PASSES * 2 * batch * scores
    return {"flops": flops, "bytes": nbytes}


def _item(label: str, count: int, flops: float, nbytes: float) -> dict:
    return {"label": label, "count": count, "flops": flops, "bytes": nbytes}


def _dual_masking_items(index: int, maskings) -> list[dict]:
    from ..dual_masking.plan import PRESETS

    setup = PRESETS["gpu"].setups[index][0]
    k = plan.DUAL_MASKING
    # per cell: the first step, warm-up, the timed repeats, the peak-memory step, the exact
    # count's step and the FLOP counter's step
    steps = 1 + max(0, k["warmup"] - 1) + k["repeats"] + 3
    items = []
    for r in maskings:
        for impl in PRESETS["gpu"].impls:
            w = train_step(setup.arch, setup.batch, r, impl, setup.ckpt, setup.frames, setup.img_size)
            items.append(_item(f"{setup.arch} b{setup.batch} decoder {r} {impl}", steps, w["flops"], w["bytes"]))
    return items


def work_items(part: str) -> list[dict]:
    """The device work ``part`` runs at full size: ``[{label, count, flops, bytes}]``."""
    from ..dual_masking.plan import PRESETS

    if part == "dual_masking_vit_b":
        return _dual_masking_items(0, PRESETS["gpu"].setups[0][1])
    if part == "dual_masking_vit_g":
        return _dual_masking_items(1, plan.DUAL_MASKING_VIT_G_MASKINGS)
    if part == "memory_count":  # a prime step and the counted one
        w = train_step("vit_base_patch16_224", 32, 0.5, "vmae_fast")
        return [_item("ViT-B b32 dual 0.5 vmae_fast", 2, w["flops"], w["bytes"])]
    if part == "pretrain":
        k = plan.PRETRAIN
        w = train_step("vit_base_patch16_224", k["batch"] * k["num_sample"], 0.5, "vmae_fast")
        return [_item("ViT-B pretrain step", k["steps"], w["flops"], w["bytes"])]
    if part == "kernels":
        return _kernel_items()
    if part == "attention":
        return _attention_items()
    return []  # cuda_tests, torchcodec_cuda: host-bound (HOST_S)


def _kernel_items() -> list[dict]:
    k = plan.KERNELS
    calls = k["warmup"] + k["repeats"]
    items = [_item("copy bandwidth (1 GiB read + written)", 13, 0, 2 * 2 ** 30)]
    for arch, batch in (("vit_base_patch16_224", 32), ("vit_giant_patch14_224", 8)):
        cfg = config_for(arch, num_frames=16, img_size=224)
        n_vis, n_dec = _masks(cfg, 0.5)
        P, Dd = cfg.cube_numel, cfg.decoder_embed_dim
        fewest = (batch * n_vis * P * 8  # gather: float32 cubes read and written
                  + batch * (n_vis * Dd * 2 + (n_vis + n_dec) * Dd * 4)  # decoder input
                  + batch * n_dec * P * 6)  # masked MSE: bf16 predictions, float32 targets
        items.append(_item(f"{arch} b{batch} fused ops", calls, 0, fewest))
        items.append(_item(f"{arch} b{batch} eager references (3x the fewest bytes)", calls, 0, 3 * fewest))
    return items


def _attention_items() -> list[dict]:
    k = plan.ATTENTION
    cfg = config_for("vit_base_patch16_224", num_frames=16, img_size=224)
    n_vis, _ = _masks(cfg, 0.5)
    items = []
    for label, n, heads, width in (("encoder", n_vis, cfg.num_heads, cfg.embed_dim),
                                   ("decoder dual 0.5", n_vis + _masks(cfg, 0.5)[1], cfg.decoder_num_heads,
                                    cfg.decoder_embed_dim),
                                   ("decoder encoder-only", n_vis + _masks(cfg, 0.0)[1], cfg.decoder_num_heads,
                                    cfg.decoder_embed_dim)):
        bh, d = k["batch"] * heads, width // heads
        fwd_bwd = attention_flops(bh, n, n, d) + attention_flops(bh, n, n, d, backward=True)
        calls = 2 * (k["warmup"] + k["repeats"]) + 1  # forward alone, forward + backward, the peak step
        # math (scores in memory) and SDPA with each of its kernels: 5 backends
        scores = SCORE_PASSES * 2 * bh * n * n
        items.append(_item(f"ViT-B {label} math", calls, fwd_bwd, scores))
        items.append(_item(f"ViT-B {label} SDPA kernels (4)", 4 * calls, fwd_bwd, 8 * k["batch"] * n * width * 2))
    return items


def estimate(rates: Rates = H100) -> dict:
    """Per part: the device work's ideal seconds, the estimate ``SAFETY`` x ideal + host, its
    share, whether it fits; the total with ``plan.STARTUP_S``, against ``plan.BUDGET_S``."""
    parts = {}
    for p in plan.PLAN:
        items = work_items(p.name)
        ideal = sum(i["count"] * (i["flops"] / (rates.tflops * 1e12) + i["bytes"] / (rates.hbm_gbps * 1e9))
                    for i in items)
        host, why = HOST_S[p.name]
        est = SAFETY * ideal + host
        parts[p.name] = {"flops": sum(i["count"] * i["flops"] for i in items),
                         "bytes": sum(i["count"] * i["bytes"] for i in items), "device_ideal_s": ideal,
                         "host_s": host, "host_why": why, "estimate_s": est, "share_s": p.share_s,
                         "fits_share": est <= p.share_s}
    total = plan.STARTUP_S + sum(x["estimate_s"] for x in parts.values())
    return {"rates": rates.name, "safety_factor": SAFETY, "startup_s": plan.STARTUP_S, "parts": parts,
            "total_s": total, "budget_s": plan.BUDGET_S, "under_budget": total < plan.BUDGET_S,
            "shares_total_s": plan.STARTUP_S + sum(p.share_s for p in plan.PLAN)}


def rates_for(info: dict) -> Rates | None:
    """The rates of the device ``info`` describes (its datasheet peaks), None when unknown."""
    tf, bw = info.get("bf16_dense_peak_tflops"), info.get("hbm_gbps")
    return Rates(info.get("name", "this GPU"), tf, bw) if tf and bw else None
