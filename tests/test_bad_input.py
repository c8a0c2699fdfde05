"""Bad input fails early with a ValueError that says what was expected and what was got."""
from __future__ import annotations

import copy

import pytest
import torch

import vmae_fast
from vmae_fast import DualMask

from conftest import rel_err, small_pretrain
from tolerances import MODEL_TOL


@pytest.fixture(scope="module")
def model():
    return small_pretrain(depth=1, decoder_depth=1)


@pytest.mark.parametrize("shape", [(2, 3, 4, 64), (2, 3, 4, 64, 48), (2, 1, 4, 64, 64), (2, 3, 6, 64, 64)])
def test_wrong_video_shape(model, shape):
    masks = DualMask.sample(2, model.grid, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"video must have shape \(B, 3, 4, 64, 64\)"):
        model(torch.randn(shape), masks)


def test_wrong_video_dtype(model):
    masks = DualMask.sample(2, model.grid, 0.5, 0.5)
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(2, 3, 4, 64, 64, dtype=torch.int32), masks)


def test_masks_for_another_batch_or_grid(model):
    video = torch.randn(2, 3, 4, 64, 64)
    with pytest.raises(ValueError, match=r"expected \(B, N\) = \(2, 32\)"):
        model(video, DualMask.sample(3, model.grid, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"expected \(B, N\)"):
        model(video, DualMask.sample(2, (2, 8, 8), 0.5, 0.5))
    with pytest.raises(ValueError, match="DualMask"):
        model(video, torch.zeros(2, 32, dtype=torch.bool))


@pytest.mark.parametrize("kw, match", [
    (dict(num_frames=5), "num_frames=5 is not divisible by tubelet_size=2"),
    (dict(img_size=100), "img_size=100 is not divisible by patch_size=16"),
    (dict(embed_dim=100), "embed_dim=100 is not divisible"),
    (dict(depth=0), "depth must be a positive int"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
])
def test_sizes_that_do_not_divide(kw, match):
    with pytest.raises(ValueError, match=match):
        vmae_fast.create_pretrain_model("vit_small_patch16_224", **kw)


@pytest.mark.parametrize("kw, option", [(dict(num_frames=5), "num_frames"), (dict(img_size=100), "img_size"),
                                        (dict(embed_dim=100), "num_heads"),
                                        (dict(decoder_embed_dim=100), "decoder_num_heads")])
def test_a_size_that_does_not_divide_names_the_option_to_change(kw, option):
    """(A command line maps ``option`` to its flag: ``--num-frames 5: ...``.)"""
    from vmae_fast.errors import OptionError

    with pytest.raises(OptionError) as err:
        vmae_fast.create_pretrain_model("vit_small_patch16_224", **kw)
    assert (err.value.option, err.value.missing, err.value.reason) == (option, False, str(err.value))


def test_unknown_arch_option_and_backend():
    with pytest.raises(ValueError, match="unknown arch"):
        vmae_fast.create_pretrain_model("vit_tiny")
    with pytest.raises(TypeError, match="unknown model option"):
        vmae_fast.create_pretrain_model("vit_small_patch16_224", embed_dims=3)
    with pytest.raises(ValueError, match="unknown attention backend"):
        vmae_fast.create_pretrain_model("vit_small_patch16_224", attn_backend="flash3")
    with pytest.raises(ValueError, match="num_classes"):
        vmae_fast.create_model("vit_small_patch16_224", num_classes=-1)


def test_odd_token_grid_rejected_for_running_cell_only():
    m = vmae_fast.create_pretrain_model("vit_small_patch16_224", num_frames=2, img_size=48)  # 3x3 grid
    with pytest.raises(ValueError, match="even token grid"):
        m.sample_masks(1, 0.5, 0.5)
    masks = m.sample_masks(1, 0.5, 0.0)  # encoder-only masking has no such constraint
    assert torch.isfinite(m(torch.randn(1, 3, 2, 48, 48), masks).loss)


def test_float_clip_of_another_dtype_than_the_weights(model):
    masks = DualMask.sample(2, model.grid, 0.5, 0.5)
    with pytest.raises(ValueError, match="video is torch.float64 but the model's weights are torch.float32"):
        model(torch.randn(2, 3, 4, 64, 64, dtype=torch.float64), masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast fp32 and bf16 clips are fine
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.isfinite(model(torch.randn(2, 3, 4, 64, 64, dtype=dtype), masks).loss)
        with pytest.raises(ValueError, match="video is torch.float64"):
            model(torch.randn(2, 3, 4, 64, 64, dtype=torch.float64), masks)


def test_uint8_clip_into_bf16_pretrain_model():
    """A bf16 model takes a uint8 clip (it raised a dtype mismatch in the patch embedding's
    linear): the normalized cubes are cast to the weights' dtype; loss and predictions close to
    the fp32 model's on the fp32-normalized clip."""
    model = small_pretrain(depth=1, decoder_depth=1)
    clip = torch.randint(0, 256, (2, 3, 4, 64, 64), dtype=torch.uint8)
    mean = torch.tensor(vmae_fast.IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(vmae_fast.IMAGENET_STD).view(3, 1, 1, 1)
    masks = DualMask.sample(2, model.grid, 0.5, 0.5)
    want = model((clip.float() / 255 - mean) / std, masks)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    got = bf16(clip, masks)
    assert got.pred.dtype == torch.bfloat16 and got.loss.dtype == torch.float32
    assert torch.isfinite(got.loss)
    assert rel_err(got.pred, want.pred) < MODEL_TOL[torch.bfloat16][0], rel_err(got.pred, want.pred)
    assert rel_err(got.loss, want.loss) < MODEL_TOL[torch.bfloat16][0], (got.loss.item(), want.loss.item())


def test_pretraining_needs_rgb():
    with pytest.raises(ValueError, match="in_chans=3"):
        vmae_fast.create_pretrain_model("vit_small_patch16_224", in_chans=1)


def test_mask_arguments_of_the_wrong_kind():
    with pytest.raises(ValueError, match="decoder_ratio must be a number, got '0.5'"):
        DualMask.sample(2, (2, 4, 4), 0.5, "0.5")
    with pytest.raises(ValueError, match="encoder_ratio must be a number"):
        DualMask.sample(2, (2, 4, 4), None, 0.5)
    with pytest.raises(ValueError, match="leaves the decoder nothing to reconstruct"):
        DualMask.sample(2, (2, 4, 4), 0.0, 0.0)
    import numpy as np
    m = DualMask.sample(np.int64(2), tuple(np.int64(x) for x in (2, 4, 4)), 0.5, 0.5)
    assert m.visible_idx.shape == (2, 16)


def test_dual_mask_built_by_hand_is_checked():
    good = DualMask.sample(2, (2, 4, 4), 0.5, 0.5)
    with pytest.raises(ValueError, match="bool tensors"):
        DualMask(good.encoder_masked.int(), good.decoder_masked, good.visible_idx, good.decoder_idx)
    with pytest.raises(ValueError, match="visible_idx must be a"):
        DualMask(good.encoder_masked, good.decoder_masked, good.visible_idx[:1], good.decoder_idx)
    with pytest.raises(ValueError, match="decoder_idx must be a"):
        DualMask(good.encoder_masked, good.decoder_masked, good.visible_idx, good.decoder_idx.int())


@pytest.mark.parametrize("interval,inside,outside", [("[0, 1]", (0.0, 0.5, 1.0), (-0.1, 1.01)),
                                                     ("[0, 1)", (0.0, 0.999), (1.0, -1e-9)),
                                                     ("(0, 1]", (1e-9, 1.0), (0.0, 1.5))])
def test_check_within_each_end_open_or_closed(interval, inside, outside):
    import argparse

    from vmae_fast.errors import UsageError, check_within

    for v in inside:
        check_within(argparse.Namespace(mixup_prob=v), {"mixup_prob": interval})
    for v in outside:
        with pytest.raises(UsageError) as err:
            check_within(argparse.Namespace(mixup_prob=v, other=9), {"mixup_prob": interval, "other": "[0, 1]"})
        assert str(err.value) == f"--mixup-prob must be in {interval}, got {v}"  # the first in the order given


def test_check_at_least_word_for_word():
    """The one minimum check of every command line (tools, training configs, bench)."""
    import argparse
    from dataclasses import dataclass

    from vmae_fast.errors import UsageError, check_at_least

    check_at_least(argparse.Namespace(batch_size=1, start=None), {"batch_size": 1, "start": 0, "absent": 3})
    with pytest.raises(UsageError) as err:
        check_at_least(argparse.Namespace(batch_size=0, topk=-2), {"topk": 1, "batch_size": 1})
    assert str(err.value) == "--topk must be >= 1, got -2"  # the first in the order given

    @dataclass(frozen=True)
    class Cfg:
        min_lr: float = -0.5

    with pytest.raises(UsageError) as err:
        check_at_least(Cfg(), {"min_lr": 0})
    assert str(err.value) == "--min-lr must be >= 0, got -0.5"
