"""Attention dispatch: backends agree with the naive reference; clear errors listing reasons."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
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


@pytest.mark.parametrize("shape", [(2, 37, 3, 3, 16), (1, 200, 3, 2, 64)])
def test_cpu_bf16_equals_float64_math(shape):
    from tolerances import KERNEL_TOL

    g = torch.Generator().manual_seed(1)
    qkv = (torch.randn(shape, generator=g) * 2).bfloat16()
    want = attention(qkv.double(), "math")
    got = attention(qkv, "cpu_bf16")
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel_err(got, want) < KERNEL_TOL[torch.bfloat16][0]
    # no worse than the bf16 SDPA kernel by more than the bf16 rounding of the shifted logits
    assert rel_err(got, want) < 3 * rel_err(attention(qkv, "sdpa"), want) + 2 ** -9


def test_cpu_bf16_logits_are_rounded_after_the_shift():
    """Two keys at logits 200 and 199.5, the rest far below: bf16 holds numbers near 200 to 1.0,
    so an unshifted bf16 logit 199.5 becomes 199 or 200 (the pair 0.73 / 0.27 or 0.5 / 0.5);
    shifted by the largest logit (-0.5 and 0, exact) the pair is fp64's, e^0.5 : 1."""
    d = 4
    q = torch.tensor([[1.0, 1.0, 0, 0]])                                 # scale 1: logit = k[0] + k[1]
    k = torch.zeros(16, d)
    k[:, 0] = -100.0
    k[0, :2] = torch.tensor([200.0, 0.0])                                # logit 200
    k[1, :2] = torch.tensor([199.0, 0.5])                                # logit 199.5 (each part exact in bf16)
    v = torch.zeros(16, d)
    v[0, 0] = v[1, 1] = 1.0                                              # output = (p0, p1, 0, 0)
    qkv = torch.stack((q.expand(16, d), k, v), 1).view(1, 16, 3, 1, d).bfloat16()
    got = attention(qkv, "cpu_bf16", scale=1.0).double()[0, 0]
    want = attention(qkv.double(), "math", scale=1.0)[0, 0]
    assert abs(want[0] / want[1] - torch.e ** 0.5) < 1e-9  # e^0.5 : 1
    torch.testing.assert_close(got, want, atol=2 * 2 ** -9, rtol=0)


def test_cpu_bf16_refuses_what_it_cannot_run():
    qkv = torch.randn(1, 4, 3, 2, 8)
    with pytest.raises(AttentionBackendError, match="cpu_bf16: needs bf16 inputs, got torch.float32"):
        attention(qkv, "cpu_bf16")
    with pytest.raises(AttentionBackendError, match="cpu_bf16: inference only"):
        attention(qkv.bfloat16().requires_grad_(), "cpu_bf16")
    with pytest.raises(AttentionBackendError, match="no dropout"):
        attention(qkv.bfloat16(), "cpu_bf16", dropout_p=0.1)
    assert resolve("auto", qkv.bfloat16()) == "sdpa"  # never picked by auto: the tools choose it


def test_inference_tools_pick_cpu_bf16_only_for_bf16_on_cpu(monkeypatch):
    from vmae_fast.models.factory import create_model
    from vmae_fast.tools.common import inference_attention

    def backends(model):
        return {m.backend for m in model.modules() if hasattr(m, "backend")}

    monkeypatch.delenv("VMAE_FAST_ATTN", raising=False)
    kw = dict(num_classes=3, num_frames=4, img_size=32, depth=2)
    model = create_model("vit_small_patch16_224", **kw)
    inference_attention(model, torch.device("cpu"), None)
    assert backends(model) == {"sdpa"}
    inference_attention(model, torch.device("cpu"), torch.bfloat16)
    assert backends(model) == {"cpu_bf16"}
    monkeypatch.setenv("VMAE_FAST_ATTN", "math")
    inference_attention(model, torch.device("cpu"), torch.bfloat16)
    assert backends(model) == {"math"}


def test_a_backend_set_after_construction_is_what_the_config_says(monkeypatch):
    """The tools switch a loaded model to cpu_bf16 (bf16 on a CPU): its config (and the pretraining
    model's encoder's) then says so, as a model built with that backend, and every attention runs it."""
    import vmae_fast
    from vmae_fast.layers import Attention
    from vmae_fast.reference import ReferencePretrain
    from vmae_fast.tools.common import inference_attention

    monkeypatch.delenv("VMAE_FAST_ATTN", raising=False)
    kw = dict(depth=1, num_frames=4, img_size=32, patch_size=8)
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=3, **kw)
    pt = vmae_fast.create_pretrain_model("vit_small_patch16_224", decoder_depth=1, **kw)
    for model in (clf, pt):
        assert model.cfg.attn_backend == "sdpa"
        inference_attention(model, torch.device("cpu"), torch.float32)  # fp32: left as it is
        assert model.cfg.attn_backend == "sdpa"
        inference_attention(model, torch.device("cpu"), torch.bfloat16)
        configs = [m.cfg for m in model.modules() if hasattr(m, "cfg")]
        assert len(configs) == (1 if model is clf else 2)
        assert all(c.attn_backend == "cpu_bf16" for c in configs), configs
        assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"cpu_bf16"}
    built = vmae_fast.create_pretrain_model("vit_small_patch16_224", decoder_depth=1, attn_backend="cpu_bf16", **kw)
    assert pt.cfg == built.cfg and repr(pt.cfg) == repr(built.cfg)
    assert ReferencePretrain.from_model(pt).cfg.attn_backend == "cpu_bf16"
