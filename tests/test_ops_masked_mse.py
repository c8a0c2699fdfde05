"""vmae_fast::masked_mse_loss against masked_mse_loss_ref (float64 reference): loss and grad of
pred, Triton through the interpreter on CPU, CUDA when present."""
from __future__ import annotations

import pytest
import torch

from conftest import on_devices
from ops_helpers import interpret, rand_idx, targets_by_hand, video_clip  # noqa: F401
from tolerances import KERNEL_TOL
from vmae_fast import ops
from vmae_fast.ops import use_kernels
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


# ---- the references, the CPU op (native or reference) and the switch against the by-hand target

def loss_by_hand(pred, target, w):
    """``sum(w * mean_P((pred - target)^2)) / sum(w)`` (0 for no weight) and its gradient, float64."""
    w = w.double()
    den = w.sum().item() or 1.0
    diff = pred.double() - target
    return ((diff ** 2).mean(-1) * w).sum() / den, 2 * diff * w[..., None] / (diff.shape[-1] * den)


@pytest.mark.parametrize("vdtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("normalize,eps", [(True, 1e-6), (True, 0.5), (False, 1e-6)])
def test_targets_ref_match_by_hand(vdtype, normalize, eps):
    video, idx = video_clip(2, 4, 16, 24, dtype=vdtype), rand_idx(2, 5, 12, sort=False)
    kw = dict(tubelet=2, patch=8, normalize=normalize, eps=eps)
    out = ops.cube_targets_ref(video, idx, **kw)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 384)
    atol, rtol = KERNEL_TOL[torch.float32]
    torch.testing.assert_close(out.double(), targets_by_hand(video, idx, 2, 8, normalize, eps), atol=atol, rtol=rtol)
    if (normalize, eps) == (True, 1e-6):  # the default: per-cube standardization
        torch.testing.assert_close(ops.cube_targets_ref(video, idx, tubelet=2, patch=8), out, atol=0, rtol=0)


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("normalize,eps", [(True, 1e-6), (True, 0.5), (False, 1e-6)])
def test_loss_and_grad_match_by_hand(kernels, normalize, eps):
    """The public op (kernels on: the CPU kernel, native or the reference; off: the reference
    loss, autograd) and the reference, loss and the gradient of pred, with an incoming gradient."""
    video, idx = video_clip(2, 4, 16, 24), rand_idx(2, 5, 12)
    pred = torch.randn(2, 5, 384, dtype=torch.float64)
    w = torch.rand(2, 5, dtype=torch.float64)
    w[0, 1] = 0
    want, want_g = loss_by_hand(pred, targets_by_hand(video, idx, 2, 8, normalize, eps), w)
    for fn in (ops.masked_mse_loss, ops.masked_mse_loss_ref):
        with use_kernels(kernels):
            loss, g = loss_and_grad(fn, pred, video, idx, w, tubelet=2, patch=8, normalize=normalize, eps=eps)
        assert loss.dtype == torch.float32 and g.dtype == torch.float64
        torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.double(), 1.7 * want_g, atol=1e-6, rtol=1e-4)


def test_defaults_normalize_with_eps_1e_6():
    video, idx = video_clip(1), rand_idx(1, 3, 12)
    pred, w = torch.randn(1, 3, 384), torch.ones(1, 3)
    want, _ = loss_by_hand(pred, targets_by_hand(video, idx, 2, 8, True, 1e-6), w)
    for fn in (ops.masked_mse_loss, ops.masked_mse_loss_ref):
        torch.testing.assert_close(fn(pred, video, idx, w, tubelet=2, patch=8).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight", ["zeros", "bool", "below one"])
def test_zero_bool_and_small_weights_by_hand(weight):
    """Weights summing to 0 give 0; any positive sum divides, also one below 1."""
    video, idx = video_clip(2, dtype=torch.uint8), rand_idx(2, 3, 12)
    pred = torch.randn(2, 3, 384)
    w = {"zeros": torch.zeros(2, 3), "bool": torch.tensor([[True, False, True], [False, False, True]]),
         "below one": torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.3, 0.0]])}[weight]
    want, want_g = loss_by_hand(pred, targets_by_hand(video, idx, 2, 8), w)
    for fn in (ops.masked_mse_loss, ops.masked_mse_loss_ref):
        loss, g = loss_and_grad(fn, pred, video, idx, w, tubelet=2, patch=8)
        torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.double(), 1.7 * want_g, atol=1e-6, rtol=1e-4)


def test_backward_reference_by_hand():
    from vmae_fast.ops.masked_mse import _backward_ref
    video, idx = video_clip(2, 4, 16, 24), rand_idx(2, 5, 12)
    pred, w = torch.randn(2, 5, 384, dtype=torch.bfloat16), torch.rand(2, 5)
    for normalize, eps in ((True, 1e-6), (False, 1e-6), (True, 0.5)):
        g = _backward_ref(torch.tensor(1.7), pred, video, idx, w, 2, 8, normalize, eps)
        _, want = loss_by_hand(pred, targets_by_hand(video, idx, 2, 8, normalize, eps), w)
        assert g.dtype == torch.bfloat16
        atol, rtol = KERNEL_TOL[torch.bfloat16]
        torch.testing.assert_close(g.double(), 1.7 * want, atol=atol * want.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("which", ["video", "weight"])
def test_a_clip_or_weight_needing_grad_takes_the_reference(which):
    video, idx = video_clip(1), rand_idx(1, 3, 12)
    pred, w = torch.randn(1, 3, 384, requires_grad=True), torch.rand(1, 3)
    video.requires_grad_(which == "video")
    w.requires_grad_(which == "weight")
    with use_kernels(True):
        loss = ops.masked_mse_loss(pred, video, idx, w, tubelet=2, patch=8, normalize=False, eps=0.5)
    loss.backward()
    grad = (video if which == "video" else w).grad
    assert grad is not None and grad.abs().sum() > 0  # the reference's autograd reached it
    want, want_g = loss_by_hand(pred.detach(), targets_by_hand(video.detach(), idx, 2, 8, False), w.detach())
    torch.testing.assert_close(loss.detach().double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.grad.double(), want_g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("bad,msg", [
    (lambda p, v, i, w: dict(tubelet=0), "tubelet and patch must be positive ints, got 0, 8"),
    (lambda p, v, i, w: dict(patch=0), "tubelet and patch must be positive ints, got 2, 0"),
    (lambda p, v, i, w: dict(patch=8.0), "tubelet and patch must be positive ints, got 2, 8.0"),
    (lambda p, v, i, w: dict(video=v[:, :2], pred=p[..., :256]),
     "the target un-normalizes with the 3-channel ImageNet stats, got C=2"),
    (lambda p, v, i, w: dict(pred=p[..., :-1]), "pred must be (2, n, 384) for this clip and cube size, got (2, 3, 383)"),
    (lambda p, v, i, w: dict(pred=p[0]), "pred must be (2, n, 384) for this clip and cube size, got (3, 384)"),
    (lambda p, v, i, w: dict(pred=p[:1]), "pred must be (2, n, 384) for this clip and cube size, got (1, 3, 384)"),
    (lambda p, v, i, w: dict(pred=p.long()), "pred must be floating point, got torch.int64"),
    (lambda p, v, i, w: dict(decoder_idx=i.to("meta")), "decoder_idx is on meta, expected cpu (the device of the first input)"),
    (lambda p, v, i, w: dict(weight=w.to("meta")), "weight is on meta, expected cpu (the device of the first input)"),
    (lambda p, v, i, w: dict(video=v.to("meta")), "video is on meta, expected cpu (the device of the first input)"),
    (lambda p, v, i, w: dict(decoder_idx=i + 10), "decoder_idx holds token indices in [10, 14], expected [0, 12)"),
    (lambda p, v, i, w: dict(decoder_idx=i[:, :2]), "decoder_idx must be (2, 3) to match pred, got (2, 2)"),
    (lambda p, v, i, w: dict(weight=w[:, :2]), "weight must be (2, 3) to match pred, got (2, 2)"),
    (lambda p, v, i, w: dict(weight=w.long()), "weight must be floating point or bool, got torch.int64"),
])
def test_public_op_refuses_bad_input_in_words(bad, msg):
    p, v, i, w = torch.randn(2, 3, 384), video_clip(2), torch.tensor([[0, 4, 1], [2, 3, 1]]), torch.ones(2, 3)
    kw = dict(pred=p, video=v, decoder_idx=i, weight=w, tubelet=2, patch=8) | bad(p, v, i, w)
    with use_kernels(True), pytest.raises(ValueError) as err:
        ops.masked_mse_loss(**kw)
    assert err.type is ValueError and str(err.value) == msg


def test_validate_names_a_weight_that_is_not_a_tensor():
    """(The launchers call this check too.)"""
    from vmae_fast.ops.masked_mse import _validate
    with pytest.raises(TypeError) as err:
        _validate(torch.randn(2, 3, 384), video_clip(2), torch.zeros(2, 3, dtype=torch.int64), [1.0], 2, 8)
    assert err.type is TypeError and str(err.value) == "weight must be a torch.Tensor, got list"


@pytest.mark.parametrize("tubelet,patch", [(1, 4), (2, 1)])
def test_unit_cube_sides_are_valid(tubelet, patch):
    video = video_clip(2, 2, 8, 8)
    N = (2 // tubelet) * (8 // patch) ** 2
    idx, w = rand_idx(2, 3, N), torch.rand(2, 3)
    pred = torch.randn(2, 3, 3 * tubelet * patch * patch)
    want, _ = loss_by_hand(pred, targets_by_hand(video, idx, tubelet, patch), w)
    with use_kernels(True):
        loss = ops.masked_mse_loss(pred, video, idx, w, tubelet=tubelet, patch=patch)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)


def test_the_op_differentiates_pred_only():
    """Called directly with a clip that needs a gradient (the public function would take the
    reference), the op's backward gives pred its gradient and the clip none."""
    video, idx, w = video_clip(1).requires_grad_(), rand_idx(1, 2, 12), torch.ones(1, 2)
    for pred_grad in (False, True):
        pred = torch.randn(1, 2, 384, requires_grad=pred_grad)
        torch.ops.vmae_fast.masked_mse_loss(pred, video, idx, w, 2, 8, True, 1e-6).backward()
        assert video.grad is None and (pred.grad is not None) == pred_grad


def test_public_op_through_the_interpreted_kernels_by_hand(interpret):
    """Through the registered kernels: a 2-frame clip (fewer frames than channels), a non-default
    eps, weights summing below 1; loss and gradient against the by-hand values."""
    video, idx = video_clip(2, 2, 16, 24), rand_idx(2, 3, 6)
    pred = torch.randn(2, 3, 3 * 2 * 8 * 8, dtype=torch.float64)
    w = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.3, 0.0]], dtype=torch.float64)
    want, want_g = loss_by_hand(pred, targets_by_hand(video, idx, 2, 8, True, 0.5), w)
    loss, g = loss_and_grad(ops.masked_mse_loss, pred, video, idx, w, tubelet=2, patch=8, eps=0.5)
    assert g.dtype == torch.float64
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), 1.7 * want_g, atol=1e-6, rtol=1e-4)
    # the launcher's own defaults: normalize, eps 1e-6
    g = masked_mse_loss_backward_triton(torch.tensor(1.7), pred, video, idx, w, tubelet=2, patch=8)
    assert g.dtype == torch.float64  # pred's
    _, want_g = loss_by_hand(pred, targets_by_hand(video, idx, 2, 8, True, 1e-6), w)
    torch.testing.assert_close(g.double(), 1.7 * want_g, atol=1e-6, rtol=1e-4)
