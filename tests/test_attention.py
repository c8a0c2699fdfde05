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


def test_dropout_on_the_probabilities_in_every_backend():
    """``dropout_p``: the math backend drops the softmax probabilities as the official code does
    (the same draws reproduce it by hand); SDPA applies its own dropout; 0 is the plain function."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 10, 3, 2, 8, generator=g)
    plain = attention(qkv, "math")
    torch.manual_seed(3)
    got = attention(qkv, "math", dropout_p=0.4)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    torch.manual_seed(3)
    want = (F.dropout(((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(-1), 0.4, True) @ v)
    assert torch.equal(got, want.transpose(1, 2).reshape(2, 10, 16))
    assert not torch.allclose(got, plain)
    torch.manual_seed(3)
    sdpa = attention(qkv, "sdpa", dropout_p=0.4)
    assert sdpa.shape == plain.shape and not torch.allclose(sdpa, attention(qkv, "sdpa"))
    assert torch.allclose(attention(qkv, "sdpa", dropout_p=0.0), plain, atol=1e-6)
