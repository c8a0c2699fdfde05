"""Hugging Face VideoMAE state dicts at the key level, without transformers: what each layout
converts to, the key bias that is dropped (and why that is exact), positional tables in a file."""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from vmae_fast import hf as vhf
from vmae_fast.layers import Attention
from vmae_fast.pos_embed import sincos_table

from conftest import rel_err

D, DEPTH, DD, DDEPTH, P = 48, 2, 32, 1, 3 * 2 * 8 * 8


def _hf_sd(kind="pretraining", layout="query.bias", key_bias=False, pos=None):
    """A transformers-shaped VideoMAE state dict with random values (width 48, 2 blocks, patch 8)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pre = "" if kind == "base" else "videomae."
    qb, vb = ("query.bias", "value.bias") if layout == "query.bias" else ("q_bias", "v_bias")

    def layer(p, d):
        out = {f"{p}.attention.attention.{n}.weight": r(d, d) for n in ("query", "key", "value")}
        out |= {f"{p}.attention.attention.{qb}": r(d), f"{p}.attention.attention.{vb}": r(d),
                f"{p}.attention.output.dense.weight": r(d, d), f"{p}.attention.output.dense.bias": r(d),
                f"{p}.intermediate.dense.weight": r(4 * d, d), f"{p}.intermediate.dense.bias": r(4 * d),
                f"{p}.output.dense.weight": r(d, 4 * d), f"{p}.output.dense.bias": r(d),
                f"{p}.layernorm_before.weight": r(d), f"{p}.layernorm_before.bias": r(d),
                f"{p}.layernorm_after.weight": r(d), f"{p}.layernorm_after.bias": r(d)}
        if key_bias:
            out[f"{p}.attention.attention.key.bias"] = r(d)
        return out

    sd = {f"{pre}embeddings.patch_embeddings.projection.weight": r(D, 3, 2, 8, 8),
          f"{pre}embeddings.patch_embeddings.projection.bias": r(D)}
    if pos is not None:
        sd[f"{pre}embeddings.position_embeddings"] = pos
    for i in range(DEPTH):
        sd |= layer(f"{pre}encoder.layer.{i}", D)
    if kind == "pretraining":
        sd |= {"videomae.layernorm.weight": r(D), "videomae.layernorm.bias": r(D),
               "encoder_to_decoder.weight": r(DD, D), "mask_token": r(1, 1, DD),
               "decoder.norm.weight": r(DD), "decoder.norm.bias": r(DD), "decoder.head.weight": r(P, DD),
               "decoder.head.bias": r(P)}
        for i in range(DDEPTH):
            sd |= layer(f"decoder.decoder_layers.{i}", DD)
    elif kind == "classification":
        sd |= {"fc_norm.weight": r(D), "fc_norm.bias": r(D), "classifier.weight": r(5, D), "classifier.bias": r(5)}
    return sd


@pytest.mark.parametrize("kind, want_kind", [("pretraining", "pretrain"), ("classification", "classifier"),
                                             ("base", "encoder")])
@pytest.mark.parametrize("layout", ["query.bias", "q_bias"])
def test_layouts_convert_to_official_keys(kind, want_kind, layout):
    hf = _hf_sd(kind, layout)
    conv = vhf.convert_hf_state_dict({"model": hf})
    assert conv.kind == want_kind and conv.layout == layout and not conv.unknown
    enc = "encoder." if want_kind == "pretrain" else ""
    pre = "" if kind == "base" else "videomae."
    sd = conv.state_dict
    a = f"{pre}encoder.layer.1.attention.attention."
    assert torch.equal(sd[f"{enc}blocks.1.attn.qkv.weight"],
                       torch.cat([hf[a + "query.weight"], hf[a + "key.weight"], hf[a + "value.weight"]]))
    assert torch.equal(sd[f"{enc}blocks.1.attn.q_bias"], hf[a + ("query.bias" if layout == "query.bias" else "q_bias")])
    assert torch.equal(sd[f"{enc}blocks.0.mlp.fc2.weight"], hf[f"{pre}encoder.layer.0.output.dense.weight"])
    assert torch.equal(sd[f"{enc}blocks.0.norm2.bias"], hf[f"{pre}encoder.layer.0.layernorm_after.bias"])
    assert torch.equal(sd[f"{enc}patch_embed.proj.weight"], hf[f"{pre}embeddings.patch_embeddings.projection.weight"])
    if want_kind == "pretrain":
        assert torch.equal(sd["decoder.blocks.0.attn.proj.bias"],
                           hf["decoder.decoder_layers.0.attention.output.dense.bias"])
        assert torch.equal(sd["encoder.norm.weight"], hf["videomae.layernorm.weight"])
        assert vmae_fast.checkpoint.guess_format(sd) == "pretrain"
    if want_kind == "classifier":
        assert torch.equal(sd["head.weight"], hf["classifier.weight"])
        assert vmae_fast.checkpoint.guess_format(sd) == "classifier"
    # and it loads: the architecture is read off the weights (heads by hand: width 48 is no named arch)
    kw = dict(num_frames=4, img_size=32, num_heads=3)
    if want_kind == "pretrain":
        kw["decoder_num_heads"] = 2
    model = vhf.from_hf_state_dict(hf, **kw)
    assert model.cfg.embed_dim == D and model.cfg.depth == DEPTH and model.cfg.patch_size == 8


def test_key_bias_is_dropped_and_softmax_cancels_it():
    conv = vhf.convert_hf_state_dict(_hf_sd("classification", key_bias=True))
    dropped = [k for k in conv.dropped if k.endswith("key.bias")]
    assert len(dropped) == DEPTH and "softmax cancels" in conv.dropped[dropped[0]]
    # the claim, checked: a key bias changes no attention output
    attn = Attention(D, 3).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
        x = torch.randn(2, 10, D)
        want = attn(x)
        attn.k_bias.normal_()
        assert rel_err(attn(x), want) < 1e-5


def test_position_tables_in_a_file():
    table = sincos_table(32, D).unsqueeze(0)
    model = vhf.from_hf_state_dict(_hf_sd("classification", pos=table), num_frames=4, img_size=32, num_heads=3)
    report = model.load_official_state_dict(_hf_sd("classification", pos=table))
    assert "pos_embed" in report.skipped and any("fixed table" in n for n in report.notes)
    with pytest.raises(ValueError, match="not the fixed sin-cos table.*learnable_pos_embed=True"):
        model.load_official_state_dict(_hf_sd("classification", pos=table + 0.1))
    with pytest.raises(ValueError, match="class-token row"):
        model.load_official_state_dict(_hf_sd("classification", pos=torch.zeros(1, 33, D)))
    learn = vhf.from_hf_state_dict(_hf_sd("classification", pos=table + 0.1), num_frames=4, img_size=32,
                                   num_heads=3, learnable_pos_embed=True)
    assert torch.allclose(learn.pos_embed, table + 0.1)


def test_incomplete_or_foreign_state_dicts_are_refused():
    sd = _hf_sd("classification")
    del sd["videomae.encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(ValueError, match="encoder.layer.1|blocks.1.*lacks its key weight"):
        vhf.convert_hf_state_dict(sd)
    with pytest.raises(ValueError, match="not a Hugging Face"):
        vhf.convert_hf_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="number of attention heads"):
        vhf.from_hf_state_dict(_hf_sd("classification"), num_frames=4, img_size=32)  # width 48: no named arch
