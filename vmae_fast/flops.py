"""Analytic FLOP counting: forward multiply-accumulates per clip (docs/semantics.md §8).

``convention="official"`` counts what the official code computes, as fvcore counts it (the
paper's Table 2): the patch embedding on all ``N`` tokens, every Linear and attention matmul,
and LayerNorm at 5 per element (fvcore's estimate; softmax, GELU, adds are not counted).
``convention="vmae_fast"`` counts what our forward pass computes: the same, but the patch
embedding only on encoder-visible cubes.
"""
from __future__ import annotations

from .config import VideoMAEConfig, config_for
from .masking import num_decoder_tokens, num_encoder_masked

CONVENTIONS = ("official", "vmae_fast")

# Dense bf16 tensor-core peaks in TFLOP/s (datasheets, no 2:4 sparsity), matched on the CUDA device
# name, most specific first: the denominator of MFU for the bench and the training loop.
BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("A100", 312.0),
)


# HBM bandwidth in GB/s (datasheets), matched the same way: the denominator of "near HBM
# bandwidth" for memory-bound kernels, and the byte rate of a plan's time estimate.
HBM_GBPS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),  # 141 GB HBM3e
    ("H100 PCIe", 2000.0),  # HBM2e
    ("H100", 3350.0),  # SXM / HBM3
    ("A100 80GB PCIe", 1935.0),
    ("A100-SXM4-40GB", 1555.0),
    ("A100-PCIE-40GB", 1555.0),
    ("A100", 2039.0),  # 80 GB SXM
)


def _by_name(table: tuple[tuple[str, float], ...], device_name: str) -> float | None:
    for key, value in table:
        if key.lower() in device_name.lower():
            return value
    return None


def datasheet_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense datasheet peak of a CUDA device by its name, None when unknown."""
    return _by_name(BF16_DENSE_PEAK_TFLOPS, device_name)


def datasheet_hbm_gbps(device_name: str) -> float | None:
    """The datasheet HBM bandwidth (GB/s) of a CUDA device by its name, None when unknown."""
    return _by_name(HBM_GBPS, device_name)


LN_MACS_PER_ELEMENT = 5


def _blocks(n_tokens: int, dim: int, hidden: int, depth: int) -> dict[str, int]:
    linear = n_tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)
    attn = 2 * n_tokens * n_tokens * dim  # q @ k^T and attn @ v over all heads
    norm = 2 * n_tokens * dim * LN_MACS_PER_ELEMENT
    return {"linear": depth * linear, "attn": depth * attn, "norm": depth * norm}


def count_macs(cfg: VideoMAEConfig, encoder_ratio: float = 0.9, decoder_ratio: float = 0.5,
               convention: str = "official", encoder_mask_type: str = "tube") -> dict[str, int]:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    n = cfg.num_tokens
    n_masked = num_encoder_masked(cfg.grid, encoder_ratio, encoder_mask_type)
    n_vis = n - n_masked
    n_dec = num_decoder_tokens(cfg.grid, decoder_ratio, encoder_ratio, encoder_mask_type)
    D, Dd, P = cfg.embed_dim, cfg.decoder_embed_dim, cfg.cube_numel
    enc = _blocks(n_vis, D, cfg.mlp_hidden, cfg.depth)
    dec = _blocks(n_vis + n_dec, Dd, cfg.decoder_mlp_hidden, cfg.decoder_depth)
    embedded = n if convention == "official" else n_vis
    parts = {
        "patch_embed": embedded * P * D,
        "encoder_linear": enc["linear"],
        "encoder_attn": enc["attn"],
        "encoder_norm": enc["norm"] + n_vis * D * LN_MACS_PER_ELEMENT,
        "encoder_to_decoder": n_vis * D * Dd,
        "decoder_linear": dec["linear"],
        "decoder_attn": dec["attn"],
        "decoder_norm": dec["norm"] + n_dec * Dd * LN_MACS_PER_ELEMENT,
        "head": n_dec * Dd * P,
    }
    parts["total"] = sum(parts.values())
    return parts


def pretrain_macs(arch: str, *, num_frames: int = 16, img_size: int = 224, encoder_ratio: float = 0.9,
                  decoder_ratio: float = 0.5, decoder_depth: int = 4, convention: str = "official",
                  encoder_mask_type: str = "tube", **overrides) -> dict[str, int]:
    """Forward MACs per clip of pretraining ``arch``: ``{'total': ..., 'patch_embed': ..., ...}``.

    ``decoder_ratio=0`` is encoder-only masking (the decoder sees every encoder-masked token).
    """
    cfg = config_for(arch, num_frames=num_frames, img_size=img_size, decoder_depth=decoder_depth, **overrides)
    return count_macs(cfg, encoder_ratio, decoder_ratio, convention, encoder_mask_type)


def encoder_macs(cfg: VideoMAEConfig) -> int:
    """Forward MACs per clip of the fine-tuning encoder on all tokens (no head)."""
    n = cfg.num_tokens
    b = _blocks(n, cfg.embed_dim, cfg.mlp_hidden, cfg.depth)
    return n * cfg.cube_numel * cfg.embed_dim + b["linear"] + b["attn"] + b["norm"]


# ------------------------------------------------------------------ counted FLOPs (torch's counter)
def attention_flops(batch_heads: int, n_q: int, n_kv: int, head_dim: int, head_dim_v: int | None = None,
                    backward: bool = False) -> int:
    """FLOPs of one attention call: ``q @ k^T`` and ``attn @ v`` (2 per MAC; softmax not
    counted), the convention of ``count_macs``'s attention terms. The backward is twice the
    forward: the four gradient matmuls (a fused kernel's recompute of the scores is not model
    work and is not counted)."""
    dv = head_dim if head_dim_v is None else head_dim_v
    fwd = 2 * batch_heads * n_q * n_kv * (head_dim + dv)
    return 2 * fwd if backward else fwd


# Fused attention kernels whose q/k/v layout is known: (B, H, N, d) for aten's SDPA kernels,
# (B, N, H, d) for the others. The math SDPA is left out: it decomposes into matmuls that torch
# counts itself, so counting it here too could count it twice.
_ATTENTION_LAYOUTS = (("aten._scaled_dot_product_", "bhnd"), ("aten._flash_attention_", "bnhd"),
                      ("aten._efficient_attention_", "bnhd"), ("flash_attn", "bnhd"), ("xformers", "bnhd"))


def _is_attention_op(name: str) -> bool:
    return "attention" in name or "attn" in name


def _attention_call_flops(name: str, args) -> int | None:
    """FLOPs of one call of the attention op ``name`` from its q/k/v shapes; ``None`` for an op
    of unknown layout or whose arguments are not dense 4-d q, k, v (varlen/packed)."""
    import torch

    layout = next((lay for prefix, lay in _ATTENTION_LAYOUTS if name.startswith(prefix)), None)
    if layout is None or "math" in name:
        return None
    backward = "backward" in name or "bwd" in name
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    qkv = tensors[1:4] if backward else tensors[:3]  # backward ops take grad_out first
    if len(qkv) != 3 or any(t.dim() != 4 for t in qkv):
        return None
    q, k, v = qkv
    if layout == "bhnd":
        bh, n_q, n_kv = q.shape[0] * q.shape[1], q.shape[2], k.shape[2]
    else:
        bh, n_q, n_kv = q.shape[0] * q.shape[2], q.shape[1], k.shape[1]
    return attention_flops(bh, n_q, n_kv, q.shape[-1], v.shape[-1], backward=backward)


def counted_flops(fn, *args, **kwargs) -> tuple[int, list[str]]:
    """``(flops, missed_ops)`` of ``fn(*args, **kwargs)``: ``torch.utils.flop_counter``'s count,
    with attention counted by ``attention_flops`` on every torch build.

    Why attention is not taken from torch as it is: some builds count no FLOPs for some attention
    kernels (2.14 has no formula for the CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu``
    nor its backward; no build knows the ``flash_attn``/``xformers`` ops), and the builds that do
    count a fused kernel's backward differently (recent ones add the score matrix the flash
    backward recomputes: 2.5x the forward instead of 2x). Every attention call is therefore
    recorded with its q/k/v and counted with the rule of ``count_macs``'s attention terms, so a
    model counts the same with SDPA as with the explicit matmuls of the ``math`` backend, and the
    same on every build. ``missed_ops`` names the attention ops torch's counter left at zero
    (``" (not filled)"`` for an op of unknown layout or unreadable arguments: such an op keeps
    torch's count, here none). Everything else is torch's count; calls are counted where they
    run, so the recomputation of activation checkpointing counts too."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    calls: dict[str, list[int | None]] = {}

    class _RecordAttention(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            name = str(getattr(func, "_overloadpacket", func))
            if _is_attention_op(name):
                calls.setdefault(name, []).append(_attention_call_flops(name, a))
            return func(*a, **(kw or {}))

    with FlopCounterMode(display=False) as fc, _RecordAttention():
        fn(*args, **kwargs)
    by_torch = {str(k): v for k, v in fc.get_flop_counts().get("Global", {}).items()}
    total, missed = int(fc.get_total_flops()), []
    for name, flops in calls.items():
        readable = None not in flops
        if by_torch.get(name, 0) == 0:
            missed.append(name if readable else name + " (not filled)")
        if readable:
            total += sum(flops) - by_torch.get(name, 0)
    return total, missed
