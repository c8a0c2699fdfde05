"""Attention dispatch: backends agree with the naive reference; clear errors listing reasons."""
from __future__ import annotations

import pytest
import torch

from vmae_fast.attention import AttentionBackendError, attention, effective_backend, resolve


@pytest.mark.parametrize("shape", [(2, 17, 3, 3, 24), (1, 1, 3, 1, 8), (3, 50, 3, 4, 88)])
def test_sdpa_equals_math(shape):
    qkv = torch.randn(shape, requires_grad=True)
    a = attention(qkv, "sdpa")
    ga, = torch.autograd.grad(a.square().sum(), qkv)
    b = attention(qkv, "math")
    gb, = torch.autograd.grad(b.square().sum(), qkv)
    assert a.shape == (shape[0], shape[1], shape[3] * shape[4])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_missing_backend_error_lists_reasons():
    qkv = torch.randn(1, 4, 3, 2, 8)
    with pytest.raises(AttentionBackendError, match="flash_attn: (package flash_attn is not installed|needs a CUDA)"):
        attention(qkv, "flash_attn")
    with pytest.raises(AttentionBackendError, match="xformers: "):
        attention(qkv, "xformers")
    assert resolve("auto", qkv) == "sdpa"  # flash_attn is first but unusable on CPU fp32
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, N, 3, H, d\)"):
        attention(torch.randn(1, 4, 2, 2, 8), "sdpa")


def test_env_override(monkeypatch):
    monkeypatch.setenv("VMAE_FAST_ATTN", "math")
    assert effective_backend("sdpa") == "math"
    monkeypatch.setenv("VMAE_FAST_ATTN", "bogus")
    with pytest.raises(ValueError, match="unknown attention backend 'bogus'"):
        effective_backend("sdpa")
