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
