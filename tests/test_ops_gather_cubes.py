"""vmae_fast::gather_cubes against gather_cubes_ref: Triton (interpreter on CPU, CUDA when
present), dispatch, bad inputs, opcheck."""
from __future__ import annotations

import pytest
import torch

from conftest import on_devices
from ops_helpers import interpret, rand_idx, video_clip  # noqa: F401
from vmae_fast import ops
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
