"""Checkpoint interop: official key names, wrappers and prefixes, encoder-only files,
pretrain -> classifier, safetensors, bad files, atomic saves."""
from __future__ import annotations

import os

import pytest
import torch

import vmae_fast
from vmae_fast import load_checkpoint_file, save_atomic

from conftest import ODD

PRETRAIN_KEYS = {"mask_token", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
                 "encoder.norm.weight", "encoder.norm.bias", "encoder_to_decoder.weight",
                 "decoder.norm.weight", "decoder.norm.bias", "decoder.head.weight", "decoder.head.bias"}
BLOCK_KEYS = {"norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
              "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
              "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}


def _pretrain(**kw):
    return vmae_fast.create_pretrain_model("vit_small_patch16_224", **(ODD | kw))


def _official_keys(depth, dec_depth, gammas=False):
    keys = set(PRETRAIN_KEYS)
    bk = BLOCK_KEYS | ({"gamma_1", "gamma_2"} if gammas else set())
    keys |= {f"encoder.blocks.{i}.{k}" for i in range(depth) for k in bk}
    keys |= {f"decoder.blocks.{i}.{k}" for i in range(dec_depth) for k in bk}
    return keys


def test_official_key_names_exactly():
    m = _pretrain()
    assert set(m.official_state_dict()) == _official_keys(2, 2)
    g = _pretrain(init_values=0.1)
    assert set(g.official_state_dict()) == _official_keys(2, 2, gammas=True)
    assert m.official_state_dict()["encoder.patch_embed.proj.weight"].shape == (72, 3, 2, 8, 8)
    assert m.official_state_dict()["mask_token"].shape == (1, 1, 48)


@pytest.mark.parametrize("wrap", ["model", "module", None])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "backbone."])
def test_round_trip_with_wrappers_and_prefixes(tmp_path, wrap, prefix):
    src, dst = _pretrain(), _pretrain()
    sd = {prefix + k: v for k, v in src.official_state_dict().items()}
    obj = {wrap: sd, "epoch": 3} if wrap else sd
    path = tmp_path / "ckpt.pth"
    save_atomic(obj, path)
    report = dst.load_official_state_dict(load_checkpoint_file(path))
    assert report.missing == [] and report.unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    video = torch.randn(1, 3, 6, 48, 48)
    masks = vmae_fast.DualMask.sample(1, src.grid, 0.5, 0.5)
    assert torch.equal(src(video, masks).loss, dst(video, masks).loss)


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    src, dst = _pretrain(), _pretrain()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.official_state_dict().items()}, str(path))
    assert dst.load_official_state_dict(load_checkpoint_file(path)).missing == []
    assert torch.equal(src.encoder.blocks[1].mlp.fc2.weight, dst.encoder.blocks[1].mlp.fc2.weight)


@pytest.mark.parametrize("with_prefix", [True, False])
def test_encoder_only_file_into_pretrain_model(with_prefix):
    src, dst = _pretrain(), _pretrain()
    enc = {k: v for k, v in src.official_state_dict().items() if k.startswith("encoder.")}
    if not with_prefix:
        enc = {k[len("encoder."):]: v for k, v in enc.items()}
    report = dst.load_official_state_dict({"model": enc})
    assert report.unexpected == []
    assert set(report.missing) == {k for k in _official_keys(2, 2) if not k.startswith("encoder.")}
    assert torch.equal(dst.encoder.blocks[0].attn.qkv.weight, src.encoder.blocks[0].attn.qkv.weight)


def test_pretrain_file_into_classifier():
    src = _pretrain()
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=5, **{k: v for k, v in ODD.items()
                                                                            if not k.startswith("decoder")})
    report = clf.load_official_state_dict({"module": {"module." + k: v for k, v in src.official_state_dict().items()}})
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert report.unexpected == ["norm.bias", "norm.weight"]  # encoder.norm: Identity under mean pooling
    assert any(k.startswith("decoder.") for k in report.skipped)
    assert torch.equal(clf.blocks[1].attn.v_bias, src.encoder.blocks[1].attn.v_bias)
    assert torch.equal(clf.patch_embed.proj.weight, src.encoder.patch_embed.proj.weight)


def test_classifier_round_trip_and_head_mismatch():
    kw = {k: v for k, v in ODD.items() if not k.startswith("decoder")}
    a = vmae_fast.create_model("vit_small_patch16_224", num_classes=7, **kw)
    b = vmae_fast.create_model("vit_small_patch16_224", num_classes=7, **kw)
    assert b.load_official_state_dict(a.official_state_dict(), strict=True).missing == []
    c = vmae_fast.create_model("vit_small_patch16_224", num_classes=3, **kw)
    with pytest.raises(ValueError, match="head.weight: file \\(7, 72\\) vs model \\(3, 72\\)"):
        c.load_official_state_dict(a.official_state_dict())
    report = c.load_official_state_dict(a.official_state_dict(), exclude=("head.",))
    assert "head.weight" in report.skipped and "head.weight" not in report.missing


def test_shape_mismatch_and_strict():
    small = _pretrain()
    other = vmae_fast.create_pretrain_model("vit_small_patch16_224", **(ODD | {"embed_dim": 96}))
    with pytest.raises(ValueError, match="shapes do not match"):
        small.load_official_state_dict(other.official_state_dict())
    sd = small.official_state_dict()
    sd.pop("mask_token")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="strict load failed"):
        _pretrain().load_official_state_dict(sd, strict=True)
    report = _pretrain().load_official_state_dict(sd)
    assert report.missing == ["mask_token"] and report.unexpected == ["extra.weight"]


class _Evil:
    pass


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint_file(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint_file(bad)

    evil = tmp_path / "evil.pth"
    torch.save({"model": _Evil()}, evil)  # an arbitrary object is refused by weights_only loading
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint_file(evil)
    with pytest.raises(ValueError, match="no tensors"):
        _pretrain().load_official_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match="must be a dict"):
        _pretrain().load_official_state_dict([1, 2])


def test_save_atomic_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    save_atomic({"step": 1}, path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask, oct(path.stat().st_mode)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ck.pth"], "temporary file left behind"
