"""vmae_fast::decoder_input against decoder_input_ref: outputs and the grads of z, mask_token
and a learnable pos, Triton through the interpreter on CPU, CUDA when present."""
from __future__ import annotations

import pytest
import torch

from conftest import on_devices
from ops_helpers import interpret, rand_idx  # noqa: F401
from tolerances import KERNEL_TOL
from vmae_fast import ops
from vmae_fast.ops.decoder_input import decoder_input_backward_triton, decoder_input_triton


def make(B, n_vis, n_dec, N, D, dtype=torch.float32, pos_dtype=torch.float32, device="cpu",
         learnable=True, strided=False):
    z = torch.randn(B, n_vis, D, device=device).to(dtype)
    if strided:  # (B, n_vis, D) view with D-stride 2
        z = torch.randn(B, n_vis, 2 * D, device=device).to(dtype)[..., ::2]
    pos = torch.randn(N, D, device=device).to(pos_dtype)
    mt = (torch.randn(1, 1, D, device=device) * 0.02).to(dtype)
    z.requires_grad_(); mt.requires_grad_(); pos.requires_grad_(learnable)
    vis = rand_idx(B, n_vis, N, device=device)
    dec = rand_idx(B, n_dec, N, device=device)
    return z, pos, mt, vis, dec


def grads(fn, z, pos, mt, vis, dec, g):
    leaves = [t for t in (z, pos, mt) if t.requires_grad]
    out = fn(z, pos, mt, vis, dec)
    return out, torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("B,n_vis,n_dec,N,D", [(1, 3, 5, 12, 72), (3, 4, 7, 20, 100), (2, 0, 6, 9, 40)])
@pytest.mark.parametrize("learnable", [True, False])
def test_fused_matches_ref(B, n_vis, n_dec, N, D, learnable, interpret):
    z, pos, mt, vis, dec = make(B, n_vis, n_dec, N, D, learnable=learnable, strided=B == 3)
    g = torch.randn(B, n_vis + n_dec, D)
    out, gr = grads(ops.decoder_input, z, pos, mt, vis, dec, g)
    ref, gr_ref = grads(ops.decoder_input_ref, z, pos, mt, vis, dec, g)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert len(gr) == (3 if learnable else 2)
    for a, b in zip(gr, gr_ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dtype_promotion_bf16_z_fp32_pos(interpret):
    z, pos, mt, vis, dec = make(2, 3, 4, 10, 24, dtype=torch.bfloat16)
    g = torch.randn(2, 7, 24)
    out, gr = grads(ops.decoder_input, z, pos, mt, vis, dec, g)
    ref, gr_ref = grads(ops.decoder_input_ref, z, pos, mt, vis, dec, g)
    assert out.dtype == torch.float32 == ref.dtype
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for a, b in zip(gr, gr_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)


def test_float64(interpret):
    z, pos, mt, vis, dec = make(2, 2, 3, 8, 16, dtype=torch.float64, pos_dtype=torch.float64)
    out = ops.decoder_input(z, pos, mt, vis, dec)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ops.decoder_input_ref(z, pos, mt, vis, dec), atol=0, rtol=0)


def test_backward_launcher_overlapping_indices(interpret):
    # the same token in both segments of a clip: pos gets both rows
    g = torch.randn(2, 5, 33)
    vis = torch.tensor([[0, 3], [1, 2]])
    dec = torch.tensor([[0, 1, 3], [2, 4, 5]])
    gm, gp = decoder_input_backward_triton(g, vis, dec, 6, True)
    want = torch.zeros(6, 33)
    for b in range(2):
        for i, k in enumerate(vis[b]):
            want[k] += g[b, i]
        for j, k in enumerate(dec[b]):
            want[k] += g[b, 2 + j]
    torch.testing.assert_close(gp, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gm, g[:, 2:].sum((0, 1)), atol=1e-6, rtol=1e-6)


def test_repeated_index_rejected_for_learnable_pos():
    g = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="repeats a token index"):
        decoder_input_backward_triton(g, torch.tensor([[1]]), torch.tensor([[2, 2]]), 4, True)


@pytest.mark.parametrize("bad,msg", [
    (lambda z, p, m, v, d: (z[0], p, m, v, d), "z must be"),
    (lambda z, p, m, v, d: (z, p[:, :-1], m, v, d), "z must be"),
    (lambda z, p, m, v, d: (z, p[None], m, v, d), "pos must be an"),
    (lambda z, p, m, v, d: (z, p, m[..., :-1], v, d), "mask_token must hold"),
    (lambda z, p, m, v, d: (z, p, m, v[:, :-1], d), "visible_idx must be"),
    (lambda z, p, m, v, d: (z, p, m, v, d + 100), "decoder_idx holds token indices"),
    (lambda z, p, m, v, d: (z, p, m, v.float(), d), "int64 or int32"),
    (lambda z, p, m, v, d: (z.long(), p, m, v, d), "floating-point"),
])
def test_bad_input(bad, msg):
    args = bad(*[t.detach() for t in make(2, 3, 4, 10, 16)])
    with pytest.raises(ValueError, match=msg):
        decoder_input_triton(*args)


def test_opcheck(interpret):
    z, pos, mt, vis, dec = make(2, 3, 4, 10, 24)
    torch.library.opcheck(torch.ops.vmae_fast.decoder_input.default, (z, pos, mt.reshape(24), vis, dec))
    g = torch.randn(2, 7, 24)
    for need_pos in (True, False):
        torch.library.opcheck(torch.ops.vmae_fast.decoder_input_backward.default, (g, vis, dec, 10, need_pos))


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("learnable", [True, False])
def test_matches_ref_on_device(device, dtype, learnable):
    z, pos, mt, vis, dec = make(3, 37, 150, 392, 384, dtype=dtype, device=device, learnable=learnable)
    g = torch.randn(3, 187, 384, device=device)
    out, gr = grads(ops.decoder_input, z, pos, mt, vis, dec, g)
    ref, gr_ref = grads(ops.decoder_input_ref, z, pos, mt, vis, dec, g)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    atol, rtol = KERNEL_TOL[dtype]
    for a, b in zip(gr, gr_ref):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
