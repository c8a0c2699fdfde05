"""Cube gather: the cubes at ``idx`` of a clip, flattened for the patch embedding or the target.

The fused op reads only the cubes at ``idx`` straight from the clip ``(B, C, T, H, W)`` (any
strides) into a contiguous ``(B, n, C*t*p*p)``: one Triton program per cube, walking it as
``C*t*p`` runs of ``p`` pixels contiguous along W (coalesced loads), writing the row in Conv3d
weight order (``cthw``) or target order (``thwc``). A uint8 clip is normalized in registers.
No gradient flows to the clip: a clip that requires grad takes the reference.
"""
from __future__ import annotations

import torch

from ._common import (check_index, check_tensors, check_video, imagenet_stats, kernels_enabled,
                      normalize_uint8)
from ._dispatch import (HAS_TRITON, check_device, check_kernel_device, cube_origin, div_rn, launch, next_pow2,
                        register_kernels, revalidate)

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
    check_tensors(video=video, idx=idx)
    cubes = gather_cubes_raw(video, idx, tubelet=tubelet, patch=patch)
    if video.dtype == torch.uint8:
        cubes = normalize_uint8(cubes, channel_dim=2)  # (B, n, C, t, p, p)
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


# --------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_cubes_kernel(video_ptr, idx_ptr, out_ptr, mean_ptr, std_ptr,
                             n, Hp, Wp,
                             s_vb, s_vc, s_vt, s_vh, s_vw, s_ib, s_in,
                             C: tl.constexpr, TUB: tl.constexpr, PATCH: tl.constexpr,
                             THWC: tl.constexpr, UINT8: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
        # One program per output row (one cube). The cube is walked as (C*t*p) pixel rows of
        # p pixels: each pixel row is a contiguous run along W, so the loads coalesce.
        row = tl.program_id(0)
        _, _, base = cube_origin(idx_ptr, row, n, Hp, Wp, s_ib, s_in, s_vb, s_vt, s_vh, s_vw, TUB, PATCH)
        R: tl.constexpr = C * TUB * PATCH
        P: tl.constexpr = R * PATCH
        out_row = out_ptr + row.to(tl.int64) * P
        q = tl.arange(0, BLOCK_Q)
        qmask = q < PATCH
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rmask = r < R
            c = r // (TUB * PATCH)
            tt = (r // PATCH) % TUB
            hh = r % PATCH
            src = base + (c * s_vc + tt * s_vt + hh * s_vh)[:, None] + (q * s_vw)[None, :]
            m = rmask[:, None] & qmask[None, :]
            x = tl.load(video_ptr + src, mask=m, other=0)
            if UINT8:
                mu = tl.load(mean_ptr + c, mask=rmask, other=0.0)
                sd = tl.load(std_ptr + c, mask=rmask, other=1.0)
                x = div_rn(div_rn(x.to(tl.float32), 255.0) - mu[:, None], sd[:, None])
            if THWC:
                dst = ((tt * PATCH + hh) * (PATCH * C) + c)[:, None] + (q * C)[None, :]
            else:
                dst = (r * PATCH)[:, None] + q[None, :]
            tl.store(out_row + dst, x.to(out_ptr.dtype.element_ty), mask=m)


def gather_cubes_triton(video: torch.Tensor, idx: torch.Tensor, *, tubelet: int, patch: int,
                        layout: str = "cthw", checked: bool = False) -> torch.Tensor:
    """Launch the Triton gather (CUDA tensors, or CPU tensors through the interpreter).
    Same contract as ``gather_cubes_ref``; no autograd. ``checked``: the caller validated the
    inputs (``_dispatch.revalidate``)."""
    if revalidate(checked, video.device):
        _validate(video, idx, tubelet, patch, layout)
    (B, C, _, H, W), n = video.shape, idx.shape[1]
    device = video.device
    check_kernel_device(device)
    dtype = torch.float32 if video.dtype == torch.uint8 else video.dtype
    P = C * tubelet * patch * patch
    out = torch.empty((B, n, P), dtype=dtype, device=device)
    if B * n == 0:
        return out
    mean, std = imagenet_stats(device)
    block_q = next_pow2(patch)
    block_r = min(next_pow2(C * tubelet * patch), max(1, 2048 // block_q))
    launch(_gather_cubes_kernel, (B * n,),
        video, idx, out, mean, std, n, H // patch, W // patch,
        *video.stride(), *idx.stride(),
        C=C, TUB=tubelet, PATCH=patch, THWC=layout == "thwc", UINT8=video.dtype == torch.uint8,
        BLOCK_R=block_r, BLOCK_Q=block_q, num_warps=4)
    return out


def _validate(video, idx, tubelet, patch, layout):
    if not (isinstance(tubelet, int) and isinstance(patch, int) and tubelet > 0 and patch > 0):
        raise ValueError(f"tubelet and patch must be positive ints, got {tubelet!r}, {patch!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    B, C, T, H, W = check_video(video, tubelet, patch)
    if video.dtype == torch.uint8 and C != 3:
        raise ValueError(f"a uint8 clip is normalized with the 3-channel ImageNet stats, got C={C}")
    check_device("idx", idx, video.device)
    check_index(idx, B, (T // tubelet) * (H // patch) * (W // patch), "idx")
    return B, C, T, H, W, idx.shape[1]


# --------------------------------------------------------------------------- torch.library op

@torch.library.custom_op("vmae_fast::gather_cubes", mutates_args=())
def _gather_cubes_op(video: torch.Tensor, idx: torch.Tensor, tubelet: int, patch: int,
                     thwc: bool) -> torch.Tensor:
    # The reference: every device without a kernel of its own (see register_kernels below).
    layout = "thwc" if thwc else "cthw"
    return gather_cubes_ref(video, idx, tubelet=tubelet, patch=patch, layout=layout).contiguous()


@_gather_cubes_op.register_fake
def _(video, idx, tubelet, patch, thwc):
    B, C = video.shape[:2]
    dtype = torch.float32 if video.dtype == torch.uint8 else video.dtype
    return video.new_empty((B, idx.shape[1], C * tubelet * patch * patch), dtype=dtype)


def _triton(video, idx, tubelet, patch, thwc):
    return gather_cubes_triton(video, idx, tubelet=tubelet, patch=patch, layout="thwc" if thwc else "cthw",
                               checked=True)


register_kernels(_gather_cubes_op, "gather_cubes", triton_impl=_triton if HAS_TRITON else None,
                 native_name="gather_cubes_cpu")


def gather_cubes(video: torch.Tensor, idx: torch.Tensor, *, tubelet: int, patch: int,
                 layout: str = "cthw") -> torch.Tensor:
    """Cube gather (see ``gather_cubes_ref`` for the contract) through ``vmae_fast::gather_cubes``
    (the kernel registered for the clip's device, see ``ops._dispatch``), or the reference when
    the clip needs a gradient or the kernels are off (``VMAE_FAST_KERNELS=0``, ``use_kernels``)."""
    check_tensors(video=video, idx=idx)
    if video.requires_grad or not kernels_enabled():
        return gather_cubes_ref(video, idx, tubelet=tubelet, patch=patch, layout=layout)
    _validate(video, idx, tubelet, patch, layout)
    return torch.ops.vmae_fast.gather_cubes(video, idx, tubelet, patch, layout == "thwc")
