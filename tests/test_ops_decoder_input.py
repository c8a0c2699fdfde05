"""vmae_fast::decoder_input against decoder_input_ref: outputs and the grads of z, mask_token
and a learnable pos, Triton through the interpreter on CPU, CUDA when present."""
from __future__ import annotations

import pytest
import torch

from conftest import on_devices
from ops_helpers import interpret, rand_idx  # noqa: F401
from tolerances import KERNEL_TOL
from vmae_fast import ops
from vmae_fast.ops import use_kernels
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


@pytest.mark.parametrize("name", ["visible_idx", "decoder_idx"])
def test_repeated_index_rejected_for_learnable_pos(name):
    g = torch.randn(1, 3, 8)
    vis, dec = (torch.tensor([[1]]), torch.tensor([[2, 2]])) if name == "decoder_idx" else \
        (torch.tensor([[1, 1]]), torch.tensor([[2]]))
    with pytest.raises(ValueError) as err:
        decoder_input_backward_triton(g, vis, dec, 4, True)
    assert err.type is ValueError and str(err.value).startswith(f"{name} repeats a token index within a clip")


def test_backward_launcher_without_width_launches_nothing():
    """D = 0: the learnable table's gradient is (N, 0) and the mask token's (0,), no kernel."""
    gm, gp = decoder_input_backward_triton(torch.zeros(2, 5, 0), torch.tensor([[0, 1]] * 2),
                                           torch.tensor([[2, 3, 4]] * 2), 6, True)
    assert gm.shape == (0,) and gp.shape == (6, 0) and gm.dtype == gp.dtype == torch.float32


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


# ---- the reference, the CPU op (native or reference) and the switch against by-hand sums

def by_hand(z, pos, mt, vis, dec):
    """``[z + pos[vis], mt + pos[dec]]`` row by row, float64."""
    D = pos.shape[1]
    return torch.stack([torch.stack([z[b, i].double() + pos[k].double() for i, k in enumerate(vis[b].tolist())]
                                    + [mt.reshape(D).double() + pos[k].double() for k in dec[b].tolist()])
                        for b in range(z.shape[0])])


def grads_by_hand(g, vis, dec, N):
    """(grad_mask_token, grad_pos) of the sum of ``g * out``: the decoder rows summed; each
    positional row gets every gradient row that read it, float64."""
    n_vis = vis.shape[1]
    gpos = torch.zeros(N, g.shape[2], dtype=torch.float64)
    for b in range(g.shape[0]):
        for i, k in enumerate(vis[b].tolist() + dec[b].tolist()):
            gpos[k] += g[b, i].double()
    return g[:, n_vis:].double().sum((0, 1)), gpos


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("mt_shape", [(1, 1, 24), (24,)])
def test_op_and_ref_match_by_hand_sums(kernels, mt_shape):
    """Forward and the gradients of z, pos and mask_token (its shape and dtype kept) through the
    public op, kernels on (the CPU kernel: native or the reference) or off, and the reference."""
    z, pos, mt, vis, dec = make(2, 3, 4, 10, 24, dtype=torch.bfloat16)
    mt = mt.detach().reshape(mt_shape).requires_grad_()
    vis[1] = torch.tensor([1, 5, 9])  # a token in both segments of a clip: pos[5] gets both rows
    dec[1] = torch.tensor([0, 2, 5, 7])
    g = torch.randn(2, 7, 24)
    atol, rtol = KERNEL_TOL[torch.float32]  # one fp32 addition
    for fn in (ops.decoder_input, ops.decoder_input_ref):
        with use_kernels(kernels):
            out, (gz, gpos, gmt) = grads(fn, z, pos, mt, vis, dec, g)
        assert out.dtype == torch.float32  # bf16 z + fp32 table, as the official code
        torch.testing.assert_close(out.double(), by_hand(z, pos, mt, vis, dec), atol=atol, rtol=rtol)
        assert (gz.dtype, gpos.dtype, gmt.dtype, gmt.shape) == (torch.bfloat16, torch.float32, torch.bfloat16, mt.shape)
        want_mt, want_pos = grads_by_hand(g, vis, dec, 10)
        torch.testing.assert_close(gz.double(), g[:, :3].bfloat16().double(), atol=0, rtol=0)
        torch.testing.assert_close(gpos.double(), want_pos, atol=1e-5, rtol=1e-5)
        bf_atol, bf_rtol = KERNEL_TOL[torch.bfloat16]  # the bf16 mask token rounds its gradient once
        torch.testing.assert_close(gmt.double().reshape(24), want_mt, atol=bf_atol, rtol=bf_rtol)


@pytest.mark.parametrize("need_pos", [True, False])
def test_backward_reference_by_hand(need_pos):
    from vmae_fast.ops.decoder_input import _backward_ref
    g = torch.randn(2, 5, 8, dtype=torch.float64)
    vis, dec = torch.tensor([[0, 3], [1, 2]]), torch.tensor([[0, 1, 3], [2, 4, 5]], dtype=torch.int32)
    gmask, gpos = _backward_ref(g, vis, dec, 6, need_pos)
    want_mt, want_pos = grads_by_hand(g, vis, dec, 6)
    assert gmask.dtype == gpos.dtype == torch.float32
    torch.testing.assert_close(gmask.double(), want_mt, **dict(zip(("atol", "rtol"), KERNEL_TOL[torch.float32])))
    if need_pos:
        torch.testing.assert_close(gpos.double(), want_pos, **dict(zip(("atol", "rtol"), KERNEL_TOL[torch.float32])))
    else:
        assert gpos.shape == (0, 8)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_only_the_gradients_asked_for(needs):
    """Each input alone needs a gradient: the backward computes that one (and the others are None)."""
    z, pos, mt, vis, dec = (t.detach() for t in make(2, 3, 4, 10, 16))
    z, pos, mt = (t.requires_grad_(n) for t, n in zip((z, pos, mt), needs))
    g = torch.randn(2, 7, 16)
    with use_kernels(True):
        out = ops.decoder_input(z, pos, mt, vis, dec)
    (got,) = torch.autograd.grad(out, [t for t in (z, pos, mt) if t.requires_grad], g)
    want_mt, want_pos = grads_by_hand(g, vis, dec, 10)
    want = (g[:, :3].double(), want_pos, want_mt.reshape(1, 1, 16))[needs.index(True)]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,msg", [
    (lambda z, p, m, v, d: (z.long(), p, m, v, d), "z must be a floating-point tensor, got torch.int64"),
    (lambda z, p, m, v, d: (z, p, m.int(), v, d), "mask_token must be a floating-point tensor, got torch.int32"),
    (lambda z, p, m, v, d: (z, p[None], m, v, d), "pos must be an (N, D) table, got shape (1, 10, 16)"),
    (lambda z, p, m, v, d: (z[0], p, m, v, d), "z must be (B, n_vis, 16) to match pos (N, D) = (10, 16), got (3, 16)"),
    (lambda z, p, m, v, d: (z, p[:, :8], m, v, d),
     "z must be (B, n_vis, 8) to match pos (N, D) = (10, 8), got (2, 3, 16)"),
    (lambda z, p, m, v, d: (z, p, m[..., :-1], v, d), "mask_token must hold D = 16 values ((D,) or (1, 1, D)), got (1, 1, 15)"),
    (lambda z, p, m, v, d: (z, p.to("meta"), m, v, d), "pos is on meta, expected cpu (the device of the first input)"),
    (lambda z, p, m, v, d: (z, p, m.to("meta"), v, d), "mask_token is on meta, expected cpu (the device of the first input)"),
    (lambda z, p, m, v, d: (z, p, m, v.to("meta"), d), "visible_idx is on meta, expected cpu (the device of the first input)"),
    (lambda z, p, m, v, d: (z, p, m, v, d.to("meta")), "decoder_idx is on meta, expected cpu (the device of the first input)"),
    (lambda z, p, m, v, d: (z, p, m, v + 10, d), "visible_idx holds token indices in [10, 10], expected [0, 10)"),
    (lambda z, p, m, v, d: (z, p, m, v, d + 10), "decoder_idx holds token indices in [10, 11], expected [0, 10)"),
    (lambda z, p, m, v, d: (z, p, m, v[:, :2], d), "visible_idx must be (2, 3) to match z, got (2, 2)"),
])
def test_public_op_refuses_bad_input_in_words(bad, msg):
    z, pos, mt = torch.randn(2, 3, 16), torch.randn(10, 16), torch.randn(1, 1, 16)
    vis, dec = torch.zeros(2, 3, dtype=torch.int64), torch.tensor([[0, 1], [1, 0]])
    with use_kernels(True), pytest.raises(ValueError) as err:
        ops.decoder_input(*bad(z, pos, mt, vis, dec))
    assert err.type is ValueError and str(err.value) == msg


def test_inverse_map_by_hand_and_on_meta(monkeypatch):
    """``inv[b, idx[b, i]] = i``, -1 elsewhere, int32, on the indices' device; a repeated index is
    refused where the check is free (CPU) or asked for (VMAE_FAST_DEBUG), never forced on meta."""
    from vmae_fast.ops.decoder_input import _inverse_map
    inv = _inverse_map(torch.tensor([[2, 0], [3, 1]], dtype=torch.int32), 5, "visible_idx")
    assert inv.dtype == torch.int32 and inv.tolist() == [[1, -1, 0, -1, -1], [-1, 1, -1, 0, -1]]
    monkeypatch.setenv("VMAE_FAST_DEBUG", "0")
    with pytest.raises(ValueError) as err:
        _inverse_map(torch.tensor([[1, 1]]), 4, "decoder_idx")
    assert err.type is ValueError and str(err.value) == (
        "decoder_idx repeats a token index within a clip; the learnable-pos gradient kernel needs "
        "distinct indices per row (as DualMask gives)")
    for n in (2, 0):  # meta: no value check (it would read the values), the map stays on meta
        inv = _inverse_map(torch.zeros(3, n, dtype=torch.int64, device="meta"), 6, "visible_idx")
        assert inv.device.type == "meta" and inv.shape == (3, 6) and inv.dtype == torch.int32


def test_backward_launcher_fixed_table_is_one_float32_reduction():
    """A fixed table (no pos gradient) needs no kernel: grad_mask_token is the decoder rows
    summed in float32, grad_pos an empty (0, D) float32."""
    g = torch.randn(2, 5, 8).bfloat16()
    gm, gp = decoder_input_backward_triton(g, torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64), 6, False)
    assert gm.dtype == gp.dtype == torch.float32 and gp.shape == (0, 8)
    torch.testing.assert_close(gm.double(), g[:, 2:].double().sum((0, 1)), **dict(zip(("atol", "rtol"), KERNEL_TOL[torch.float32])))


@pytest.mark.parametrize("need_pos", [True, False])
def test_native_backward_wrapper_returns_float32(need_pos):
    """The native op's gradients, whatever dtype it returns them in, become float32 (the op's
    declared outputs); no pos gradient is an empty (0, D). (Wrapped at import, when the op is
    registered: called here directly, with a recording stand-in for the native op.)"""
    from vmae_fast.ops.decoder_input import _native_backward
    calls = []
    gm, gp = torch.randn(8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)

    def native(*args):
        calls.append(args)
        return gm, gp
    g, vis, dec = torch.randn(2, 5, 8).bfloat16(), torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64)
    got_m, got_p = _native_backward(native)(g, vis, dec, 6, need_pos)
    assert len(calls) == 1 and calls[0][0] is g and calls[0][1] is vis and calls[0][2] is dec and calls[0][3:] == (6, need_pos)
    assert got_m.dtype == got_p.dtype == torch.float32
    torch.testing.assert_close(got_m, gm.float(), atol=0, rtol=0)
    torch.testing.assert_close(got_p, gp.float() if need_pos else torch.empty(0, 8), atol=0, rtol=0)


@pytest.mark.parametrize("N,D", [(12, 384), (4096, 1)])
def test_backward_launcher_wide_rows_and_long_tables(N, D, interpret):
    """Widths past one 256-wide block (decoders are 384-512 wide) and tables past 2048 rows of one
    program: the blocks stay powers of two and cover every row and column."""
    perm = torch.randperm(N)
    vis, dec = perm[:3].sort().values[None], perm[3:8].sort().values[None]
    g = torch.randn(1, 8, D)
    gm, gp = decoder_input_backward_triton(g, vis, dec, N, True)
    want_mt, want_pos = grads_by_hand(g, vis, dec, N)
    atol, rtol = KERNEL_TOL[torch.float32]
    torch.testing.assert_close(gp.double(), want_pos, atol=atol, rtol=rtol)
    torch.testing.assert_close(gm.double(), want_mt, atol=atol, rtol=rtol)


@pytest.mark.parametrize("B,n_vis,n_dec,D", [(2, 3, 4, 0), (2, 0, 0, 8), (0, 3, 4, 8)])
def test_forward_launcher_empty_output_launches_nothing(B, n_vis, n_dec, D):
    z, pos, mt = torch.randn(B, n_vis, D), torch.randn(10, D), torch.randn(D)
    vis, dec = torch.zeros(B, n_vis, dtype=torch.int64), torch.zeros(B, n_dec, dtype=torch.int64)
    out = decoder_input_triton(z, pos, mt, vis, dec)
    assert out.shape == (B, n_vis + n_dec, D) and out.dtype == torch.float32


@pytest.mark.parametrize("L,D", [(16, 600), (4100, 1)])
def test_forward_launcher_wide_rows_and_long_sequences(L, D, interpret):
    """Rows wider than one 512-wide block and sequences past 4096 rows of one program."""
    n_vis = L // 4
    perm = torch.randperm(L)
    vis, dec = perm[:n_vis][None], perm[n_vis:][None]
    z, pos, mt = torch.randn(1, n_vis, D), torch.randn(L, D), torch.randn(D)
    out = decoder_input_triton(z, pos, mt, vis, dec)
    torch.testing.assert_close(out.double(), by_hand(z, pos, mt, vis, dec), **dict(zip(("atol", "rtol"), KERNEL_TOL[torch.float32])))
