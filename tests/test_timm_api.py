"""The timm model interface of the classifier (pretrained_cfg, heads, forward_head,
no_weight_decay, checkpoint_path= through our adapter), the official fine-tuning options
(cos_attn, qk_scale, dropout) against the official formulas, and the K710 -> Kinetics head
conversion with its shipped label maps."""
from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import vmae_fast
import vmae_fast.models.timm_registry  # noqa: F401  (registers vmae_fast_* with timm)
from vmae_fast import labels as L

from conftest import rel_err

KW = dict(depth=2, num_frames=4, img_size=32, patch_size=8)  # vit_small width (384, 6 heads), 32 tokens
NAME = "vmae_fast_vit_small_patch16_224"


def _clf(num_classes=5, **kw):
    return vmae_fast.create_model("vit_small_patch16_224", num_classes=num_classes, **(KW | kw)).eval()


def _clip(b=2):
    return torch.randn(b, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_cfg_and_data_config():
    cfg = timm.models.get_pretrained_cfg(NAME)
    assert cfg.num_classes == 400 and cfg.first_conv == "patch_embed.proj" and cfg.classifier == "head"
    assert not cfg.has_weights
    m = timm.create_model(NAME, num_classes=3, **KW)
    assert m.pretrained_cfg["input_size"] == (3, 32, 32) and m.pretrained_cfg["num_frames"] == 4
    assert m.pretrained_cfg["num_classes"] == 3 and m.default_cfg is m.pretrained_cfg
    data = timm.data.resolve_data_config(model=m)
    assert data["mean"] == vmae_fast.IMAGENET_MEAN and data["std"] == vmae_fast.IMAGENET_STD
    assert data["interpolation"] == "bilinear" and data["crop_pct"] == 1.0
    assert timm.create_model("vmae_fast_pretrain_vit_small_patch16_224", decoder_depth=1, **KW).pretrained_cfg[
        "num_classes"] == 0


def test_heads_forward_head_and_features():
    m = _clf()
    x = _clip()
    with torch.no_grad():
        tokens = m.forward_features(x, pool=False)
        pooled = m.forward_features(x)
        assert tokens.shape == (2, 32, 384) and pooled.shape == (2, 384)
        assert torch.equal(m.forward_head(tokens), m(x)) and torch.equal(m.forward_head(pooled), m(x))
        assert torch.equal(m.forward_head(tokens, pre_logits=True), pooled)
        assert m.get_classifier() is m.head
        m.reset_classifier(7)
        assert m(x).shape == (2, 7) and m.num_classes == 7 and m.pretrained_cfg["num_classes"] == 7
        m.reset_classifier(0)
        assert torch.equal(m(x), pooled)
    with pytest.raises(ValueError, match="cannot be switched"):
        m.reset_classifier(3, global_pool="token")


def test_no_weight_decay_names_reach_timm_optimizer():
    assert _clf().no_weight_decay() == {"pos_embed"}
    m = _clf(cos_attn=True)
    assert {"blocks.0.attn.scale", "blocks.1.attn.scale"} <= m.no_weight_decay()
    from timm.optim import create_optimizer_v2  # asks the model for no_weight_decay()

    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(m.blocks[0].attn.scale) in no_decay and id(m.blocks[0].attn.qkv.weight) not in no_decay
    pt = vmae_fast.create_pretrain_model("vit_small_patch16_224", decoder_depth=1, **KW)
    assert "mask_token" in pt.no_weight_decay()


def _official_file(path, sd, wrapper="model"):
    obj = {wrapper: sd, "epoch": 3}
    if wrapper == "model":
        obj["args"] = argparse.Namespace(model="vit_small_patch16_224")  # the official trainer saves this
    torch.save(obj, path)
    return str(path)


def test_checkpoint_path_goes_through_the_adapter(tmp_path):
    src = _clf(num_classes=4)
    f = _official_file(tmp_path / "ft.pth", src.official_state_dict())
    assert _same_weights(timm.create_model(NAME, num_classes=4, checkpoint_path=f, **KW), src)
    # a DeepSpeed file ({'module': ...}, which timm passes on whole): unwrapped by our load_state_dict
    f = _official_file(tmp_path / "ds.pth", src.official_state_dict(), wrapper="module")
    assert _same_weights(timm.create_model(NAME, num_classes=4, checkpoint_path=f, **KW), src)
    # a pretraining file: into the pretraining model as is, into a classifier (strict, as timm asks) refused
    pt = vmae_fast.create_pretrain_model("vit_small_patch16_224", decoder_depth=1, **KW)
    f = _official_file(tmp_path / "pt.pth", pt.official_state_dict())
    got = timm.create_model("vmae_fast_pretrain_vit_small_patch16_224", decoder_depth=1, checkpoint_path=f, **KW)
    assert _same_weights(got, pt)
    with pytest.raises(ValueError, match="strict load failed: missing.*fc_norm"):
        timm.create_model(NAME, num_classes=4, checkpoint_path=f, **KW)
    # the own-key path is torch's, unchanged: strict errors are torch's RuntimeError
    with pytest.raises(RuntimeError, match="Missing key"):
        _clf().load_state_dict({"head.weight": torch.zeros(5, 384)})


def test_pretrained_file_overlay(tmp_path):
    src = _clf(num_classes=4)
    f = _official_file(tmp_path / "ft.pth", src.official_state_dict())
    got = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=f), num_classes=4, **KW)
    assert _same_weights(got, src) and got.pretrained_cfg["file"] == f
    other = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=f), num_classes=6, **KW)
    assert torch.equal(other.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)  # head left fresh
    k710 = _official_file(tmp_path / "k710.pth", _clf(num_classes=710).official_state_dict())
    with pytest.raises(ValueError, match="Kinetics-710 head.*convert_k710_head"):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=k710), num_classes=400, **KW)
    with pytest.raises(ValueError, match="no hub weights"):
        timm.create_model(NAME, pretrained=True)


def _official_cos_attention(attn, x):
    """The official CosAttention, written out: normalized q, k; logits times exp(min(scale, 4.6052))."""
    B, N, C = x.shape
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    q, k, v = F.linear(x, attn.qkv.weight, bias).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    a = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    a = (a * torch.clamp(attn.scale, max=4.6052).exp()).softmax(dim=-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cos_attn_and_qk_scale_match_the_official_formulas(backend):
    x = torch.randn(2, 32, 384, generator=torch.Generator().manual_seed(1))
    m = _clf(cos_attn=True, attn_backend=backend)
    attn = m.blocks[0].attn
    assert tuple(attn.scale.shape) == (6, 1, 1) and torch.allclose(attn.scale, torch.full((6, 1, 1), 10.0).log())
    with torch.no_grad():
        attn.scale.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 6.0]).view(6, 1, 1))  # 6.0: clamped
        attn.q_bias.normal_()
        attn.v_bias.normal_()
        assert rel_err(attn(x), _official_cos_attention(attn, x)) < 1e-5
    assert "blocks.0.attn.scale" in m.official_state_dict()
    # gradients reach the learnable scale (not the clamped head)
    attn(x).sum().backward()
    g = attn.scale.grad.flatten()
    assert (g[:5] != 0).all() and g[5] == 0
    s = _clf(qk_scale=0.3, attn_backend=backend).blocks[0].attn
    with torch.no_grad():
        q, k, v = F.linear(x, s.qkv.weight, s.qkv_bias()).reshape(2, 32, 3, 6, -1).permute(2, 0, 3, 1, 4)
        want = s.proj(((q * 0.3 @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(2, 32, -1))
        assert rel_err(s(x), want) < 1e-5
    with pytest.raises(ValueError, match="cannot be combined with qk_scale"):
        _clf(cos_attn=True, qk_scale=0.3)


def test_dropout_options_train_only():
    x = _clip()
    plain = _clf()
    drop = _clf(drop_rate=0.3, attn_drop_rate=0.3)
    drop.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(drop(x), plain(x))  # eval: dropout off, the same function
        drop.train()
        torch.manual_seed(0)
        a = drop(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, drop(x))  # train: dropout on
        plain.train()
        assert torch.equal(plain(x), plain(x))  # default options: nothing random


def test_k710_head_conversion_and_label_maps():
    for target, n in (("k400", 400), ("k600", 600), ("k700", 700)):
        idx = L.k710_index_map(target)
        assert len(idx) == n == len(L.load_labels(target)) and len(set(idx)) == n and 0 <= min(idx)
        assert max(idx) < 710
    k710, k400, idx = L.load_labels("k710"), L.load_labels("k400"), L.k710_index_map("k400")
    assert len(set(k400)) == 400 and k400 == sorted(k400)  # the standard alphabetical order
    # the map sends each K400 class to the K710 class of the same name, but for the classes the official
    # repository renames in K710 (and "opening bottle", which its map sends to "opening wine bottle")
    renamed = {"balloon blowing": "inflating balloons", "changing wheel": "changing wheel (not on bike)",
               "cooking sausages": "cooking sausages (not on barbeque)", "drinking": "sipping cup",
               "dying hair": "dyeing hair", "garbage collecting": "person collecting garbage",
               "making bed": "making the bed", "opening bottle": "opening wine bottle",
               "passing american football (not in game)": "passing American football (not in game)",
               "picking fruit": "picking apples", "skiing (not slalom or crosscountry)": "skiing mono",
               "sniffing": "smelling feet", "tying tie": "tying necktie"}
    assert [renamed.get(name, name) for name in k400] == [k710[i] for i in idx]
    # the conversion keeps exactly those rows of the head
    src = _clf(num_classes=710)
    sd = L.convert_k710_head({"model": src.official_state_dict()}, "k400")
    dst = _clf(num_classes=400)
    dst.load_official_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(dst(_clip()), src(_clip())[:, idx])
    with pytest.raises(ValueError, match="expected a Kinetics-710 head"):
        L.convert_k710_head(dst.official_state_dict(), "k600")


def test_load_labels_files(tmp_path):
    (tmp_path / "l.txt").write_text("cat\ndog\n\n")
    assert L.load_labels(tmp_path / "l.txt") == ["cat", "dog"]
    (tmp_path / "c.json").write_text(json.dumps({"id2label": {"1": "dog", "0": "cat"}, "model_type": "videomae"}))
    assert L.load_labels(str(tmp_path / "c.json")) == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match="neither a labels file nor one of k400, k600"):
        L.load_labels("k999")
