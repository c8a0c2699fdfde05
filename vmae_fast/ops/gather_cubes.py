"""Cube gather: the cubes at ``idx`` of a clip, flattened for the patch embedding or the target."""
from __future__ import annotations

import torch

from ._common import check_index, check_video, imagenet_stats

LAYOUTS = ("cthw", "thwc")


def gather_cubes_ref(video: torch.Tensor, idx: torch.Tensor, *, tubelet: int, patch: int,
                     layout: str = "cthw") -> torch.Tensor:
    """Reference cube gather.

    Args:
        video: ``(B, C, T, H, W)`` float (already normalized) or uint8 (0..255; normalized here
            with the ImageNet mean/std as ``(x / 255 - mean) / std``).
        idx: ``(B, n)`` token indices in ``(t, h, w)`` raster order.
        layout: ``"cthw"`` (Conv3d weight order, for the patch embedding) or ``"thwc"``
            (target order).
    Returns:
        ``(B, n, C*t*p*p)``, the video's dtype (float32 for uint8 input).

    Equivalent PyTorch code::

        cubes = rearrange(video, 'b c (T t) (H p) (W q) -> b (T H W) c t p q', t=t, p=p, q=p)
        cubes = cubes[arange(B)[:, None], idx]            # (B, n, c, t, p, p)
        if layout == 'thwc': cubes = cubes.permute(0, 1, 3, 4, 5, 2)
        cubes.flatten(2)
    """
    cubes = gather_cubes_raw(video, idx, tubelet=tubelet, patch=patch)
    if video.dtype == torch.uint8:
        mean, std = imagenet_stats(video.device)
        C = video.shape[1]
        cubes = (cubes.float() / 255 - mean.view(C, 1, 1, 1)) / std.view(C, 1, 1, 1)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "thwc":
        cubes = cubes.permute(0, 1, 3, 4, 5, 2)
    return cubes.reshape(idx.shape[0], idx.shape[1], -1)


def gather_cubes_raw(video: torch.Tensor, idx: torch.Tensor, *, tubelet: int, patch: int) -> torch.Tensor:
    """The cubes at ``idx`` as stored, ``(B, n, C, t, p, p)``, no conversion."""
    B, C, T, H, W = check_video(video, tubelet, patch)
    Tt, Hp, Wp = T // tubelet, H // patch, W // patch
    check_index(idx, B, Tt * Hp * Wp, "idx")
    v = video.unflatten(4, (Wp, patch)).unflatten(3, (Hp, patch)).unflatten(2, (Tt, tubelet))
    idx = idx.long()
    hw = Hp * Wp
    ti, rem = idx // hw, idx % hw
    hi, wi = rem // Wp, rem % Wp
    b = torch.arange(B, device=video.device)[:, None]
    # Advanced indices separated by slices: the index dims (B, n) lead, then (C, t, p, p).
    return v[b, :, ti, :, hi, :, wi, :]


def gather_cubes(video: torch.Tensor, idx: torch.Tensor, *, tubelet: int, patch: int,
                 layout: str = "cthw") -> torch.Tensor:
    """Dispatching cube gather (see ``gather_cubes_ref`` for the contract)."""
    return gather_cubes_ref(video, idx, tubelet=tubelet, patch=patch, layout=layout)
