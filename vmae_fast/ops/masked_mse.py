"""Normalized-pixel masked MSE: the VideoMAE reconstruction loss on decoder-visible cubes.

The fused op never materializes the ``(B, n, P)`` target: one Triton program per ``pred`` row
loads its cube ``(t*p*p, C)`` from the clip (any strides, float or uint8), un-normalizes it,
standardizes it per channel in registers (two-pass mean/unbiased variance in fp32), and reduces
``w * mean_P((pred - target)^2)`` to one float per row; a torch sum of those ``B*n`` floats and
the division by ``sum(w)`` (1 when it is 0, so an all-zero batch gives 0, never NaN) make the
scalar, deterministically (no atomics).

Gradient: recomputed in backward, not written by the forward. Bytes moved per row, P = 3*t*p*p
elements, bf16/fp16 ``pred`` (2P bytes) as under autocast:
- gradient in forward: forward reads pred + cube and writes the grad (2P + 2P), backward must
  still scale it by the incoming ``dloss`` (read + write 4P; a GradScaler makes it != 1):
  8P + cube bytes once;
- recompute: forward reads pred + cube (2P), backward reads them again and writes the grad with
  ``dloss / sum(w)`` loaded in-kernel (4P): 6P + cube bytes twice.
With a uint8 clip (cube = P bytes) recompute moves 8P against 9P; with an fp32 clip (4P) 14P
against 12P; with fp32 pred both tie at 20P (fp32 clip). Recompute also keeps only ``pred``
saved for backward (the grad-in-forward buffer is as large as ``pred``), writes nothing extra
when no backward follows (evaluation, logging) and keeps the forward the cheapest. So: recompute.
(Not measured on a GPU yet: reasoning on bytes only, as the kernels are bandwidth bound.)
"""
from __future__ import annotations

import torch

from ._common import check_index, check_tensors, check_video, imagenet_stats, kernels_enabled
from ._dispatch import (HAS_TRITON, check_device, check_kernel_device, cube_origin, div_rn, launch, next_pow2,
                        register_kernels, revalidate)
from .gather_cubes import gather_cubes_raw


def cube_targets_ref(video: torch.Tensor, idx: torch.Tensor, *, tubelet: int, patch: int,
                     normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction targets of the cubes at ``idx``: ``(B, n, t*p*p*C)`` float32 in
    ``(t, h, w, c)`` order. Pixels are un-normalized (``x*std + mean`` for a float clip,
    ``x/255`` for uint8); with ``normalize`` each cube is standardized per channel over its
    ``t*p*p`` pixels with the unbiased variance: ``(x - mean) / (sqrt(var) + eps)``."""
    check_tensors(video=video, idx=idx)
    cubes = gather_cubes_raw(video, idx, tubelet=tubelet, patch=patch)  # (B, n, C, t, p, p)
    B, n, C = cubes.shape[:3]
    cubes = cubes.permute(0, 1, 3, 4, 5, 2).reshape(B, n, -1, C)  # (B, n, t*p*p, C)
    if video.dtype == torch.uint8:
        x = cubes.float() / 255
    else:
        mean, std = imagenet_stats(video.device)
        x = cubes.float() * std + mean
    if normalize:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + eps)
    return x.reshape(B, n, -1)


def masked_mse_loss_ref(pred: torch.Tensor, video: torch.Tensor, decoder_idx: torch.Tensor,
                        weight: torch.Tensor, *, tubelet: int, patch: int, normalize: bool = True,
                        eps: float = 1e-6) -> torch.Tensor:
    """Reference loss.

    Args:
        pred: ``(B, n, C*t*p*p)`` predictions in ``(t, h, w, c)`` order (any float dtype).
        video: ``(B, C, T, H, W)`` normalized float clip or uint8 clip.
        decoder_idx: ``(B, n)`` token index of each ``pred`` row.
        weight: ``(B, n)`` row weights (1 where the encoder masked the token).
    Returns:
        float32 scalar ``sum_rows(w * mean_P((pred - target)^2)) / sum(w)``; 0 when all
        weights are 0 (the official code would give NaN).

    Equivalent PyTorch code::

        target = cube_targets_ref(video, decoder_idx, ...)      # (B, n, P) float32
        rows = ((pred.float() - target) ** 2).mean(-1)
        (rows * weight).sum() / weight.sum()
    """
    check_tensors(pred=pred, video=video, decoder_idx=decoder_idx, weight=weight)
    target = cube_targets_ref(video, decoder_idx, tubelet=tubelet, patch=patch,
                              normalize=normalize, eps=eps)
    rows = (pred.float() - target).pow(2).mean(dim=-1)
    w = weight.float()
    den = w.sum()
    return (rows * w).sum() / torch.where(den > 0, den, torch.ones_like(den))


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_mse_kernel(pred_ptr, video_ptr, idx_ptr, w_ptr, mean_ptr, std_ptr, scale_ptr,
                           rows_ptr, grad_ptr,
                           n, Hp, Wp, eps,
                           s_pb, s_pn, s_pp, s_vb, s_vc, s_vt, s_vh, s_vw, s_ib, s_in, s_wb, s_wn,
                           C: tl.constexpr, TUB: tl.constexpr, PATCH: tl.constexpr,
                           UINT8: tl.constexpr, NORMALIZE: tl.constexpr, BACKWARD: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # One program per pred row: the whole cube sits in registers as (t*p*p pixels, C) in
        # target order; the row's target is built there and never written.
        # Forward: rows[row] = w * mean_P((pred - target)^2).
        # Backward: grad[row] = 2 * w * (pred - target) / P * scale, scale = dloss / sum(w).
        row = tl.program_id(0)
        b64, i64, base = cube_origin(idx_ptr, row, n, Hp, Wp, s_ib, s_in, s_vb, s_vt, s_vh, s_vw, TUB, PATCH)
        S: tl.constexpr = TUB * PATCH * PATCH
        P: tl.constexpr = S * C
        s = tl.arange(0, BLOCK_S)
        c = tl.arange(0, BLOCK_C)
        tt = s // (PATCH * PATCH)
        hh = (s // PATCH) % PATCH
        ww = s % PATCH
        m = (s < S)[:, None] & (c < C)[None, :]
        src = base + (tt * s_vt + hh * s_vh + ww * s_vw)[:, None] + (c * s_vc)[None, :]
        x = tl.load(video_ptr + src, mask=m, other=0).to(tl.float32)
        if UINT8:
            x = div_rn(x, 255.0)
        else:
            mu = tl.load(mean_ptr + c, mask=c < C, other=0.0)
            sd = tl.load(std_ptr + c, mask=c < C, other=1.0)
            x = tl.where(m, x * sd[None, :] + mu[None, :], 0.0)  # padding lanes stay 0
        if NORMALIZE:
            cmean = div_rn(tl.sum(x, axis=0), S)
            xc = tl.where(m, x - cmean[None, :], 0.0)
            var = div_rn(tl.sum(xc * xc, axis=0), S - 1)
            x = div_rn(xc, (tl.sqrt_rn(var) + eps)[None, :])
        po = (s * C)[:, None] + c[None, :]
        p = tl.load(pred_ptr + b64 * s_pb + i64 * s_pn + po * s_pp, mask=m, other=0).to(tl.float32)
        diff = tl.where(m, p - x, 0.0)
        w = tl.load(w_ptr + b64 * s_wb + i64 * s_wn).to(tl.float32)
        if BACKWARD:
            scale = tl.load(scale_ptr)
            g = diff * div_rn(2.0 * w * scale, P)
            tl.store(grad_ptr + row.to(tl.int64) * P + po, g.to(grad_ptr.dtype.element_ty), mask=m)
        else:
            sse = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
            tl.store(rows_ptr + row, div_rn(sse, P) * w)


def _validate(pred, video, decoder_idx, weight, tubelet, patch):
    check_tensors(pred=pred, video=video, decoder_idx=decoder_idx, weight=weight)
    if not (isinstance(tubelet, int) and isinstance(patch, int) and tubelet > 0 and patch > 0):
        raise ValueError(f"tubelet and patch must be positive ints, got {tubelet!r}, {patch!r}")
    B, C, T, H, W = check_video(video, tubelet, patch)
    if C != 3:
        raise ValueError(f"the target un-normalizes with the 3-channel ImageNet stats, got C={C}")
    P = C * tubelet * patch * patch
    if pred.dim() != 3 or pred.shape[0] != B or pred.shape[2] != P:
        raise ValueError(f"pred must be ({B}, n, {P}) for this clip and cube size, got {tuple(pred.shape)}")
    if not pred.is_floating_point():
        raise ValueError(f"pred must be floating point, got {pred.dtype}")
    n = pred.shape[1]
    for name, t in (("decoder_idx", decoder_idx), ("weight", weight)):
        check_device(name, t, pred.device)
    check_device("video", video, pred.device)
    check_index(decoder_idx, B, (T // tubelet) * (H // patch) * (W // patch), "decoder_idx")
    if decoder_idx.shape[1] != n:
        raise ValueError(f"decoder_idx must be ({B}, {n}) to match pred, got {tuple(decoder_idx.shape)}")
    if weight.shape != (B, n):
        raise ValueError(f"weight must be ({B}, {n}) to match pred, got {tuple(weight.shape)}")
    if not (weight.is_floating_point() or weight.dtype == torch.bool):
        raise ValueError(f"weight must be floating point or bool, got {weight.dtype}")
    return B, n, P


def _launch(pred, video, decoder_idx, weight, tubelet, patch, normalize, eps, scale, rows, grad):
    B, n, P = pred.shape
    device = pred.device
    mean, std = imagenet_stats(device)
    S = tubelet * patch * patch
    launch(_masked_mse_kernel, (B * n,),
        pred, video, decoder_idx, weight, mean, std, scale, rows, grad,
        n, video.shape[3] // patch, video.shape[4] // patch, float(eps),
        *pred.stride(), *video.stride(), *decoder_idx.stride(), *weight.stride(),
        C=video.shape[1], TUB=tubelet, PATCH=patch, UINT8=video.dtype == torch.uint8,
        NORMALIZE=bool(normalize), BACKWARD=grad is not None,
        BLOCK_S=next_pow2(S), BLOCK_C=next_pow2(video.shape[1]), num_warps=8 if S >= 256 else 4)


def _den(weight: torch.Tensor) -> torch.Tensor:
    den = weight.float().sum()
    return torch.where(den > 0, den, torch.ones_like(den))


def masked_mse_loss_triton(pred: torch.Tensor, video: torch.Tensor, decoder_idx: torch.Tensor,
                           weight: torch.Tensor, *, tubelet: int, patch: int, normalize: bool = True,
                           eps: float = 1e-6, checked: bool = False) -> torch.Tensor:
    """Triton forward (CUDA, or CPU through the interpreter): float32 scalar loss, contract of
    ``masked_mse_loss_ref``; no autograd. ``checked``: the caller validated the inputs
    (``_dispatch.revalidate``)."""
    if revalidate(checked, pred.device):
        _validate(pred, video, decoder_idx, weight, tubelet, patch)
    B, n, P = pred.shape
    check_kernel_device(pred.device)
    rows = torch.empty((B, n), dtype=torch.float32, device=pred.device)
    if B * n:
        _launch(pred, video, decoder_idx, weight, tubelet, patch, normalize, eps, rows, rows, None)
    # Per-row partials then a torch sum: deterministic (no atomics), B*n floats only.
    return rows.sum() / _den(weight)


def masked_mse_loss_backward_triton(grad_loss: torch.Tensor, pred: torch.Tensor, video: torch.Tensor,
                                    decoder_idx: torch.Tensor, weight: torch.Tensor, *, tubelet: int,
                                    patch: int, normalize: bool = True, eps: float = 1e-6,
                                    checked: bool = False) -> torch.Tensor:
    """``d loss / d pred``, ``(B, n, P)`` in pred's dtype, the target recomputed in registers."""
    if revalidate(checked, pred.device):
        _validate(pred, video, decoder_idx, weight, tubelet, patch)
    B, n, P = pred.shape
    check_kernel_device(pred.device)
    grad = torch.empty((B, n, P), dtype=pred.dtype, device=pred.device)
    if B * n:
        scale = (grad_loss.float().reshape(()) / _den(weight)).reshape(1)
        _launch(pred, video, decoder_idx, weight, tubelet, patch, normalize, eps, scale, scale, grad)
    return grad


def _backward_ref(grad_loss, pred, video, decoder_idx, weight, tubelet, patch, normalize, eps):
    """The reference gradient in closed form, ``2 (pred - target) w / (P den)``: it is the op's
    backward body on devices without a kernel, and an op body runs below autograd, where the
    reference loss could not be differentiated."""
    target = cube_targets_ref(video, decoder_idx, tubelet=tubelet, patch=patch, normalize=normalize, eps=eps)
    row_grad = grad_loss.float().reshape(()) * weight.float() / _den(weight)  # d loss / d rows
    return ((2.0 / target.shape[-1]) * row_grad.unsqueeze(-1) * (pred.float() - target)).to(pred.dtype)


# --------------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("vmae_fast::masked_mse_loss", mutates_args=())
def _masked_mse_op(pred: torch.Tensor, video: torch.Tensor, decoder_idx: torch.Tensor,
                   weight: torch.Tensor, tubelet: int, patch: int, normalize: bool,
                   eps: float) -> torch.Tensor:
    # The reference: every device without a kernel of its own (see register_kernels below).
    return masked_mse_loss_ref(pred, video, decoder_idx, weight, tubelet=tubelet, patch=patch,
                               normalize=normalize, eps=eps)


@_masked_mse_op.register_fake
def _(pred, video, decoder_idx, weight, tubelet, patch, normalize, eps):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("vmae_fast::masked_mse_loss_backward", mutates_args=())
def _masked_mse_backward_op(grad_loss: torch.Tensor, pred: torch.Tensor, video: torch.Tensor,
                            decoder_idx: torch.Tensor, weight: torch.Tensor, tubelet: int,
                            patch: int, normalize: bool, eps: float) -> torch.Tensor:
    return _backward_ref(grad_loss, pred, video, decoder_idx, weight, tubelet, patch, normalize, eps)


@_masked_mse_backward_op.register_fake
def _(grad_loss, pred, video, decoder_idx, weight, tubelet, patch, normalize, eps):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _triton_fwd(pred, video, decoder_idx, weight, tubelet, patch, normalize, eps):
    return masked_mse_loss_triton(pred, video, decoder_idx, weight, tubelet=tubelet, patch=patch,
                                  normalize=normalize, eps=eps, checked=True)


def _triton_bwd(grad_loss, pred, video, decoder_idx, weight, tubelet, patch, normalize, eps):
    return masked_mse_loss_backward_triton(grad_loss, pred, video, decoder_idx, weight, tubelet=tubelet,
                                           patch=patch, normalize=normalize, eps=eps, checked=True)


register_kernels(_masked_mse_op, "masked_mse_loss", triton_impl=_triton_fwd if HAS_TRITON else None,
                 native_name="masked_mse_fwd_cpu")
register_kernels(_masked_mse_backward_op, "masked_mse_loss_backward",
                 triton_impl=_triton_bwd if HAS_TRITON else None,
                 native_name="masked_mse_bwd_cpu")


def _setup_context(ctx, inputs, output):
    pred, video, decoder_idx, weight, tubelet, patch, normalize, eps = inputs
    ctx.save_for_backward(pred, video, decoder_idx, weight)
    ctx.args = (tubelet, patch, normalize, eps)


def _backward(ctx, grad_loss):
    pred, video, decoder_idx, weight = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.vmae_fast.masked_mse_loss_backward(grad_loss, pred, video, decoder_idx,
                                                            weight, *ctx.args)
    return grad, None, None, None, None, None, None, None


_masked_mse_op.register_autograd(_backward, setup_context=_setup_context)


def masked_mse_loss(pred: torch.Tensor, video: torch.Tensor, decoder_idx: torch.Tensor,
                    weight: torch.Tensor, *, tubelet: int, patch: int, normalize: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Loss (contract of ``masked_mse_loss_ref``) through ``vmae_fast::masked_mse_loss``: Triton
    on CUDA, native/interpreter/reference on CPU (``ops._dispatch``); the gradient of ``pred``
    comes from the op's backward. A clip or weight that needs a gradient takes the reference."""
    check_tensors(pred=pred, video=video, decoder_idx=decoder_idx, weight=weight)
    if video.requires_grad or weight.requires_grad or not kernels_enabled():
        return masked_mse_loss_ref(pred, video, decoder_idx, weight, tubelet=tubelet, patch=patch,
                                   normalize=normalize, eps=eps)
    _validate(pred, video, decoder_idx, weight, tubelet, patch)
    return torch.ops.vmae_fast.masked_mse_loss(pred, video, decoder_idx, weight, tubelet, patch,
                                               bool(normalize), float(eps))
