"""Helpers of the fused-op tests (imported by tests/test_ops_*.py; not a conftest)."""
from __future__ import annotations

import pytest
import torch

from vmae_fast.ops import _dispatch


INTERPRET_SKIP = ("Triton kernels on CPU need TRITON_INTERPRET=1 set before Triton is imported; "
                  "`make test` runs these tests in their own process (pytest -m interpret)")


@pytest.fixture
def interpret(monkeypatch):
    """CPU tensors of the public ops run the Triton kernels through the interpreter: in a process
    started with ``TRITON_INTERPRET=1`` they are the ops' registered CPU kernels, whether or not
    the native extension is built. Tests using this fixture are marked ``interpret`` (conftest)."""
    if not _dispatch.HAS_TRITON:
        pytest.skip("needs triton")
    if not _dispatch.INTERPRETED:
        pytest.skip(INTERPRET_SKIP)
    assert _dispatch.kernel_paths()["gather_cubes"]["cpu"] == "triton (interpreter)"
    monkeypatch.setenv("VMAE_FAST_KERNELS", "1")


def video_clip(B=2, T=4, H=16, W=24, dtype=torch.float32, device="cpu", layout="contiguous"):
    """A small clip; ``layout='strided'`` gives a non-contiguous view (W-stride != 1)."""
    if dtype == torch.uint8:
        v = torch.randint(0, 256, (B, 3, T, H, W), dtype=torch.uint8, device=device)
    else:
        v = torch.randn(B, 3, T, H, W, device=device).to(dtype)
    if layout == "strided":
        v = v.permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)  # H-fastest storage
    elif layout == "sliced":
        big = torch.zeros((B, 3, T, H, 2 * W), dtype=v.dtype, device=device)
        big[..., ::2] = v
        v = big[..., ::2]
    return v


def rand_idx(B, n, N, device="cpu", dtype=torch.int64, sort=True):
    """``(B, n)`` distinct token indices per row (sorted as DualMask gives them)."""
    idx = torch.stack([torch.randperm(N, device=device)[:n] for _ in range(B)])
    if sort:
        idx = idx.sort(dim=1).values
    return idx.to(dtype)


# Oracles written token by token in float64 from the definitions (VideoMAE's cube order, the
# ImageNet statistics as published), independent of the ops' vectorized references.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _cube(video, b, tok, t, p):
    """Clip ``b``'s cube at token ``tok`` ((t, h, w) raster order) as ``(C, t, p, p)`` float64,
    pixels as the model sees them (uint8: ``(x / 255 - mean) / std``)."""
    _, C, _, H, W = video.shape
    hw = (H // p) * (W // p)
    ti, hi, wi = tok // hw, (tok % hw) // (W // p), tok % (W // p)
    cube = video[b, :, ti * t:(ti + 1) * t, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p].double()
    if video.dtype == torch.uint8:
        cube = torch.stack([(cube[c] / 255 - MEAN[c]) / STD[c] for c in range(C)])
    return cube


def cubes_by_hand(video, idx, t, p, layout="cthw"):
    """``(B, n, C*t*p*p)`` float64: each cube flattened in ``cthw`` or ``thwc`` order."""
    rows = [[(_cube(video, b, tok, t, p) if layout == "cthw" else _cube(video, b, tok, t, p).permute(1, 2, 3, 0))
             .reshape(-1) for tok in idx[b].tolist()] for b in range(idx.shape[0])]
    return torch.stack([torch.stack(r) if r else torch.zeros(0) for r in rows])


def targets_by_hand(video, idx, t, p, normalize=True, eps=1e-6):
    """``(B, n, t*p*p*C)`` float64 reconstruction targets in ``thwc`` order: pixels in [0, 1]
    (``x / 255`` for uint8, ``x * std + mean`` for a float clip); with ``normalize`` each channel
    of each cube standardized over its t*p*p pixels, unbiased variance, ``eps`` added to the std."""
    _, C, _, H, W = video.shape
    hw = (H // p) * (W // p)
    out = []
    for b in range(idx.shape[0]):
        row = []
        for tok in idx[b].tolist():
            ti, hi, wi = tok // hw, (tok % hw) // (W // p), tok % (W // p)
            cube = video[b, :, ti * t:(ti + 1) * t, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p].double()
            if video.dtype == torch.uint8:
                x = cube / 255
            else:
                x = torch.stack([cube[c] * STD[c] + MEAN[c] for c in range(C)])
            x = x.reshape(C, -1)  # (C, t*p*p)
            if normalize:
                m = x.sum(1, keepdim=True) / x.shape[1]
                var = ((x - m) ** 2).sum(1, keepdim=True) / (x.shape[1] - 1)
                x = (x - m) / (var.sqrt() + eps)
            row.append(x.t().reshape(-1))
        out.append(torch.stack(row))
    return torch.stack(out)
