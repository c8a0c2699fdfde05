"""vmae_fast::masked_mse_loss against masked_mse_loss_ref (float64 reference): loss and grad of
pred, Triton through the interpreter on CPU, CUDA when present."""
from __future__ import annotations

import pytest
import torch

from conftest import on_devices
from ops_helpers import interpret, rand_idx, video_clip  # noqa: F401
from tolerances import KERNEL_TOL
from vmae_fast import ops
from vmae_fast.ops.masked_mse import masked_mse_loss_backward_triton, masked_mse_loss_triton


def loss_and_grad(fn, pred, video, idx, w, **kw):
    p = pred.detach().clone().requires_grad_()
    loss = fn(p, video, idx, w, **kw)
    (g,) = torch.autograd.grad(loss * 1.7, p)  # a non-unit incoming gradient
    return loss, g


def ref64(pred, video, idx, w, **kw):
    """Reference loss and grad with float64 pred and weight (the reference builds its target
    in float32 whatever the input)."""
    v = video if video.dtype == torch.uint8 else video.double()
    p = pred.detach().double().requires_grad_()
    loss = ops.masked_mse_loss_ref(p, v, idx, w.double(), **kw)
    (g,) = torch.autograd.grad(loss * 1.7, p)
    return loss.double(), g.double()


@pytest.mark.parametrize("vdtype,storage", [(torch.float32, "contiguous"), (torch.uint8, "contiguous"),
                                            (torch.float32, "strided"), (torch.uint8, "sliced")])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_matches_ref(vdtype, storage, normalize, interpret):
    B, n, t, p = 2, 5, 2, 8
    video = video_clip(B, 4, 16, 24, dtype=vdtype, layout=storage)
    idx = rand_idx(B, n, 12)
    w = (torch.rand(B, n) > 0.4).float()
    w[0, 0] = 0.0  # a row with weight 0
    pred = torch.randn(B, 2 * n, 3 * t * p * p)[:, ::2]  # non-contiguous pred
    kw = dict(tubelet=t, patch=p, normalize=normalize)
    loss, g = loss_and_grad(ops.masked_mse_loss, pred, video, idx, w, **kw)
    loss_ref, g_ref = ref64(pred, video, idx, w, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and g.dtype == pred.dtype
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-6, rtol=1e-4)
    assert torch.all(g[0, 0] == 0)


def test_odd_cube_and_int32_idx(interpret):
    # tubelet 3, patch 6 (t*p*p = 108, not a power of two), B=3, n=7
    video = video_clip(3, 6, 12, 18)
    idx = rand_idx(3, 7, 12, dtype=torch.int32)
    w = torch.rand(3, 7)
    pred = torch.randn(3, 7, 3 * 3 * 36)
    kw = dict(tubelet=3, patch=6)
    loss, g = loss_and_grad(ops.masked_mse_loss, pred, video, idx, w, **kw)
    loss_ref, g_ref = ref64(pred, video, idx, w, **kw)
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-6, rtol=1e-4)


def test_low_contrast_cubes_divide_by_std_plus_eps(interpret):
    """Cubes whose pixel std (~2e-5 after un-normalizing) is near ``eps`` (1e-6): the target
    divides by ``sqrt(var) + eps`` (official); ``sqrt(var + eps)`` (~1e-3) would shrink it ~50x.
    On ordinary clips (std ~1) the two differ by ~5e-7 relative, below any fp32 tolerance."""
    B, n, t, p = 2, 5, 2, 8
    video = 0.3 + 1e-4 * video_clip(B, 4, 16, 24)
    idx = rand_idx(B, n, 12)
    w = torch.ones(B, n)
    pred = torch.zeros(B, n, 3 * t * p * p)  # loss = mean square of the normalized target
    kw = dict(tubelet=t, patch=p)
    loss, g = loss_and_grad(ops.masked_mse_loss, pred, video, idx, w, **kw)
    loss_ref, g_ref = ref64(pred, video, idx, w, **kw)
    assert 0.8 < loss_ref.item() < 1.0  # ~ (1 + eps / std)^-2: the division by the std held
    torch.testing.assert_close(loss.double(), loss_ref, atol=0, rtol=1e-3)
    # a target element carries its pixels' fp32 rounding (ulp(0.5) = 6e-8) over their std
    # (2e-5): ~3e-3 relative per element, elementwise; the loss averages it away.
    torch.testing.assert_close(g.double(), g_ref, atol=2e-2 * g_ref.abs().max().item(), rtol=0)


def test_zero_weight_sum_is_zero_not_nan(interpret):
    video, idx = video_clip(2), rand_idx(2, 3, 12)
    pred, w = torch.randn(2, 3, 384), torch.zeros(2, 3)
    loss, g = loss_and_grad(ops.masked_mse_loss, pred, video, idx, w, tubelet=2, patch=8)
    assert loss.item() == 0.0 and torch.all(g == 0)
    assert masked_mse_loss_triton(pred, video, idx, w, tubelet=2, patch=8).item() == 0.0


def test_bool_weight_and_empty_rows(interpret):
    video, idx = video_clip(2), rand_idx(2, 3, 12)
    pred = torch.randn(2, 3, 384)
    w = torch.tensor([[True, False, True], [False, False, True]])
    torch.testing.assert_close(masked_mse_loss_triton(pred, video, idx, w, tubelet=2, patch=8),
                               ops.masked_mse_loss_ref(pred, video, idx, w, tubelet=2, patch=8))
    e = torch.zeros(2, 0, dtype=torch.int64)
    assert masked_mse_loss_triton(pred[:, :0], video, e, w[:, :0], tubelet=2, patch=8).item() == 0.0
    assert masked_mse_loss_backward_triton(torch.tensor(1.0), pred[:, :0], video, e, w[:, :0],
                                           tubelet=2, patch=8).shape == (2, 0, 384)


@pytest.mark.parametrize("bad,msg", [
    (lambda p, v, i, w: (p[..., :-1], v, i, w), "pred must be"),
    (lambda p, v, i, w: (p.long(), v, i, w), "floating point"),
    (lambda p, v, i, w: (p, v[:, :2], i, w), "3-channel"),
    (lambda p, v, i, w: (p, v[..., :20], i, w), "does not divide"),
    (lambda p, v, i, w: (p, v, i[:, :2], w), "decoder_idx must be"),
    (lambda p, v, i, w: (p, v, i + 12, w), "decoder_idx holds token indices"),
    (lambda p, v, i, w: (p, v, i, w[:, :2]), "weight must be"),
    (lambda p, v, i, w: (p, v, i, w.long()), "weight must be floating"),
])
def test_bad_input(bad, msg, interpret):
    args = bad(torch.randn(2, 3, 384), video_clip(2), rand_idx(2, 3, 12), torch.ones(2, 3))
    with pytest.raises(ValueError, match=msg):
        masked_mse_loss_triton(*args, tubelet=2, patch=8)
    with pytest.raises(ValueError, match=msg):
        ops.masked_mse_loss(*args, tubelet=2, patch=8)


def test_opcheck(interpret):
    video, idx = video_clip(2), rand_idx(2, 3, 12)
    pred, w = torch.randn(2, 3, 384, requires_grad=True), torch.rand(2, 3)
    torch.library.opcheck(torch.ops.vmae_fast.masked_mse_loss.default, (pred, video, idx, w, 2, 8, True, 1e-6))
    torch.library.opcheck(torch.ops.vmae_fast.masked_mse_loss_backward.default,
                          (torch.tensor(1.3), pred.detach(), video, idx, w, 2, 8, True, 1e-6))


@on_devices
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_matches_ref_on_device(device, pdtype, vdtype):
    B, n, t, p = 3, 37, 2, 14  # ViT-g cube (P = 1176, t*p*p = 392), 40 tokens
    video = video_clip(B, 4, 56, 70, dtype=vdtype, device=device, layout="strided")
    idx = rand_idx(B, n, 40, device=device)
    w = (torch.rand(B, n, device=device) > 0.2).float()
    pred = torch.randn(B, n, 3 * t * p * p, device=device).to(pdtype)
    loss, g = loss_and_grad(ops.masked_mse_loss, pred, video, idx, w, tubelet=t, patch=p)
    loss_ref, g_ref = ref64(pred, video, idx, w, tubelet=t, patch=p)
    atol, rtol = KERNEL_TOL[pdtype]
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, atol=atol * g_ref.abs().max().item(), rtol=rtol)
