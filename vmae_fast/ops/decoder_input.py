"""Decoder input: running-cell gather of positional embeddings plus the mask-token concat.

The fused op writes ``(B, n_vis + n_dec, D)`` = ``[z + pos[visible_idx], mask_token +
pos[decoder_idx]]`` in one pass: one Triton program per block of output rows of a clip, rows
along D coalesced, arithmetic in fp32 (fp64 for fp64 outputs), result in the promoted dtype.

Backward: ``grad_z`` is the visible slice of the incoming gradient (no kernel);
``grad_mask_token`` its decoder rows summed; ``grad_pos`` (learnable table only) a scatter-add
done as a gather: per positional row k, the inverse maps ``k -> row`` of each clip say which
gradient rows to add, so the sum is deterministic, atomic-free and reads each gradient row once.
"""
from __future__ import annotations

import torch

from .. import envs
from ._common import check_index, check_tensors, kernels_enabled
from ._dispatch import (HAS_TRITON, check_device, check_kernel_device, launch, next_pow2,
                        register_kernels, revalidate)


def decoder_input_ref(z: torch.Tensor, pos: torch.Tensor, mask_token: torch.Tensor,
                      visible_idx: torch.Tensor, decoder_idx: torch.Tensor) -> torch.Tensor:
    """Reference decoder input.

    Args:
        z: ``(B, n_vis, D)`` encoder output projected to the decoder width.
        pos: ``(N, D)`` decoder positional table (fixed or learnable).
        mask_token: ``(D,)`` or ``(1, 1, D)``.
        visible_idx: ``(B, n_vis)``; decoder_idx: ``(B, n_dec)`` token indices.
    Returns:
        ``(B, n_vis + n_dec, D)`` in the promoted dtype of the inputs (as the official code:
        a bf16 ``z`` plus the fp32 table gives fp32).

    Equivalent PyTorch code::

        torch.cat([z + pos[visible_idx], mask_token + pos[decoder_idx]], dim=1)
    """
    check_tensors(z=z, pos=pos, mask_token=mask_token, visible_idx=visible_idx, decoder_idx=decoder_idx)
    D = pos.shape[-1]
    return torch.cat([z + pos[visible_idx], mask_token.reshape(1, 1, D) + pos[decoder_idx]], dim=1)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decoder_input_fwd_kernel(z_ptr, pos_ptr, mt_ptr, vis_ptr, dec_ptr, out_ptr,
                                  n_vis, n_dec, D,
                                  s_zb, s_zn, s_zd, s_pn, s_pd, s_md, s_vb, s_vn, s_db, s_dn,
                                  ACC64: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per block of ROWS output rows of one clip; a row is either a visible token
        # (z + pos) or a decoder token (mask_token + pos): both segments in one launch.
        acc_ty = tl.float64 if ACC64 else tl.float32
        b64 = tl.program_id(1).to(tl.int64)
        L = n_vis + n_dec
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = r < L
        is_vis = r < n_vis
        vmask = rmask & is_vis
        dmask = rmask & (r >= n_vis)
        tv = tl.load(vis_ptr + b64 * s_vb + r * s_vn, mask=vmask, other=0).to(tl.int64)
        td = tl.load(dec_ptr + b64 * s_db + (r - n_vis) * s_dn, mask=dmask, other=0).to(tl.int64)
        tok = tl.where(is_vis, tv, td)
        out_rows = out_ptr + (b64 * L + r) * D
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            p = tl.load(pos_ptr + tok[:, None] * s_pn + (d * s_pd)[None, :],
                        mask=rmask[:, None] & dm[None, :], other=0).to(acc_ty)
            zz = tl.load(z_ptr + b64 * s_zb + (r * s_zn)[:, None] + (d * s_zd)[None, :],
                         mask=vmask[:, None] & dm[None, :], other=0).to(acc_ty)
            mt = tl.load(mt_ptr + d * s_md, mask=dm, other=0).to(acc_ty)
            y = p + tl.where(is_vis[:, None], zz, mt[None, :])
            tl.store(out_rows[:, None] + d[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=rmask[:, None] & dm[None, :])

    @triton.jit
    def _decoder_input_bwd_pos_kernel(g_ptr, inv_vis_ptr, inv_dec_ptr, gpos_ptr, gdec_ptr,
                                      B, N, n_vis, D, s_gb, s_gn, s_gd,
                                      ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per block of positional rows k: sums, over the batch, the grad rows that
        # read pos[k] (found through the inverse maps, -1 = absent). Deterministic, no atomics,
        # and every grad_out row is read exactly once over the whole grid.
        k = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        km = k < N
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        acc_v = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        acc_d = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for b in range(0, B):
            b64 = tl.full([], b, tl.int64)
            iv = tl.load(inv_vis_ptr + b64 * N + k, mask=km, other=-1).to(tl.int64)
            idd = tl.load(inv_dec_ptr + b64 * N + k, mask=km, other=-1).to(tl.int64)
            gv = tl.load(g_ptr + b64 * s_gb + (iv * s_gn)[:, None] + (d * s_gd)[None, :],
                         mask=(iv >= 0)[:, None] & dm[None, :], other=0)
            gd = tl.load(g_ptr + b64 * s_gb + ((n_vis + idd) * s_gn)[:, None] + (d * s_gd)[None, :],
                         mask=(idd >= 0)[:, None] & dm[None, :], other=0)
            acc_v += gv.to(tl.float32)
            acc_d += gd.to(tl.float32)
        o = (k.to(tl.int64) * D)[:, None] + d[None, :]
        m = km[:, None] & dm[None, :]
        tl.store(gpos_ptr + o, acc_v + acc_d, mask=m)
        tl.store(gdec_ptr + o, acc_d, mask=m)


def _validate(z, pos, mask_token, visible_idx, decoder_idx):
    for name, t in (("z", z), ("pos", pos), ("mask_token", mask_token)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if pos.dim() != 2:
        raise ValueError(f"pos must be an (N, D) table, got shape {tuple(pos.shape)}")
    N, D = pos.shape
    if z.dim() != 3 or z.shape[2] != D:
        raise ValueError(f"z must be (B, n_vis, {D}) to match pos (N, D) = {tuple(pos.shape)}, "
                         f"got {tuple(z.shape)}")
    if mask_token.numel() != D:
        raise ValueError(f"mask_token must hold D = {D} values ((D,) or (1, 1, D)), got "
                         f"{tuple(mask_token.shape)}")
    B, n_vis = z.shape[:2]
    for name, t in (("pos", pos), ("mask_token", mask_token), ("visible_idx", visible_idx),
                    ("decoder_idx", decoder_idx)):
        check_device(name, t, z.device)
    check_index(visible_idx, B, N, "visible_idx")
    check_index(decoder_idx, B, N, "decoder_idx")
    if visible_idx.shape[1] != n_vis:
        raise ValueError(f"visible_idx must be ({B}, {n_vis}) to match z, got {tuple(visible_idx.shape)}")
    return B, n_vis, decoder_idx.shape[1], N, D


def _out_dtype(z, pos, mask_token) -> torch.dtype:
    return torch.promote_types(torch.promote_types(z.dtype, pos.dtype), mask_token.dtype)


def decoder_input_triton(z: torch.Tensor, pos: torch.Tensor, mask_token: torch.Tensor,
                         visible_idx: torch.Tensor, decoder_idx: torch.Tensor, *,
                         checked: bool = False) -> torch.Tensor:
    """Triton forward (CUDA, or CPU through the interpreter); contract of ``decoder_input_ref``,
    no autograd. ``checked``: the caller validated the inputs (``_dispatch.revalidate``)."""
    if revalidate(checked, z.device):
        _validate(z, pos, mask_token, visible_idx, decoder_idx)
    (B, n_vis, D), n_dec = z.shape, decoder_idx.shape[1]
    device = z.device
    check_kernel_device(device)
    dtype = _out_dtype(z, pos, mask_token)
    L = n_vis + n_dec
    out = torch.empty((B, L, D), dtype=dtype, device=device)
    if B * L * D == 0:
        return out
    mt = mask_token.reshape(D)
    block_d = min(next_pow2(D), 512)
    rows = max(1, min(next_pow2(L), 4096 // block_d))
    launch(_decoder_input_fwd_kernel, (triton.cdiv(L, rows), B),
        z, pos, mt, visible_idx, decoder_idx, out, n_vis, n_dec, D,
        *z.stride(), *pos.stride(), mt.stride(0), *visible_idx.stride(), *decoder_idx.stride(),
        ACC64=dtype == torch.float64, ROWS=rows, BLOCK_D=block_d, num_warps=4)
    return out


def _inverse_map(idx: torch.Tensor, N: int, name: str) -> torch.Tensor:
    """``inv[b, idx[b, i]] = i``, -1 elsewhere: ``(B, N)`` int32."""
    B, n = idx.shape
    inv = torch.full((B, N), -1, dtype=torch.int32, device=idx.device)
    inv.scatter_(1, idx.long(), torch.arange(n, dtype=torch.int32, device=idx.device).expand(B, n))
    if n and (idx.device.type == "cpu" or envs.VMAE_FAST_DEBUG):
        if int((inv >= 0).sum()) != B * n:
            raise ValueError(f"{name} repeats a token index within a clip; the learnable-pos "
                             f"gradient kernel needs distinct indices per row (as DualMask gives)")
    return inv


def decoder_input_backward_triton(grad_out: torch.Tensor, visible_idx: torch.Tensor,
                                  decoder_idx: torch.Tensor, num_tokens: int,
                                  need_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_mask_token (D,), grad_pos (N, D) or (0, D))``, both float32. ``grad_z`` is the
    visible slice of ``grad_out`` and needs no kernel."""
    B, L, D = grad_out.shape
    n_vis = visible_idx.shape[1]
    if not need_pos:  # fixed table: one reduction, which torch already does at bandwidth
        return grad_out[:, n_vis:].sum(dim=(0, 1), dtype=torch.float32), grad_out.new_empty((0, D), dtype=torch.float32)
    device = grad_out.device
    check_kernel_device(device)
    N = num_tokens
    gpos = torch.empty((N, D), dtype=torch.float32, device=device)
    gdec = torch.empty((N, D), dtype=torch.float32, device=device)
    if N * D == 0:
        return gdec.sum(0), gpos
    inv_vis = _inverse_map(visible_idx, N, "visible_idx")
    inv_dec = _inverse_map(decoder_idx, N, "decoder_idx")
    block_d = min(next_pow2(D), 256)
    rows = max(1, min(next_pow2(N), 2048 // block_d))
    launch(_decoder_input_bwd_pos_kernel, (triton.cdiv(N, rows), triton.cdiv(D, block_d)),
        grad_out, inv_vis, inv_dec, gpos, gdec, B, N, n_vis, D, *grad_out.stride(),
        ROWS=rows, BLOCK_D=block_d, num_warps=4)
    return gdec.sum(0), gpos


def _backward_ref(grad_out, visible_idx, decoder_idx, num_tokens, need_pos):
    B, L, D = grad_out.shape
    n_vis = visible_idx.shape[1]
    g = grad_out.float()
    gmask = g[:, n_vis:].sum(dim=(0, 1))
    if not need_pos:
        return gmask, g.new_empty((0, D))
    gpos = g.new_zeros((num_tokens, D))
    gpos.index_add_(0, visible_idx.reshape(-1).long(), g[:, :n_vis].reshape(-1, D))
    gpos.index_add_(0, decoder_idx.reshape(-1).long(), g[:, n_vis:].reshape(-1, D))
    return gmask, gpos


# --------------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("vmae_fast::decoder_input", mutates_args=())
def _decoder_input_op(z: torch.Tensor, pos: torch.Tensor, mask_token: torch.Tensor,
                      visible_idx: torch.Tensor, decoder_idx: torch.Tensor) -> torch.Tensor:
    # The reference: every device without a kernel of its own (see register_kernels below).
    return decoder_input_ref(z, pos, mask_token, visible_idx, decoder_idx)


@_decoder_input_op.register_fake
def _(z, pos, mask_token, visible_idx, decoder_idx):
    B, n_vis, D = z.shape
    return z.new_empty((B, n_vis + decoder_idx.shape[1], D), dtype=_out_dtype(z, pos, mask_token))


@torch.library.custom_op("vmae_fast::decoder_input_backward", mutates_args=())
def _decoder_input_backward_op(grad_out: torch.Tensor, visible_idx: torch.Tensor,
                               decoder_idx: torch.Tensor, num_tokens: int,
                               need_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_ref(grad_out, visible_idx, decoder_idx, num_tokens, need_pos)


@_decoder_input_backward_op.register_fake
def _(grad_out, visible_idx, decoder_idx, num_tokens, need_pos):
    D = grad_out.shape[2]
    return (grad_out.new_empty((D,), dtype=torch.float32),
            grad_out.new_empty((num_tokens if need_pos else 0, D), dtype=torch.float32))


def _native_backward(native):
    def run(grad_out, visible_idx, decoder_idx, num_tokens, need_pos):
        gmask, gpos = native(grad_out, visible_idx, decoder_idx, num_tokens, need_pos)
        D = grad_out.shape[2]
        return gmask.float(), (gpos.float() if need_pos else grad_out.new_empty((0, D), dtype=torch.float32))
    return run


def _triton_fwd(z, pos, mask_token, visible_idx, decoder_idx):
    return decoder_input_triton(z, pos, mask_token, visible_idx, decoder_idx, checked=True)


register_kernels(_decoder_input_op, "decoder_input", triton_impl=_triton_fwd if HAS_TRITON else None,
                 native_name="decoder_input_fwd_cpu")
register_kernels(_decoder_input_backward_op, "decoder_input_backward",
                 triton_impl=decoder_input_backward_triton if HAS_TRITON else None,
                 native_name="decoder_input_bwd_cpu", native_impl=_native_backward)


def _setup_context(ctx, inputs, output):
    z, pos, mask_token, visible_idx, decoder_idx = inputs
    ctx.save_for_backward(visible_idx, decoder_idx)
    ctx.meta = (z.dtype, pos.dtype, mask_token.dtype, pos.shape[0])
    ctx.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])


def _backward(ctx, grad_out):
    visible_idx, decoder_idx = ctx.saved_tensors
    z_dtype, pos_dtype, mt_dtype, N = ctx.meta
    need_z, need_pos, need_mt = ctx.needs
    n_vis = visible_idx.shape[1]
    grad_z = grad_out[:, :n_vis].to(z_dtype) if need_z else None
    grad_pos = grad_mt = None
    if need_pos or need_mt:
        gmask, gpos = torch.ops.vmae_fast.decoder_input_backward(grad_out, visible_idx, decoder_idx,
                                                                 N, need_pos)
        grad_mt = gmask.to(mt_dtype) if need_mt else None
        grad_pos = gpos.to(pos_dtype) if need_pos else None
    return grad_z, grad_pos, grad_mt, None, None


_decoder_input_op.register_autograd(_backward, setup_context=_setup_context)


def decoder_input(z: torch.Tensor, pos: torch.Tensor, mask_token: torch.Tensor,
                  visible_idx: torch.Tensor, decoder_idx: torch.Tensor) -> torch.Tensor:
    """Decoder input (contract of ``decoder_input_ref``) through ``vmae_fast::decoder_input``:
    Triton on CUDA, native/interpreter/reference on CPU (``ops._dispatch``); the gradients of
    ``z``, ``mask_token`` (its shape kept) and a learnable ``pos`` come from the op's backward."""
    check_tensors(z=z, pos=pos, mask_token=mask_token, visible_idx=visible_idx, decoder_idx=decoder_idx)
    if not kernels_enabled():
        return decoder_input_ref(z, pos, mask_token, visible_idx, decoder_idx)
    _validate(z, pos, mask_token, visible_idx, decoder_idx)
    D = pos.shape[1]
    return torch.ops.vmae_fast.decoder_input(z, pos, mask_token.reshape(D), visible_idx, decoder_idx)
