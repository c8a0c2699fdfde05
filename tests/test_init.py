"""Every parameter starts from the official code's distribution (docs/semantics.md §6).

The rules are restated here from the official VideoMAE V2 code (models/modeling_pretrain.py and
models/modeling_finetune.py), not taken from ours:

- pretraining: the encoder and the decoder each ``apply`` Xavier-uniform to their Linears (zero
  bias) and 1/0 to their LayerNorms; the top-level model never applies its ``_init_weights``, so
  ``encoder_to_decoder`` keeps ``nn.Linear``'s default; ``mask_token`` is a normal(0.02)
  truncated at +-1 std; the patch embedding is a Conv3d, which no ``_init_weights`` touches.
- fine-tuning: every Linear a normal(0.02) truncated at +-2 (absolute: practically untruncated),
  zero bias; LayerNorms 1/0; then the head's weight and bias are multiplied by ``init_scale``.
- both: ``q_bias``/``v_bias`` zeros, layer-scale gammas ``init_values``, cosine attention's
  ``scale`` log(10).

PyTorch's default for Linear and Conv3d (kaiming-uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)).

Each random rule is checked by its support (|x| within the bound, reached for large tensors), its
mean and std within 6 standard errors of the sample (the std's error from the distribution's
kurtosis), and a Kolmogorov-Smirnov distance to the rule's CDF; constants are checked exactly.
A parameter no rule names fails the test, so a new parameter must be given its rule here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch

import vmae_fast

SQRT2 = math.sqrt(2.0)


def _phi(x):  # standard normal CDF
    return 0.5 * (1 + torch.erf(x / SQRT2))


@dataclass(frozen=True)
class Uniform:
    bound: float

    def std(self):
        return self.bound / math.sqrt(3)

    kurtosis = 1.8
    support = property(lambda self: self.bound)

    def cdf(self, x):
        return ((x + self.bound) / (2 * self.bound)).clamp(0, 1)


@dataclass(frozen=True)
class TruncNormal:
    """N(0, sigma^2) restricted to [-cut, cut]."""
    sigma: float
    cut: float

    def _z(self):
        return self.cut / self.sigma

    def std(self):
        z = self._z()
        pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        mass = math.erf(z / SQRT2)
        return self.sigma * math.sqrt(1 - 2 * z * pdf / mass)

    @property
    def kurtosis(self):
        z = self._z()
        pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        mass = math.erf(z / SQRT2)
        m2 = 1 - 2 * z * pdf / mass
        m4 = 3 - 2 * (z ** 3 + 3 * z) * pdf / mass
        return m4 / m2 ** 2

    support = property(lambda self: self.cut)

    def cdf(self, x):
        z = torch.tensor(self._z(), dtype=x.dtype)
        lo = _phi(-z)
        return ((_phi(x / self.sigma) - lo) / (_phi(z) - lo)).clamp(0, 1)


@dataclass(frozen=True)
class Const:
    value: float


def xavier(fan_out, fan_in):
    return Uniform(math.sqrt(6.0 / (fan_in + fan_out)))


def torch_default(fan_in):
    return Uniform(1.0 / math.sqrt(fan_in))


def pretrain_rules(cfg):
    """(name pattern, rule) for every parameter of the official pretraining model."""
    D, Dd, H, Hd = cfg.embed_dim, cfg.decoder_embed_dim, cfg.mlp_hidden, cfg.decoder_mlp_hidden
    cube = cfg.in_chans * cfg.tubelet_size * cfg.patch_size ** 2

    def block(prefix, d, h):
        return [
            (rf"{prefix}\.blocks\.\d+\.norm[12]\.weight", Const(1.0)),
            (rf"{prefix}\.blocks\.\d+\.norm[12]\.bias", Const(0.0)),
            (rf"{prefix}\.blocks\.\d+\.attn\.qkv\.weight", xavier(3 * d, d)),
            (rf"{prefix}\.blocks\.\d+\.attn\.[qv]_bias", Const(0.0)),
            (rf"{prefix}\.blocks\.\d+\.attn\.proj\.weight", xavier(d, d)),
            (rf"{prefix}\.blocks\.\d+\.attn\.proj\.bias", Const(0.0)),
            (rf"{prefix}\.blocks\.\d+\.mlp\.fc1\.weight", xavier(h, d)),
            (rf"{prefix}\.blocks\.\d+\.mlp\.fc2\.weight", xavier(d, h)),
            (rf"{prefix}\.blocks\.\d+\.mlp\.fc[12]\.bias", Const(0.0)),
            (rf"{prefix}\.blocks\.\d+\.gamma_[12]", Const(cfg.init_values)),
        ]

    return [
        (r"encoder\.patch_embed\.proj\.(weight|bias)", torch_default(cube)),
        *block("encoder", D, H),
        (r"encoder\.norm\.weight", Const(1.0)),
        (r"encoder\.norm\.bias", Const(0.0)),
        # the official quirk: never re-initialized, nn.Linear's default (not Xavier)
        (r"encoder_to_decoder\.weight", torch_default(D)),
        (r"mask_token", TruncNormal(0.02, 0.02)),
        *block("decoder", Dd, Hd),
        (r"decoder\.norm\.weight", Const(1.0)),
        (r"decoder\.norm\.bias", Const(0.0)),
        (r"decoder\.head\.weight", xavier(cube, Dd)),
        (r"decoder\.head\.bias", Const(0.0)),
    ]


def classifier_rules(cfg, head_init_scale):
    """(name pattern, rule) for every parameter of the official fine-tuning model."""
    cube = cfg.in_chans * cfg.tubelet_size * cfg.patch_size ** 2
    tn = TruncNormal(0.02, 2.0)  # timm's trunc_normal_ cuts at +-2 absolute
    return [
        (r"patch_embed\.proj\.(weight|bias)", torch_default(cube)),
        (r"blocks\.\d+\.norm[12]\.weight", Const(1.0)),
        (r"blocks\.\d+\.norm[12]\.bias", Const(0.0)),
        (r"blocks\.\d+\.attn\.(qkv|proj)\.weight", tn),
        (r"blocks\.\d+\.mlp\.fc[12]\.weight", tn),
        (r"blocks\.\d+\.(attn\.proj|mlp\.fc[12])\.bias", Const(0.0)),
        (r"blocks\.\d+\.attn\.[qv]_bias", Const(0.0)),
        (r"blocks\.\d+\.attn\.scale", Const(math.log(10.0))),
        (r"blocks\.\d+\.gamma_[12]", Const(cfg.init_values)),
        (r"(fc_norm|norm)\.weight", Const(1.0)),
        (r"(fc_norm|norm)\.bias", Const(0.0)),
        (r"head\.weight", TruncNormal(0.02 * head_init_scale, 2.0 * head_init_scale)),
        (r"head\.bias", Const(0.0)),
    ]


def check(name: str, p: torch.Tensor, rule) -> None:
    if isinstance(rule, Const):  # exact, in the parameter's dtype (float32(0.1) for init_values=0.1)
        assert torch.equal(p.detach(), torch.full_like(p, rule.value)), f"{name}: not all {rule.value}"
        return
    x = p.detach().double().flatten()
    n = x.numel()
    assert n >= 100, f"{name}: too few values ({n}) to judge a distribution"
    want = rule.std()
    top = x.abs().max().item()
    assert top <= rule.support * (1 + 1e-6), f"{name}: |x| reaches {top:.4g}, beyond the rule's {rule.support:.4g}"
    if rule.support < 6 * want and n >= 10_000:  # a bounded law's edge is reached by a large sample
        assert top >= 0.99 * rule.support, f"{name}: max |x| {top:.4g} short of the bound {rule.support:.4g}"
    assert abs(x.mean().item()) <= 6 * want / math.sqrt(n), f"{name}: mean {x.mean().item():.3g}, want 0"
    std_se = want * math.sqrt((rule.kurtosis - 1) / (4 * n))
    assert abs(x.std().item() - want) <= 6 * std_se, f"{name}: std {x.std().item():.5g}, want {want:.5g}"
    # KS distance; its 1e-6 critical value is sqrt(ln(2e6) / (2n))
    xs = x.sort().values
    F = rule.cdf(xs)
    i = torch.arange(1, n + 1, dtype=xs.dtype)
    ks = torch.maximum(i / n - F, F - (i - 1) / n).max().item()
    assert ks <= math.sqrt(math.log(2e6) / (2 * n)), f"{name}: KS distance {ks:.4f} to {rule}"


def check_model(model, rules):
    for name, p in model.named_parameters():
        hits = [rule for pat, rule in rules if re.fullmatch(pat, name)]
        assert len(hits) == 1, f"{name}: {len(hits)} rules (the table must name each parameter once)"
        check(name, p, hits[0])


SMALL = dict(depth=2, decoder_depth=1, num_frames=4, img_size=32)
ARCHS = ["vit_small_patch16_224", "vit_base_patch16_224"]


@pytest.mark.parametrize("arch, init_values", [(ARCHS[0], 0.0), (ARCHS[0], 0.1), (ARCHS[1], 0.0)])
def test_pretrain_init_is_official(arch, init_values):
    model = vmae_fast.create_pretrain_model(arch, init_values=init_values, **SMALL)
    check_model(model, pretrain_rules(model.cfg))
    assert ("encoder.blocks.0.gamma_1" in dict(model.named_parameters())) == (init_values > 0)


VARIANT = dict(init_values=0.1, cos_attn=True, use_mean_pooling=False, head_init_scale=1.0)


@pytest.mark.parametrize("arch, variant", [(ARCHS[0], {}), (ARCHS[0], VARIANT), (ARCHS[1], {})])
def test_classifier_init_is_official(arch, variant):
    kw = {k: v for k, v in SMALL.items() if k != "decoder_depth"}
    model = vmae_fast.create_model(arch, num_classes=400, **kw, **variant)
    check_model(model, classifier_rules(model.cfg, variant.get("head_init_scale", 0.001)))


def test_rules_tell_the_official_inits_apart():
    """The checks separate the candidates that a drift would swap in: encoder_to_decoder of
    ViT-B under Xavier (std .042) vs the default (std .021), truncation at one std vs none."""
    torch.manual_seed(0)
    w = torch.empty(384, 768)
    torch.nn.init.xavier_uniform_(w)
    with pytest.raises(AssertionError, match="beyond"):
        check("encoder_to_decoder.weight", w, torch_default(768))
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    check("encoder_to_decoder.weight", w, torch_default(768))
    with pytest.raises(AssertionError, match="std|bound"):
        check("encoder_to_decoder.weight", w, xavier(384, 768))
    t = torch.empty(400, 768)
    torch.nn.init.trunc_normal_(t, std=0.02)
    check("head.weight", t, TruncNormal(0.02, 2.0))
    torch.nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)
    with pytest.raises(AssertionError, match="std"):
        check("head.weight", t, TruncNormal(0.02, 2.0))
    u = torch.empty(400, 768).uniform_(-0.02 * math.sqrt(3), 0.02 * math.sqrt(3))  # same std, other law
    with pytest.raises(AssertionError, match="KS"):
        check("head.weight", u, TruncNormal(0.02, 2.0))
