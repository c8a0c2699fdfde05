"""Attention backends behind one dispatch point.

``attention(qkv, backend)`` takes the packed projection ``(B, N, 3, H, d)`` and returns
``(B, N, H*d)``. Backends:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (the default). On CUDA it picks
  FlashAttention / cuDNN / memory-efficient kernels; on CPU its fused flash kernel.
- ``flash_attn``: the ``flash_attn`` package (CUDA, fp16/bf16) when importable.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA) when importable.
- ``math``: the naive ``softmax(q*scale @ k^T) @ v`` of the official code; the reference.
- ``cpu_bf16``: bf16 inference on a CPU (no gradients, no dropout): the math path one
  ``(batch, head)`` at a time in bf16 matmuls (``cpu_bf16_attention``). On CPUs with bf16 dot
  products but no AMX (e.g. AMD EPYC with ``avx512_bf16``), SDPA's CPU flash kernel runs bf16 no
  faster than fp32 while a bf16 matmul is ~5x faster than fp32 (ViT-B's MLP matmul, one thread:
  236-242 against 47-49 GMAC per CPU-s; the command: README, "Feature extraction speed"). ViT-B 16x224
  ``forward_features`` of one clip under bf16 autocast, one thread, 2-vCPU AMD EPYC (Zen 5): 1.80
  CPU s with SDPA, 1.27 with ``cpu_bf16`` (median of 5; the command: README, "Feature extraction
  speed"). The inference tools pick it on CPU under bf16
  (``vmae_fast.tools.common.inference_attention``).
- ``auto``: the first usable of ``AUTO_PRIORITY``.

The environment variable ``VMAE_FAST_ATTN`` overrides the backend a model was built with.
A backend that is missing or cannot run the given inputs raises ``AttentionBackendError``
naming every candidate and why it was rejected.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from . import envs

BACKENDS = ("sdpa", "flash_attn", "xformers", "math", "cpu_bf16")
# flash_attn first: where it is installed it is the newer FlashAttention build; SDPA covers
# the rest (its CUDA flash/cuDNN kernels, and its CPU kernel). xformers is never picked by
# "auto": SDPA already ships the same memory-efficient kernel.
AUTO_PRIORITY = ("flash_attn", "sdpa")
ENV_VAR = "VMAE_FAST_ATTN"


class AttentionBackendError(RuntimeError):
    pass


def check_backend_name(name: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    return name


def effective_backend(requested: str) -> str:
    """The backend a module should use: ``$VMAE_FAST_ATTN`` if set, else ``requested``."""
    return check_backend_name(envs.VMAE_FAST_ATTN or requested)


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def why_not(backend: str, qkv: torch.Tensor) -> str | None:
    """``None`` if ``backend`` can run on ``qkv``, else the reason it cannot."""
    head_dim = qkv.shape[-1]
    if backend in ("sdpa", "math"):
        return None
    if backend == "flash_attn":
        if not _importable("flash_attn"):
            return "package flash_attn is not installed"
        if qkv.device.type != "cuda":
            return f"needs a CUDA tensor, got device {qkv.device.type}"
        if qkv.dtype not in (torch.float16, torch.bfloat16):
            return f"needs fp16/bf16 inputs, got {qkv.dtype} (run under autocast)"
        if head_dim % 8 or head_dim > 256:
            return f"needs head_dim a multiple of 8 and <= 256, got {head_dim}"
        return None
    if backend == "cpu_bf16":
        if qkv.device.type != "cpu":
            return f"needs a CPU tensor, got device {qkv.device.type}"
        if qkv.dtype != torch.bfloat16:
            return f"needs bf16 inputs, got {qkv.dtype} (run under autocast or cast the model)"
        if torch.is_grad_enabled() and qkv.requires_grad:
            return "inference only: the inputs require gradients"
        return None
    if backend == "xformers":
        if not _importable("xformers"):
            return "package xformers is not installed"
        if qkv.device.type != "cuda":
            return f"needs a CUDA tensor, got device {qkv.device.type}"
        return None
    return f"unknown backend {backend!r}"


def resolve(requested: str, qkv: torch.Tensor) -> str:
    candidates = AUTO_PRIORITY if requested == "auto" else (check_backend_name(requested),)
    reasons = {}
    for name in candidates:
        reason = why_not(name, qkv)
        if reason is None:
            return name
        reasons[name] = reason
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise AttentionBackendError(
        f"attention backend {requested!r} cannot run inputs of shape {tuple(qkv.shape)}, "
        f"dtype {qkv.dtype}, device {qkv.device.type} ({detail}). Use 'sdpa' or 'math', "
        f"or set {ENV_VAR}.")


def attention(qkv: torch.Tensor, backend: str = "sdpa", scale: float | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head attention of a packed projection.

    Args:
        qkv: ``(B, N, 3, H, d)``, the ``qkv`` Linear output viewed per head.
        backend: one of ``BACKENDS`` or ``"auto"``.
        scale: softmax scale, default ``d ** -0.5``.
        dropout_p: dropout on the attention probabilities (the official ``attn_drop``; pass 0
            outside training), in each backend's own way.
    Returns:
        ``(B, N, H*d)``.

    Equivalent PyTorch code::

        q, k, v = qkv.permute(2, 0, 3, 1, 4)          # (B, H, N, d) each
        attn = (q * scale) @ k.transpose(-2, -1)
        out = dropout(attn.softmax(-1)) @ v           # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, H * d)
    """
    B, N, three, H, d = qkv.shape
    if three != 3:
        raise ValueError(f"qkv must have shape (B, N, 3, H, d), got {tuple(qkv.shape)}")
    scale = d ** -0.5 if scale is None else scale
    name = resolve(backend, qkv)
    if name == "sdpa":
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2).reshape(B, N, H * d)
    if name == "math":
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if dropout_p > 0:
            attn = F.dropout(attn, dropout_p, True)
        return (attn @ v).transpose(1, 2).reshape(B, N, H * d)
    if name == "cpu_bf16":
        if dropout_p > 0:
            raise AttentionBackendError("attention backend 'cpu_bf16' is for inference: it has no dropout")
        return cpu_bf16_attention(qkv, scale)
    if name == "flash_attn":
        from flash_attn import flash_attn_qkvpacked_func

        return flash_attn_qkvpacked_func(qkv, dropout_p=dropout_p, softmax_scale=scale).reshape(B, N, H * d)
    # xformers
    from xformers.ops import memory_efficient_attention

    q, k, v = qkv.unbind(2)
    return memory_efficient_attention(q, k, v, p=dropout_p, scale=scale).reshape(B, N, H * d)


# Keys sampled to estimate each query's largest logit (``cpu_bf16_attention``): every 8th.
LOGIT_SHIFT_STRIDE = 8


def cpu_bf16_attention(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q*scale @ k^T) @ v`` in bf16 matmuls, one ``(batch, head)`` at a time, so that
    the ``N x N`` scores of one head (4.9 MB at N = 1568) stay in cache. ``(B, N, 3, H, d)`` ->
    ``(B, N, H*d)``.

    A bf16 matmul rounds its fp32 sums to bf16 on output: a logit ``s`` loses ``2**-9 * |s|``,
    which a softmax turns into that relative error of its probability (SDPA's flash kernel keeps
    the logits in fp32). The logits are therefore computed shifted, ``addmm(-m, q, k^T)`` rounded
    once after the shift, with ``m`` each query's largest logit over every 8th key: near the
    maximum, where the probabilities are, the rounded values are small. Softmax is exact under any
    shift, so ``m`` only decides the precision (bf16 rounding of ``s - m``), never the value."""
    B, N, _, H, d = qkv.shape
    q, k, v = qkv.unbind(2)  # (B, N, H, d) views
    out = torch.empty(B, N, H, d, dtype=qkv.dtype, device=qkv.device)
    for b in range(B):
        for h in range(H):
            qs = q[b, :, h] * scale
            kt = k[b, :, h].t()
            shift = torch.mm(qs, kt[:, ::LOGIT_SHIFT_STRIDE]).amax(-1, keepdim=True).neg_()
            logits = torch.addmm(shift, qs, kt)
            out[b, :, h] = torch.mm(torch.softmax(logits, -1), v[b, :, h])
    return out.view(B, N, H * d)
