"""Checkpoint interop: official key names, wrappers and prefixes, encoder-only files,
pretrain -> classifier, safetensors, official training files (argparse args), files for
another model or format (Hugging Face), bad files and what their errors say, atomic saves."""
from __future__ import annotations

import argparse
import logging
import os
import traceback

import pytest
import torch

import vmae_fast
from vmae_fast import load_checkpoint_file, save_atomic
from vmae_fast.checkpoint import unwrap_state_dict

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


@pytest.mark.parametrize("prefix", ["_orig_mod.module.", "module._orig_mod.", "module.module.",
                                    "_orig_mod.backbone.module."])
def test_nested_wrapper_prefixes_are_all_stripped(prefix):
    """Wrappers nest in any order (DDP around compile, compile around DDP): every prefix goes."""
    sd = {prefix + "encoder.norm.weight": torch.ones(2), prefix + "mask_token": torch.zeros(1, 1, 2)}
    assert sorted(unwrap_state_dict({"model": sd, "epoch": 1})) == ["encoder.norm.weight", "mask_token"]


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
    with pytest.raises(ValueError, match=r"bad.pth: not a PyTorch checkpoint \(expected a torch.save file: a zip "
                                         r"archive or a pickle; found text starting 'not a checkpoint'\)"):
        load_checkpoint_file(bad)
    bad.write_bytes(bytes([0, 1, 2, 3, 250]))
    with pytest.raises(ValueError, match="found bytes starting 00 01 02 03 fa"):
        load_checkpoint_file(bad)
    bad.write_bytes(b"PK\x03\x04 truncated zip")  # looks like one: torch.load's own reason, named
    with pytest.raises(ValueError, match=r"bad.pth .* with torch.load\(weights_only=True\)"):
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


# --------------------------------------------------------------------------- official training files

def _clf(num_classes=5):
    return vmae_fast.create_model("vit_small_patch16_224", num_classes=num_classes,
                                  **{k: v for k, v in ODD.items() if not k.startswith("decoder")})


def _official_training_file(path, model):
    """What the official trainer's save_model writes: model, optimizer, epoch, scaler and the
    argparse Namespace of its arguments, with a plain torch.save."""
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4)
    video = torch.randn(1, 3, 6, 48, 48)
    model(video, model.sample_masks(1, 0.5, 0.5)).loss.backward()
    opt.step()
    args = argparse.Namespace(model="pretrain_videomae_small_patch16_224", batch_size=8, lr=1.5e-4,
                              window_size=(3, 6, 6), mask_ratio=0.9, decoder_mask_ratio=0.5,
                              output_dir="/out", gpu=None, distributed=False)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 799,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 0},
                "args": args}, path)


def test_official_training_checkpoint_with_argparse_args_loads(tmp_path, caplog):
    src = _pretrain()
    path = tmp_path / "checkpoint-799.pth"
    _official_training_file(path, src)
    before = set(torch.serialization.get_safe_globals())
    with caplog.at_level(logging.INFO, logger="vmae_fast.checkpoint"):
        ck = load_checkpoint_file(path)
    assert isinstance(ck["args"], argparse.Namespace) and ck["args"].window_size == (3, 6, 6)
    assert ck["epoch"] == 799 and ck["scaler"]["scale"] == 65536.0
    assert "argparse.Namespace" in caplog.text  # which global was allowed is reported
    assert set(torch.serialization.get_safe_globals()) == before, "the allowlist leaked out of the load"
    dst = _pretrain()
    report = dst.load_official_state_dict(ck)
    assert report.missing == [] and report.unexpected == [] and report.format == "pretrain"
    assert torch.equal(dst.encoder.blocks[1].attn.qkv.weight, src.encoder.blocks[1].attn.qkv.weight)
    # into the classifier too (the fine-tuning start)
    assert _clf().load_official_state_dict(ck).skipped


def test_allowlist_is_narrow_and_leaves_a_process_wide_one_alone(tmp_path):
    path = tmp_path / "evil-args.pth"
    torch.save({"model": _pretrain().state_dict(), "args": argparse.Namespace(obj=_Evil())}, path)
    with pytest.raises(ValueError, match="_Evil"):  # a Namespace does not smuggle other globals in
        load_checkpoint_file(path)
    saved = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        ok = tmp_path / "ok.pth"
        _official_training_file(ok, _pretrain())
        load_checkpoint_file(ok)
        assert argparse.Namespace in torch.serialization.get_safe_globals(), "removed the caller's allowlist"
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


# --------------------------------------------------------------------------- files for another model

def _hf_videomae_state_dict(kind, depth=2, dim=72, dec_depth=1, dec_dim=48, cube=3 * 2 * 8 * 8):
    """Keys (and small shapes) of Hugging Face transformers' VideoMAE: VideoMAEForPreTraining,
    VideoMAEForVideoClassification, or the bare VideoMAEModel."""
    z = torch.zeros
    pre = "" if kind == "base" else "videomae."

    def layer(p, d):
        return {f"{p}.attention.attention.q_bias": z(d), f"{p}.attention.attention.v_bias": z(d),
                f"{p}.attention.attention.query.weight": z(d, d), f"{p}.attention.attention.key.weight": z(d, d),
                f"{p}.attention.attention.value.weight": z(d, d), f"{p}.attention.output.dense.weight": z(d, d),
                f"{p}.attention.output.dense.bias": z(d), f"{p}.intermediate.dense.weight": z(4 * d, d),
                f"{p}.intermediate.dense.bias": z(4 * d), f"{p}.output.dense.weight": z(d, 4 * d),
                f"{p}.output.dense.bias": z(d), f"{p}.layernorm_before.weight": z(d),
                f"{p}.layernorm_before.bias": z(d), f"{p}.layernorm_after.weight": z(d),
                f"{p}.layernorm_after.bias": z(d)}

    sd = {f"{pre}embeddings.patch_embeddings.projection.weight": z(dim, 3, 2, 8, 8),
          f"{pre}embeddings.patch_embeddings.projection.bias": z(dim)}
    for i in range(depth):
        sd |= layer(f"{pre}encoder.layer.{i}", dim)
    if kind == "pretraining":  # these four names happen to be ours too
        sd |= {"encoder_to_decoder.weight": z(dec_dim, dim), "mask_token": z(1, 1, dec_dim),
               "decoder.norm.weight": z(dec_dim), "decoder.norm.bias": z(dec_dim),
               "decoder.head.weight": z(cube, dec_dim), "decoder.head.bias": z(cube)}
        for i in range(dec_depth):
            sd |= layer(f"decoder.decoder_layers.{i}", dec_dim)
    elif kind == "classification":  # fc_norm matches ours: it used to load 2 tensors silently
        sd |= {"fc_norm.weight": z(dim), "fc_norm.bias": z(dim), "classifier.weight": z(5, dim),
               "classifier.bias": z(5)}
    return sd


@pytest.mark.parametrize("kind", ["pretraining", "classification", "base"])
@pytest.mark.parametrize("target", ["pretrain", "classifier"])
def test_hugging_face_videomae_loads_through_the_converter(kind, target):
    # It used to load 2 of its tensors silently; now it is recognized and converted (values are
    # compared against transformers itself in test_hf_interop.py).
    model = _pretrain() if target == "pretrain" else _clf()
    report = model.load_official_state_dict({"state_dict": _hf_videomae_state_dict(kind)})
    assert report.format == "hf-videomae"
    for k, v in model.state_dict().items():
        if k.startswith(("patch_embed.", "blocks.", "encoder.patch_embed.", "encoder.blocks.")):
            assert not v.any(), f"{k} was not loaded from the (all-zero) Hugging Face tensors"


@pytest.mark.parametrize("target", ["pretrain", "classifier"])
def test_state_dict_of_no_known_format_is_refused(target):
    model = _pretrain() if target == "pretrain" else _clf()
    with pytest.raises(ValueError, match=r"0 of its \d+ backbone tensors.*no VideoMAE checkpoint format we know"
                                         r".*'foo.bar'"):
        model.load_official_state_dict({"foo.bar": torch.zeros(3)})


def test_too_little_of_the_backbone_is_refused_unless_excluded():
    src = _pretrain()
    no_blocks = {k: v for k, v in src.official_state_dict().items() if not k.startswith("encoder.blocks.")}
    with pytest.raises(ValueError, match=r"2 of its 28 backbone tensors .* fewer than the 50% required.*"
                                         r"official pretraining checkpoint"):
        _pretrain().load_official_state_dict(no_blocks)
    # asked for: the blocks are excluded, so the rest is a legitimate partial load
    report = _pretrain().load_official_state_dict(no_blocks, exclude=("encoder.blocks.",))
    assert "encoder.patch_embed.proj.weight" in report.loaded
    # the file of a model a third as deep is refused by the classifier as well (28 of 80 tensors)
    deep = vmae_fast.create_model("vit_small_patch16_224", num_classes=5,
                                  **({k: v for k, v in ODD.items() if not k.startswith("decoder")} | {"depth": 6}))
    with pytest.raises(ValueError, match="28 of its 80 backbone tensors"):
        deep.load_official_state_dict(_clf().official_state_dict())


def test_report_names_the_format_and_legit_partial_loads_still_work():
    src = _pretrain()
    sd = src.official_state_dict()
    assert _pretrain().load_official_state_dict(sd).format == "pretrain"
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    assert _pretrain().load_official_state_dict(enc).format == "encoder-only"
    assert _clf().load_official_state_dict(enc).format == "encoder-only"
    clf_sd = _clf().official_state_dict()
    r = _clf(3).load_official_state_dict(clf_sd, exclude=("head.",))  # head of another class count
    assert r.format == "classifier" and r.missing == []
    r = _pretrain().load_official_state_dict(clf_sd)  # a classifier's encoder as a pretraining start
    assert "encoder.blocks.0.attn.qkv.weight" in r.loaded and "encoder.head.weight" in r.unexpected
    assert "format='pretrain'" in str(_clf().load_official_state_dict(sd))


# --------------------------------------------------------------------------- what read errors say

def _no_weights_only_false_advice(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))  # the chained exceptions too
    for advice in ("weights_only=False", "weights_only` set to `False`", "Re-running"):
        assert advice not in text, f"relays torch's advice {advice!r}: {text}"


def test_empty_and_truncated_files_say_why(tmp_path):
    from safetensors.torch import save_file

    for name in ("empty.pth", "empty.safetensors"):
        (tmp_path / name).touch()
        with pytest.raises(ValueError, match=rf"{name}: file is empty \(0 bytes\)"):
            load_checkpoint_file(tmp_path / name)
    st = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(st))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*cut\.safetensors \(\d+ bytes\) as "
                                         r"safetensors: \S.*truncated") as info:
        load_checkpoint_file(st)
    assert type(info.value) is ValueError  # not safetensors' own SafetensorError without the path
    pt = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(64, 64)}, pt)
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*cut\.pth \(\d+ bytes\).*: \S"):
        load_checkpoint_file(pt)


def test_refused_pickle_names_the_global_and_gives_no_unsafe_advice(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Evil()}, evil)
    with pytest.raises(ValueError) as info:
        load_checkpoint_file(evil)
    msg = str(info.value)
    assert "evil.pth" in msg and f"{__name__}._Evil" in msg and "refused" in msg
    assert "only loads weights" in msg and "allowlist" in msg and "argparse.Namespace" in msg
    _no_weights_only_false_advice(info.value)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02not a checkpoint")  # a pickle's first byte: torch.load reads it and fails
    with pytest.raises(ValueError, match=r"bad\.pth with torch\.load\(weights_only=True\): \w") as info:
        load_checkpoint_file(bad)
    _no_weights_only_false_advice(info.value)


def test_load_model_reads_the_architecture_off_the_weights(tmp_path):
    """``vmae_fast.load_model`` builds the model a file holds (depths, widths, heads of the named
    arch of that width) and loads it; blocks numbered with a gap, or a width of no named arch
    without ``num_heads=``, fail with the reason."""
    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", depth=2, decoder_depth=1, num_frames=4,
                                            img_size=32, patch_size=8)
    sd = model.official_state_dict()
    got = vmae_fast.load_model(sd, num_frames=4, img_size=32)
    assert (got.cfg.depth, got.cfg.decoder_depth, got.cfg.num_heads) == (2, 1, model.cfg.num_heads)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in model.state_dict().items())
    gap = {k.replace("encoder.blocks.1.", "encoder.blocks.2."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="not numbered 0..1"):
        vmae_fast.load_model(gap, num_frames=4, img_size=32)
    odd = vmae_fast.create_pretrain_model("vit_small_patch16_224", depth=1, decoder_depth=1, num_frames=4,
                                          img_size=32, patch_size=8, embed_dim=40, num_heads=2)
    with pytest.raises(ValueError, match="width 40 .* pass num_heads="):
        vmae_fast.load_model(odd.official_state_dict(), num_frames=4, img_size=32)
    assert vmae_fast.load_model(odd.official_state_dict(), num_frames=4, img_size=32, num_heads=2).cfg.embed_dim == 40


# ------------------------------------------------------------------ exact values (issue 23, mutmut)
# Each test below pins a value the first `make mutate` pass on checkpoint.py let change unseen:
# the refusal lines word for word, the format table row by row, the key summaries.

_ALLOWED = ("tensors and plain data, plus the allowlist vmae_fast.checkpoint.ALLOWED_GLOBALS: "
            "argparse.Namespace")


@pytest.mark.parametrize("msg, reason", [
    ("Weights only load failed. ... WeightsUnpickler error: Unsupported operand 149\n\nCheck the docs",
     "Unsupported operand 149"),
    ("WeightsUnpickler error:  bad thing.  Please use weights_only=False", "bad thing"),
    ("WeightsUnpickler error: line one\nline two\n\nmore", "line one\nline two"),  # re.S: spans lines
    ("WeightsUnpickler error: at the end.", "at the end"),
    ("WeightsUnpickler error: bad opcode X.", "bad opcode X"),  # only dots stripped
    ("WeightsUnpickler error:  Please use weights_only=False", "refused by the weights_only unpickler"),
    ("Weights only load failed", "refused by the weights_only unpickler"),
    ("first line\nsecond line", "first line"),
    ("", "UnpicklingError"),
])
def test_refusal_lines_word_for_word(msg, reason):
    import pickle
    from pathlib import Path

    from vmae_fast.checkpoint import _refusal

    got = _refusal(Path("d/x.pth"), pickle.UnpicklingError(msg))
    assert got == (f"cannot read checkpoint d/x.pth with torch.load(weights_only=True): {reason} "
                   f"(not a PyTorch checkpoint, or one that pickles more than weights; vmae_fast only "
                   f"loads weights: {_ALLOWED})")


def test_refusal_of_a_global_word_for_word():
    import pickle
    from pathlib import Path

    from vmae_fast.checkpoint import _refusal

    exc = pickle.UnpicklingError("Weights only load failed. Unsupported global: GLOBAL my.mod.Thing was "
                                 "not an allowed global")
    assert _refusal(Path("x.pth"), exc) == (
        "cannot read checkpoint x.pth: it pickles my.mod.Thing, a global that torch.load(weights_only=True) "
        f"refused. vmae_fast only loads weights ({_ALLOWED}) and never unpickles arbitrary objects: save "
        "the state dict alone where the file was made (e.g. torch.save({'model': model.state_dict()}, path))")


def test_torch_load_errors_word_for_word(tmp_path, monkeypatch):
    import pickle

    import vmae_fast.checkpoint as ck

    p = tmp_path / "a.pth"
    torch.save({"w": torch.zeros(1)}, p)
    size = p.stat().st_size
    calls = []

    def fake_load(path, **kw):
        calls.append((path, kw))
        raise fake_load.exc

    monkeypatch.setattr(ck.torch, "load", fake_load)
    head = f"cannot read checkpoint {p} ({size} bytes) with torch.load(weights_only=True): "
    for exc, reason in [(EOFError(), "ends early, truncated? (EOFError)"),
                        (EOFError("Ran out of input"), "ends early, truncated? (Ran out of input)"),
                        (RuntimeError("boom"), "boom"), (RuntimeError(), "RuntimeError")]:
        fake_load.exc = exc
        with pytest.raises(ValueError) as info:
            load_checkpoint_file(p)
        assert str(info.value) == head + reason and info.value.__cause__ is exc
    assert calls[-1] == (p, {"map_location": "cpu", "weights_only": True})
    fake_load.exc = pickle.UnpicklingError("Unsupported global: GLOBAL a.B")
    with pytest.raises(ValueError) as info:
        load_checkpoint_file(p)
    assert str(info.value) == ck._refusal(p, fake_load.exc)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # torch's advice not chained


def test_allowed_global_use_is_logged_word_for_word(tmp_path, caplog):
    p = tmp_path / "ck.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, p)
    with caplog.at_level(logging.INFO, logger="vmae_fast.checkpoint"):
        obj = load_checkpoint_file(p)
    assert obj["args"].lr == 1.0
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {p}: loaded with weights_only=True, allowing argparse.Namespace (vmae_fast.checkpoint."
        "ALLOWED_GLOBALS: e.g. the official trainer's 'args', which loading weights ignores)"]
    caplog.clear()
    torch.save({"w": torch.zeros(1)}, p)
    with caplog.at_level(logging.INFO, logger="vmae_fast.checkpoint"):
        load_checkpoint_file(p)
    assert caplog.records == []


def test_missing_file_and_bad_safetensors_word_for_word(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint_file(tmp_path / "none.pth")
    assert str(info.value) == f"checkpoint file not found: {tmp_path / 'none.pth'}"
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"\x01" * 10)
    with pytest.raises(ValueError) as info:
        load_checkpoint_file(st)
    msg = str(info.value)
    assert msg.startswith(f"cannot read checkpoint {st} (10 bytes) as safetensors: ")
    assert msg.endswith(" (truncated or not a safetensors file?)")
    assert str(info.value.__cause__) in msg


@pytest.mark.parametrize("head, found", [
    (b"hello world\nsecond", "text starting 'hello world'"),
    (b"x" * 50, f"text starting {'x' * 40!r}"),
    (b"   \n\t ", "blank text"),
    (b"\xff\xfe\x00\x01\x02\x03\x04\x05\x06\x07", "bytes starting ff fe 00 01 02 03 04 05"),
    (b"a" * 64 + b"\xff", f"text starting {'a' * 40!r}"),  # only the first 64 bytes are read
    (b"PK\x03", "text starting 'PK\\x03'"),
])
def test_check_torch_file_names_what_it_found(tmp_path, head, found):
    from vmae_fast.checkpoint import check_torch_file

    p = tmp_path / "f.pth"
    p.write_bytes(head)
    with pytest.raises(ValueError) as info:
        check_torch_file(p)
    assert str(info.value) == (f"cannot read checkpoint {p}: not a PyTorch checkpoint (expected a torch.save "
                               f"file: a zip archive or a pickle; found {found})")


def test_check_torch_file_accepts_zip_and_pickle_heads_and_names_an_empty_file(tmp_path):
    from vmae_fast.checkpoint import check_torch_file

    p = tmp_path / "f.pt"
    for head in (b"PK\x03\x04rest", b"\x80\x02rest", b"\x80"):
        p.write_bytes(head)
        assert check_torch_file(str(p)) is None
    p.write_bytes(b"")
    with pytest.raises(ValueError) as info:
        check_torch_file(p)
    assert str(info.value) == f"cannot read checkpoint {p}: file is empty (0 bytes)"


def test_walk_goes_three_levels_down_and_skips_tensors():
    from vmae_fast.checkpoint import _walk

    t = torch.zeros(1)
    inner = (2, 3)
    lst = [1, inner, t]
    obj = {"a": lst, "t": t}
    assert [id(o) for o in _walk(obj)] == [id(o) for o in (obj, lst, 1, inner, 2, 3)]
    deep = [[[[5]]]]
    assert list(_walk(deep)) == [deep, deep[0], deep[0][0], deep[0][0][0]]
    assert list(_walk(deep, depth=1)) == [deep, deep[0]]
    assert [id(o) for o in _walk(t)] == [id(t)]
    assert list(_walk("abc")) == ["abc"]


@pytest.mark.parametrize("keys, fmt", [
    (["videomae.embeddings.x"], "hf-videomae"),
    (["embeddings.patch_embeddings.projection.weight"], "hf-videomae"),
    (["encoder.layer.0.output.dense.weight"], "hf-videomae"),
    (["decoder.decoder_layers.0.x"], "hf-videomae"),
    (["foo.attention.attention.query.weight"], "hf-videomae"),
    (["foo.attention.query.weight"], "unknown"),
    (["encoder.blocks.0.x", "decoder.blocks.0.x"], "pretrain"),
    (["encoder.patch_embed.proj.weight", "encoder_to_decoder.weight"], "pretrain"),
    (["encoder.blocks.0.x", "mask_token"], "pretrain"),
    (["encoder.blocks.0.x"], "encoder-only"),
    (["encoder.patch_embed.proj.weight", "head.weight"], "encoder-only"),
    (["blocks.0.x", "head.weight"], "classifier"),
    (["patch_embed.proj.weight", "fc_norm.weight"], "classifier"),
    (["blocks.0.x", "decoder.x"], "encoder-only"),
    (["patch_embed.proj.weight"], "encoder-only"),
    (["x.encoder.blocks.0", "x.blocks.0", "norm.weight"], "unknown"),
    ([], "unknown"),
])
def test_guess_format_row_by_row(keys, fmt):
    from vmae_fast.checkpoint import FORMATS, guess_format

    assert guess_format(keys) == fmt
    assert guess_format(iter(keys)) == fmt  # a one-pass iterable is read once
    assert fmt in FORMATS


def test_describe_keys_word_for_word():
    from vmae_fast.checkpoint import describe_keys

    assert describe_keys([]) == "0 keys: "
    assert describe_keys(["a"]) == "1 key: 'a'"
    assert describe_keys(iter(["b", "a"])) == "2 keys: 'a', 'b'"
    assert describe_keys("dcba") == "4 keys: 'a', 'b', 'c', 'd'"
    assert describe_keys("edcba") == "5 keys: 'a', 'b', 'c', 'd', ..."
    assert describe_keys("cba", n=2) == "3 keys: 'a', 'b', ..."
    assert describe_keys("ba", n=2) == "2 keys: 'a', 'b'"


def test_unwrap_state_dict_edges_word_for_word():
    t, u = torch.zeros(1), torch.ones(1)
    with pytest.raises(ValueError) as info:
        unwrap_state_dict([t])
    assert str(info.value) == "a checkpoint must be a dict, got list"
    with pytest.raises(ValueError) as info:
        unwrap_state_dict({"epoch": 3, "model": {"step": 1}})
    assert str(info.value) == ("the checkpoint holds no tensors (expected a state dict, or a dict with one of "
                               "('model', 'module', 'state_dict'))")
    assert unwrap_state_dict({1: u, "a": t}) == {"a": t}  # non-str keys dropped
    assert unwrap_state_dict({"model": t, "b": u}) == {"model": t, "b": u}  # a tensor is no wrapper
    # only the first wrapper found is opened: an inner 'state_dict' is a key of the model, not unwrapped
    got = unwrap_state_dict({"model": {"state_dict": {"x": t}, "y": u}})
    assert list(got) == ["y"] and got["y"] is u
    got = unwrap_state_dict({"module": {"w": u}, "state_dict": {"v": t}})
    assert list(got) == ["w"]


@pytest.mark.parametrize("dim, hidden, ratio", [(768, 3072, 4.0), (1408, 6144, 6144 / 1408),
                                                (7, 61, 61.5 / 7)])  # 61/7*7 rounds to 60.99...
def test_mlp_ratio_of(dim, hidden, ratio):
    from vmae_fast.checkpoint import mlp_ratio_of

    assert mlp_ratio_of(dim, hidden) == ratio and int(dim * ratio) == hidden


def test_heads_of_width_by_arch_and_word_for_word():
    from vmae_fast.checkpoint import heads_of_width
    from vmae_fast.errors import OptionError

    # head counts of the official archs (ViT-S/B/L/g encoders; the decoders 192/384/512 wide)
    assert [heads_of_width(d, "encoder") for d in (384, 768, 1024, 1408)] == [6, 12, 16, 16]
    assert [heads_of_width(d, "decoder") for d in (192, 384, 512)] == [3, 6, 8]
    assert heads_of_width(768, "encoder", given=5) == 5 and heads_of_width(768, "decoder", "4") == 4
    assert heads_of_width(768, "encoder", given=0) == 12  # 0 means "not given"
    for which, opt in (("encoder", "num_heads"), ("decoder", "decoder_num_heads")):
        with pytest.raises(OptionError) as info:
            heads_of_width(100, which)
        reason = f"cannot tell the {which}'s number of attention heads from the weights (width 100 is none of the named archs')"
        assert str(info.value) == f"{reason}: pass {opt}= (or, for a transformers checkpoint, its config)"
        # the fields a command line maps to its flag, with no need to read the message
        assert (info.value.option, info.value.missing, info.value.reason) == (opt, True, reason)
    with pytest.raises(ValueError):
        heads_of_width(1408, "decoder")  # an encoder width is not a decoder width
