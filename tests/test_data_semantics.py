"""The official pretraining data semantics, point by point, against the restatement of the
official code in bench/official_pipeline.py (and literal values where they are short)."""
from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.official_pipeline import OfficialMultiScaleCrop, official_frame_ids
from train import transforms as T
from train.data import VideoDataset
from vmae_fast.video.lists import Entry


class FixedNp:
    """Stands in for ``np.random``: ``randint(k)`` returns a set value, and records ``k``."""

    def __init__(self, value):
        self.value, self.highs = value, []

    def randint(self, high):
        self.highs.append(high)
        return self.value


class Scripted:
    """Stands in for a ``numpy.random.Generator``: ``integers(k)`` returns the next scripted
    value (checked to lie in ``0..k-1``) and records ``k``."""

    def __init__(self, values):
        self.values, self.highs = list(values), []

    def integers(self, high):
        self.highs.append(high)
        v = self.values.pop(0)
        assert 0 <= v < high
        return v


# ----------------------------------------------------------------------------- frames
def test_frame_ids_equal_the_official_for_every_start():
    cases = 0
    for n, frames, rate in itertools.product(range(1, 70), (1, 2, 5, 16), (1, 2, 4)):
        room = n - frames * rate + 1
        for start in range(max(room, 1)):
            off = official_frame_ids(n, frames, rate, FixedNp(start))
            assert T.pretrain_frame_ids(n, frames, rate, start) == off, (n, frames, rate, start)
            cases += 1
        # the start is drawn from the same range: randint(n - T*r + 1), or 0 when that is empty
        np_rng, ours = FixedNp(0), Scripted([0])
        official_frame_ids(n, frames, rate, np_rng)
        T.pretrain_start(n, frames, rate, ours)
        assert np_rng.highs == ours.highs == ([room] if room > 0 else [])
    assert cases > 10_000


def test_frame_ids_literal_cases():
    assert T.pretrain_frame_ids(64, 16, 4, 0) == list(range(0, 64, 4))
    assert T.pretrain_frame_ids(10, 4, 4, 0) == [0, 4, 8, 8]  # short: the last strided index repeats
    assert T.pretrain_frame_ids(20, 4, 1, 16) == [16, 17, 18, 18]  # the official's rate-1 quirk
    assert T.pretrain_frame_ids(1, 4, 4, 0) == [0, 0, 0, 0]


# ----------------------------------------------------------------------------- crops
def official_distribution(w, h, size=224, **kw) -> dict:
    """Enumerate the official sampler: ``random.choice`` of a pair, then of an offset."""
    crop = OfficialMultiScaleCrop(size, **kw)
    dist: Counter = Counter()
    pairs = crop.pairs(w, h)
    for cw, ch in pairs:
        if crop.fix_crop:
            offs = crop.fix_offsets(crop.more_fix_crop, w, h, cw, ch)
        else:
            offs = [(x, y) for x in range(w - cw + 1) for y in range(h - ch + 1)]
        for x, y in offs:
            dist[(x, y, cw, ch)] += Fraction(1, len(pairs) * len(offs))
    return dict(dist)


def our_sampler_distribution(w, h, size=224, **kw) -> dict:
    """Drive ``sample_multiscale_crop`` through every value its generator can return."""
    pairs = T.crop_sizes(w, h, size, kw.get("scales", T.PRETRAIN_SCALES), kw.get("max_distort", 1))
    dist: Counter = Counter()
    for i, (cw, ch) in enumerate(pairs):
        if kw.get("fix_crop", True):
            n_off = len(T.fixed_offsets(w, h, cw, ch, kw.get("more_fix_crop", True)))
            scripts = [[i, j] for j in range(n_off)]
        else:
            scripts = [[i, x, y] for x in range(w - cw + 1) for y in range(h - ch + 1)]
        for script in scripts:
            rng = Scripted(script)
            box = T.sample_multiscale_crop(w, h, size, rng, **kw)
            assert not rng.values  # every draw used
            dist[box] += Fraction(1, len(pairs) * len(scripts))
    return dict(dist)


@pytest.mark.parametrize("w,h", [(340, 256), (568, 320), (320, 568)])
def test_every_crop_choice_has_the_official_probability(w, h):
    off = official_distribution(w, h)
    assert sum(off.values()) == 1
    assert our_sampler_distribution(w, h) == off
    assert T.multiscale_crop_boxes(w, h, 224) == off


def test_crop_choices_literal_340x256():
    # sides int(256 * s) = 256, 224, 192, 168 (224 is the output size); pairs one step apart
    assert T.crop_sizes(340, 256, 224) == [(256, 256), (224, 256), (256, 224), (224, 224), (192, 224),
                                          (224, 192), (192, 192), (168, 192), (192, 168), (168, 168)]
    assert T.fixed_offsets(340, 256, 224, 192) == [(0, 0), (116, 0), (0, 64), (116, 64), (58, 32), (0, 32),
                                                   (116, 32), (58, 64), (58, 0), (29, 16), (87, 16), (29, 48),
                                                   (87, 48)]
    dist = T.multiscale_crop_boxes(340, 256, 224)
    # 10 pairs x 13 offsets; the two full-height pairs have h_step 0, so their 13 offsets fall on
    # 5 boxes each: 8 * 13 + 2 * 5 = 114 boxes. The center column (2 * 21, 0, 256, 256) is hit by
    # 3 of its 13 offsets (center, upper and lower center), x = 21 by 2 (the quarter points)
    assert len(dist) == 114
    assert dist[(42, 0, 256, 256)] == Fraction(3, 130) and dist[(21, 0, 256, 256)] == Fraction(2, 130)
    assert dist[(29, 16, 224, 192)] == Fraction(1, 130)


@pytest.mark.parametrize("kw", [dict(fix_crop=False), dict(more_fix_crop=False), dict(max_distort=0),
                                dict(max_distort=2, scales=(1, 0.8, 0.6))])
def test_crop_options_follow_the_official(kw):
    w, h = (120, 90) if not kw.get("fix_crop", True) else (340, 256)
    off = official_distribution(w, h, 64, **kw)
    assert our_sampler_distribution(w, h, 64, **kw) == off
    assert T.multiscale_crop_boxes(w, h, 64, **kw) == off


# ----------------------------------------------------------------------------- dataset rules
@pytest.fixture(scope="module")
def numbered_frames(tmp_path_factory) -> Path:
    """Frame folders whose frame ``i`` is a flat grey of level ``8 * i`` (JPEG keeps flat greys)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("frames")
    for folder, tmpl in (("SomethingV2/clip", "img_{:05}.jpg"), ("AVA2.2/clip", "image_{:06}.jpg"),
                         ("other/clip", "frame-{:03}.png")):
        d = root / folder
        d.mkdir(parents=True)
        for i in range(30):
            Image.fromarray(np.full((40, 48, 3), 8 * i, np.uint8)).save(d / tmpl.format(i + 1))  # start_idx 1
    return root


def frame_levels(views) -> list[list[int]]:
    return [[round(v[:, t].float().mean().item() / 8) for t in range(v.shape[1])] for v in views]


def test_hybrid_rules_rates_and_templates(numbered_frames):
    def run(folder, **kw):
        ds = VideoDataset([Entry(str(numbered_frames / folder), 1, 30)], "pretrain", 4, 4, 32, num_sample=2, **kw)
        out = ds[(0, 0)]
        assert not out["skipped"]
        return frame_levels(out["video"])

    ssv2 = run("SomethingV2/clip")  # sampled every 2nd frame whatever --sampling-rate says
    assert all(np.diff(levels).tolist() == [2, 2, 2] for levels in ssv2), ssv2
    assert ssv2[0] == ssv2[1]  # one decode, num_sample crops of the same frames
    ava = run("AVA2.2/clip")  # image_{:06}.jpg, the configured rate
    assert all(np.diff(levels).tolist() == [4, 4, 4] for levels in ava), ava
    other = run("other/clip", fname_tmpl="frame-{:03}.png")
    assert all(np.diff(levels).tolist() == [4, 4, 4] for levels in other), other
    with pytest.warns(UserWarning, match="skipping video"):  # the default template names no file here
        with pytest.raises(RuntimeError, match="failed to load"):
            VideoDataset([Entry(str(numbered_frames / "other/clip"), 1, 30)], "pretrain", 4, 4, 32)[0]
    nohybrid = run("SomethingV2/clip", hybrid_rules=False)
    assert all(np.diff(levels).tolist() == [4, 4, 4] for levels in nohybrid)


def test_short_videos_pad_as_the_official_or_are_skipped(numbered_frames):
    entry = Entry(str(numbered_frames / "AVA2.2/clip"), 1, 10)  # 10 frames, clip spans 16
    ds = VideoDataset([entry], "pretrain", 4, 4, 32, seed=3)
    assert frame_levels(ds[(0, 0)]["video"]) == [[0, 4, 8, 8]]  # not [0, 4, 8, 9]
    skipping = VideoDataset([entry, Entry(str(numbered_frames / "AVA2.2/clip"), 1, 30)], "pretrain", 4, 4, 32,
                            skip_short=True)
    with pytest.warns(UserWarning, match="too short: 10 frames, the clip spans 16"):
        out = skipping[(0, 0)]
    assert out["index"] == 1 and len(out["skipped"]) == 1


def test_samples_are_uint8_and_deterministic(numbered_frames):
    ds = VideoDataset([Entry(str(numbered_frames / "AVA2.2/clip"), 1, 30)], "pretrain", 4, 2, 32, num_sample=3,
                      seed=5)
    a, b = ds[(2, 0)], ds[(2, 0)]
    assert len(a["video"]) == 3
    for x, y in zip(a["video"], b["video"]):
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 4, 32, 32) and torch.equal(x, y)
