"""vmae_fast::gather_cubes against gather_cubes_ref: Triton (interpreter on CPU, CUDA when
present), dispatch, bad inputs, opcheck."""
from __future__ import annotations

import pytest
import torch

from conftest import on_devices
from ops_helpers import cubes_by_hand, interpret, rand_idx, video_clip  # noqa: F401
from tolerances import KERNEL_TOL
from vmae_fast import ops
from vmae_fast.ops import use_kernels
from vmae_fast.ops.gather_cubes import gather_cubes_triton


@pytest.mark.parametrize("layout", ["cthw", "thwc"])
@pytest.mark.parametrize("dtype,storage", [(torch.float32, "contiguous"), (torch.float32, "strided"),
                                           (torch.uint8, "contiguous"), (torch.uint8, "sliced"),
                                           (torch.float64, "sliced")])
def test_triton_matches_ref(layout, dtype, storage, interpret):
    B, T, H, W, t, p = 2, 4, 16, 24, 2, 8
    video = video_clip(B, T, H, W, dtype=dtype, layout=storage)
    N = (T // t) * (H // p) * (W // p)
    idx = rand_idx(B, 5, N, sort=False)  # n not a power of two, any order
    out = gather_cubes_triton(video, idx, tubelet=t, patch=p, layout=layout)
    ref = ops.gather_cubes_ref(video, idx, tubelet=t, patch=p, layout=layout)
    assert out.shape == (B, 5, 3 * t * p * p) and out.dtype == ref.dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-6 if dtype == torch.uint8 else 0, rtol=1e-6 if dtype == torch.uint8 else 0)


def test_odd_patch_int32_idx_noncontig_idx(interpret):
    # patch 6 (not a power of two), tubelet 3, B=3, idx int32 and a transposed (strided) view
    video = video_clip(3, 6, 12, 18)
    idx = rand_idx(3, 7, 2 * 2 * 3, dtype=torch.int32).t().contiguous().t()
    assert not idx.is_contiguous()
    for layout in ("cthw", "thwc"):
        out = gather_cubes_triton(video, idx, tubelet=3, patch=6, layout=layout)
        torch.testing.assert_close(out, ops.gather_cubes_ref(video, idx, tubelet=3, patch=6, layout=layout),
                                   atol=0, rtol=0)


def test_empty_idx():
    video = video_clip(2)
    idx = torch.zeros(2, 0, dtype=torch.int64)
    out = gather_cubes_triton(video, idx, tubelet=2, patch=8)
    assert out.shape == (2, 0, 384)


def test_dispatch_uses_op(interpret):
    video = video_clip(2, dtype=torch.uint8)
    idx = rand_idx(2, 3, 12)
    out = ops.gather_cubes(video, idx, tubelet=2, patch=8, layout="thwc")
    torch.testing.assert_close(out, ops.gather_cubes_ref(video, idx, tubelet=2, patch=8, layout="thwc"),
                               atol=1e-6, rtol=1e-6)


def test_grad_video_falls_back_to_ref(interpret):
    video = video_clip(1).requires_grad_()
    idx = rand_idx(1, 4, 12)
    out = ops.gather_cubes(video, idx, tubelet=2, patch=8)
    out.square().sum().backward()
    v2 = video.detach().clone().requires_grad_()
    ops.gather_cubes_ref(v2, idx, tubelet=2, patch=8).square().sum().backward()
    torch.testing.assert_close(video.grad, v2.grad, atol=0, rtol=0)
    assert torch.count_nonzero(video.grad) == 4 * 384  # only the gathered pixels


def test_kernels_disabled_uses_ref(monkeypatch):
    monkeypatch.setenv("VMAE_FAST_KERNELS", "0")
    called = []
    monkeypatch.setattr(torch.ops.vmae_fast, "gather_cubes", lambda *a: called.append(1), raising=False)
    video, idx = video_clip(1), rand_idx(1, 2, 12)
    out = ops.gather_cubes(video, idx, tubelet=2, patch=8)
    assert not called and out.shape == (1, 2, 384)


@pytest.mark.parametrize("bad,msg", [
    (lambda v, i: (v[0], i), "video must be a"),
    (lambda v, i: (v[..., :20], i), "does not divide"),
    (lambda v, i: (v.int(), i), "floating point"),
    (lambda v, i: (v, i.float()), "int64 or int32"),
    (lambda v, i: (v, i[:1]), "integer tensor"),
    (lambda v, i: (v, i + 12), "expected \\[0, 12\\)"),
    (lambda v, i: (v, i - 20), "expected \\[0, 12\\)"),
    (lambda v, i: (v[:, :2].to(torch.uint8), i), "3-channel"),
])
def test_bad_input(bad, msg, interpret):
    v, i = bad(video_clip(2), rand_idx(2, 3, 12))
    with pytest.raises(ValueError, match=msg):
        gather_cubes_triton(v, i, tubelet=2, patch=8)
    with pytest.raises(ValueError, match=msg):
        ops.gather_cubes(v, i, tubelet=2, patch=8)


def test_bad_layout_and_sizes():
    v, i = video_clip(1), rand_idx(1, 2, 12)
    with pytest.raises(ValueError, match="layout"):
        gather_cubes_triton(v, i, tubelet=2, patch=8, layout="chw")
    with pytest.raises(ValueError, match="positive ints"):
        gather_cubes_triton(v, i, tubelet=0, patch=8)


def test_opcheck(interpret):
    for video in (video_clip(2), video_clip(2, dtype=torch.uint8)):
        torch.library.opcheck(torch.ops.vmae_fast.gather_cubes.default, (video, rand_idx(2, 3, 12), 2, 8, True))


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
@pytest.mark.parametrize("layout", ["cthw", "thwc"])
def test_matches_ref_on_device(device, dtype, layout):
    video = video_clip(3, 4, 28, 42, dtype=dtype, device=device, layout="strided")
    idx = rand_idx(3, 11, 2 * 2 * 3, device=device)
    out = ops.gather_cubes(video, idx, tubelet=2, patch=14, layout=layout)
    ref = ops.gather_cubes_ref(video, idx, tubelet=2, patch=14, layout=layout)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


# ---- the reference and the switch against the token-by-token oracle (no interpreter needed)

@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_ref_matches_the_oracle_default_layout_cthw(dtype):
    video, idx = video_clip(2, 4, 16, 24, dtype=dtype), rand_idx(2, 5, 12, sort=False)
    atol, rtol = KERNEL_TOL[torch.float32]
    for kw, layout in (({}, "cthw"), ({"layout": "thwc"}, "thwc")):
        out = ops.gather_cubes_ref(video, idx, tubelet=2, patch=8, **kw)
        assert out.dtype == torch.float32 and out.shape == (2, 5, 384)
        torch.testing.assert_close(out.double(), cubes_by_hand(video, idx, 2, 8, layout), atol=atol, rtol=rtol)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_reference_path_keeps_the_layout(requires_grad):
    """Kernels off, or a clip that needs a gradient: the reference, in the layout asked for."""
    video, idx = video_clip(1).requires_grad_(requires_grad), rand_idx(1, 3, 12)
    with use_kernels(requires_grad):  # the switch off, or on with a clip needing a gradient
        out = ops.gather_cubes(video, idx, tubelet=2, patch=8, layout="thwc")
    torch.testing.assert_close(out.detach().double(), cubes_by_hand(video.detach(), idx, 2, 8, "thwc"),
                               atol=0, rtol=0)
    if requires_grad:  # the reference's autograd: the gathered pixels get their gradient
        out.sum().backward()
        assert int(torch.count_nonzero(video.grad)) == 3 * 384


def test_ref_errors_name_the_argument():
    video = video_clip(1)
    with pytest.raises(ValueError, match=r"^layout must be one of \('cthw', 'thwc'\), got 'chw'$"):
        ops.gather_cubes_ref(video, rand_idx(1, 2, 12), tubelet=2, patch=8, layout="chw")
    with pytest.raises(ValueError, match=r"^idx holds token indices in \[3, 12\], expected \[0, 12\)$"):
        ops.gather_cubes_ref(video, torch.tensor([[3, 12]]), tubelet=2, patch=8)


@pytest.mark.parametrize("bad,msg", [
    (lambda v, i: dict(video=v, idx=i, tubelet=0), "tubelet and patch must be positive ints, got 0, 8"),
    (lambda v, i: dict(video=v, idx=i, patch=0), "tubelet and patch must be positive ints, got 2, 0"),
    (lambda v, i: dict(video=v, idx=i, layout="chw"), "layout must be one of ('cthw', 'thwc'), got 'chw'"),
    (lambda v, i: dict(video=v[:, :2].to(torch.uint8), idx=i),
     "a uint8 clip is normalized with the 3-channel ImageNet stats, got C=2"),
    (lambda v, i: dict(video=v, idx=i.to("meta")), "idx is on meta, expected cpu (the device of the first input)"),
    (lambda v, i: dict(video=v, idx=i + 10), "idx holds token indices in [10, 14], expected [0, 12)"),
])
def test_public_op_refuses_bad_input_in_words(bad, msg):
    """The checks of the public op (kernels on: native or reference on CPU), message word for word."""
    kw = dict(tubelet=2, patch=8) | bad(video_clip(2), torch.tensor([[0, 4], [2, 3]]))
    with use_kernels(True), pytest.raises(ValueError) as err:
        ops.gather_cubes(**kw)
    assert err.type is ValueError and str(err.value) == msg


@pytest.mark.parametrize("C,tubelet,patch", [(2, 1, 8), (3, 2, 1)])
def test_public_op_any_channels_float_and_unit_cube_sides(C, tubelet, patch):
    """Tubelet 1 and patch 1 are valid sizes; a float clip may have any number of channels."""
    video = torch.randn(2, C, 2, 8, 8)
    N = (2 // tubelet) * (8 // patch) ** 2
    idx = rand_idx(2, 3, N, sort=False)
    with use_kernels(True):
        out = ops.gather_cubes(video, idx, tubelet=tubelet, patch=patch)
    torch.testing.assert_close(out.double(), cubes_by_hand(video, idx, tubelet, patch), atol=0, rtol=0)



@pytest.mark.parametrize("layout", ["cthw", "thwc"])
def test_public_op_through_the_interpreted_kernel_matches_the_oracle(layout, interpret):
    video, idx = video_clip(2), rand_idx(2, 3, 12, sort=False)
    out = ops.gather_cubes(video, idx, tubelet=2, patch=8, layout=layout)
    torch.testing.assert_close(out.double(), cubes_by_hand(video, idx, 2, 8, layout), atol=0, rtol=0)


@pytest.mark.parametrize("T,HW,tubelet,patch", [(2, 32, 2, 32), (684, 1, 684, 1)])
def test_triton_block_sizes_at_the_extremes(T, HW, tubelet, patch, interpret):
    """A 32-pixel patch (few pixel rows per block) and a 684-frame tubelet of 1-pixel patches
    (more than 2048 pixel rows): the blocks stay powers of two and cover every row."""
    video = torch.randn(1, 3, T, HW, HW)
    idx = torch.zeros(1, 1, dtype=torch.int64)
    for layout in ("cthw", "thwc"):
        out = gather_cubes_triton(video, idx, tubelet=tubelet, patch=patch, layout=layout)
        torch.testing.assert_close(out.double(), cubes_by_hand(video, idx, tubelet, patch, layout), atol=0, rtol=0)
