"""Shared helpers of the ops: ImageNet constants on a device, cube coordinates, switches."""
from __future__ import annotations

import contextlib

import torch

from .. import envs
from ..config import IMAGENET_MEAN, IMAGENET_STD


_kernels_override: bool | None = None


def kernels_enabled() -> bool:
    """Whether the fused ops run their kernels: ``use_kernels(...)`` where one is active, else
    ``VMAE_FAST_KERNELS`` (``0`` sends every op to its pure-PyTorch reference)."""
    return envs.VMAE_FAST_KERNELS if _kernels_override is None else _kernels_override


@contextlib.contextmanager
def use_kernels(enabled: bool):
    """Run the fused ops' kernels (``True``) or their references (``False``) inside the block,
    whatever ``VMAE_FAST_KERNELS`` says. Process-wide (not per thread), restored on exit."""
    global _kernels_override
    saved, _kernels_override = _kernels_override, bool(enabled)
    try:
        yield
    finally:
        _kernels_override = saved


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def imagenet_stats(device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` float32 ``(3,)`` tensors on ``device``, made once per device (no
    per-step host-to-device copy)."""
    device = torch.device(device)
    stats = _STATS.get(device)
    if stats is None:
        stats = (torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device),
                 torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device))
        # made while torch.export / torch.onnx.export trace, they are fake tensors: kept, they
        # would be returned to every later eager call (whose outputs then are fake too)
        if not any(isinstance(t, torch._subclasses.fake_tensor.FakeTensor) for t in stats):
            _STATS[device] = stats
    return stats


def normalize_uint8(x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """A uint8 clip (0..255) in float32 as the model sees it: ``(x / 255 - mean) / std`` with the
    ImageNet statistics along ``channel_dim`` (1 for ``(B, C, T, H, W)``). The one definition:
    the references, the classifier and the bench call it; the kernels compute the same values."""
    mean, std = imagenet_stats(x.device)
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return (x.float() / 255 - mean.view(shape)) / std.view(shape)


def check_tensors(**named: object) -> None:
    """``TypeError`` naming the first argument that is not a ``torch.Tensor``: every public op
    calls it before anything else (a list would otherwise surface as an ``AttributeError`` on
    ``.requires_grad`` or ``.shape``, deep inside)."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_video(video: torch.Tensor, tubelet: int, patch: int) -> tuple[int, int, int, int, int]:
    """Validate a clip ``(B, C, T, H, W)`` against the cube size; returns its shape."""
    check_tensors(video=video)
    if video.dim() != 5:
        raise ValueError(f"video must be a (B, C, T, H, W) tensor, got {tuple(video.shape)}")
    B, C, T, H, W = video.shape
    if T % tubelet or H % patch or W % patch:
        raise ValueError(f"video of shape {tuple(video.shape)} does not divide into cubes of "
                         f"{tubelet}x{patch}x{patch} (T % {tubelet}, H % {patch}, W % {patch} must be 0)")
    if not (video.is_floating_point() or video.dtype == torch.uint8):
        raise ValueError(f"video must be floating point (normalized) or uint8 (0..255), got {video.dtype}")
    return B, C, T, H, W


def check_index(idx: torch.Tensor, batch: int, num_tokens: int, name: str) -> None:
    """Shape/dtype checks always; value bounds on CPU (free) or with ``VMAE_FAST_DEBUG=1`` (a
    device sync, so never by default on GPU), not while torch.compile traces (the fused ops'
    launchers check again when they run)."""
    check_tensors(**{name: idx})
    if idx.dim() != 2 or idx.shape[0] != batch:
        raise ValueError(f"{name} must be a ({batch}, n) integer tensor, got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 or int32, got {idx.dtype}")
    if torch.compiler.is_compiling():  # a value check would be data-dependent; the ops re-check at run time
        return
    if idx.numel() and (idx.device.type == "cpu" or envs.VMAE_FAST_DEBUG):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"{name} holds token indices in [{lo}, {hi}], expected [0, {num_tokens})")
