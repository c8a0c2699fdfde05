"""Fine-tuning's RandAugment and random erasing (train/augment.py) against the official rules
(OpenGVLab/VideoMAEv2 dataset/rand_augment.py, dataset/random_erasing.py with ``cube=True``,
VideoClsDataset._aug_frame): one draw of ops per clip, the official op lists and parameters,
erase boxes by the official area/aspect/count rules, the same box on every frame, N(0, 1) fill
on the device; determinism from the seed, the global streams left alone, off switches, the
batch path through the fine-tune loss, and bad flags as one line. Small frames: a few seconds."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from train import finetune
from train.augment import (BOX_FIELDS, FILL, RAND_INCREASING_OPS, RAND_OPS, ClipRandAugment, EraseSpec, erase_,
                           erase_boxes, parse_rand_augment, to_pil)
from train.cli import run_cli
from train.data import VideoDataset, collate
from vmae_fast.video.lists import Entry

OFFICIAL = "rand-m7-n4-mstd0.5-inc1"


def textured(T=4, H=40, W=48, seed=0) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 frames with gradients and noise: every op changes something."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[:H, :W]
    base = (yy * 5 + xx * 3)[..., None] + np.array([0, 40, 80])
    return torch.from_numpy(np.stack([np.clip(base + 9 * t + rs.randint(0, 50, (H, W, 3)), 0, 255)
                                      for t in range(T)]).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A frame folder of 12 textured frames, named as the official rawframes lists expect."""
    d = tmp_path_factory.mktemp("clip")
    for i, f in enumerate(textured(12, 40, 48, seed=1)):
        Image.fromarray(f.numpy()).save(d / f"img_{i + 1:05}.jpg", quality=95)
    return d


def dataset(folder, mode="finetune", **kw):
    return VideoDataset([Entry(str(folder), 1, 12, label=3)], mode, 4, 2, 32, num_sample=2, seed=5, **kw)


# ----------------------------------------------------------------------------- RandAugment
def test_the_official_spec_parses_to_the_official_settings():
    s = parse_rand_augment(OFFICIAL)
    assert (s.magnitude, s.num_layers, s.magnitude_std, s.increasing, s.weighted) == (7, 4, 0.5, True, False)
    assert s.ops == RAND_INCREASING_OPS and parse_rand_augment("rand-m9-n2").ops == RAND_OPS
    bare = parse_rand_augment("rand")  # the official defaults: magnitude 10, 2 ops
    assert (bare.magnitude, bare.num_layers, bare.magnitude_std) == (10, 2, 0.0)
    assert parse_rand_augment("rand-inc0").ops == RAND_OPS  # the documented meaning (the official reads it as inc1)
    w = parse_rand_augment("rand-n3-w0").choice_weights
    assert w.sum() == pytest.approx(1) and w[RAND_OPS.index("Rotate")] == pytest.approx(0.3)  # the weights sum to 1
    assert w[RAND_OPS.index("Invert")] == w[RAND_OPS.index("Posterize")] == 0
    for off in (None, "", "none", "None"):
        assert parse_rand_augment(off) is None


@pytest.mark.parametrize("spec, message", [
    ("rand-x9", "unknown section 'x9'"), ("v0", "only RandAugment specs"), ("rand-m7.5", "needs an integer after 'm'"),
    ("rand-m", "needs an integer after 'm'"), ("rand-m7-m9", "repeated section 'm9'"), ("rand-mstdx", "unknown"),
    ("rand-w1", "only op weight set is w0"), ("rand-n14-w0", "n must be <= 13"), ("rand--m7", "unknown section ''"),
])
def test_bad_specs_name_the_bad_part(spec, message):
    with pytest.raises(ValueError, match="^--aa .*" + message.replace("(", r"\(").replace(".", r"\.")):
        parse_rand_augment(spec)


def test_the_ops_are_timms_with_the_official_parameters():
    from timm.data import auto_augment as A

    assert list(RAND_OPS) == A._RAND_TRANSFORMS and list(RAND_INCREASING_OPS) == A._RAND_INCREASING_TRANSFORMS
    ra = ClipRandAugment(OFFICIAL, 224).transform
    assert ra.num_layers == 4 and ra.choice_weights is None and [op.name for op in ra.ops] == list(RAND_INCREASING_OPS)
    for op in ra.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 7, 0.5)
        assert op.kwargs == {"fillcolor": FILL, "resample": Image.BICUBIC}
        assert op.hparams["translate_const"] == 100  # int(0.45 x 224), as the official passes
    assert ClipRandAugment(OFFICIAL, 224, "bilinear").transform.ops[0].kwargs["resample"] == Image.BILINEAR
    assert isinstance(ClipRandAugment(OFFICIAL, 224, "random").transform.ops[0].kwargs["resample"], tuple)


def test_one_draw_per_clip_every_frame_the_same_ops():
    ra = ClipRandAugment(OFFICIAL, 32)
    x = textured(3)
    x = torch.stack([x[0], x[1], x[0], x[2]])  # frames 0 and 2 equal
    frames = to_pil(x)
    changed = 0
    for seed in range(40):
        out = ra.apply_uint8(frames, seed)
        assert out.shape == x.shape and out.dtype == torch.uint8
        assert torch.equal(out[0], out[2])  # equal before, equal after
        # each frame gets what the clip's draw does to it alone: the same ops and magnitudes
        assert torch.equal(out[3], ra.apply_uint8([frames[3]], seed)[0])
        changed += not torch.equal(out, x)
        assert torch.equal(out, ra.apply_uint8(frames, seed))  # a function of the seed
    assert changed >= 30  # 4 ops at probability 0.5: 1/16 of the clips keep every pixel
    assert not torch.equal(ra.apply_uint8(frames, 1), ra.apply_uint8(frames, 2))


def test_samples_are_deterministic_and_leave_the_global_streams_alone(folder):
    ds = dataset(folder, auto_augment=OFFICIAL, erase=EraseSpec(probability=1.0))
    py, npy = random.getstate(), np.random.get_state()
    a, b, c = ds[(0, 0)], ds[(0, 0)], ds[(1, 0)]
    assert random.getstate() == py
    assert all(np.array_equal(u, v) for u, v in zip(np.random.get_state(), npy))
    assert all(torch.equal(u, v) for u, v in zip(a["video"], b["video"])) and torch.equal(a["erase"], b["erase"])
    assert not all(torch.equal(u, v) for u, v in zip(a["video"], c["video"]))  # another epoch, other draws
    assert a["erase"].shape == (2, 1, BOX_FIELDS) and (a["erase"][:, 0, 2] > 0).all()


def test_off_is_the_plain_pipeline_and_other_modes_are_untouched(folder):
    plain = dataset(folder)
    off = dataset(folder, auto_augment="none", erase=EraseSpec(probability=0.0))
    on = dataset(folder, auto_augment=OFFICIAL, erase=EraseSpec())
    assert off.rand_augment is None and off.erase is None
    for key in [(0, 0), (1, 0), (2, 0)]:
        p, o = plain[key], off[key]
        assert all(torch.equal(u, v) for u, v in zip(p["video"], o["video"])) and "erase" not in o
        # RandAugment's draws come after the crop's and flip's: with a draw that applies no op,
        # the crop would be the plain one; with ops, pixels differ but the shapes do not
        assert all(u.shape == v.shape for u, v in zip(p["video"], on[key]["video"]))
    for mode, kw in (("pretrain", {}), ("test", {"num_segments": 2, "num_crops": 2})):
        ref, aug = dataset(folder, mode, **kw), dataset(folder, mode, auto_augment=OFFICIAL, erase=EraseSpec(1.0), **kw)
        assert aug.rand_augment is None and aug.erase is None
        r, g = ref[(0, 0)], aug[(0, 0)]
        assert all(torch.equal(u, v) for u, v in zip(r["video"], g["video"])) and "erase" not in g


def test_the_dataset_pickles_for_spawned_workers(folder):
    import pickle

    ds = dataset(folder, auto_augment="rand-m9-n2-mstd1-w0", erase=EraseSpec(1.0, "rand", 2))
    back = pickle.loads(pickle.dumps(ds))
    a, b = ds[(0, 0)], back[(0, 0)]
    assert all(torch.equal(u, v) for u, v in zip(a["video"], b["video"])) and torch.equal(a["erase"], b["erase"])


# ----------------------------------------------------------------------------- random erasing
def draw_boxes(n, size, spec, seed=0):
    rng = np.random.default_rng(seed)
    return torch.stack([erase_boxes(rng, size, size, spec) for _ in range(n)])  # (n, K, 5)


def test_erase_boxes_follow_the_official_rules():
    S, n = 224, 20000
    b = draw_boxes(n, S, EraseSpec(probability=0.25))
    top, left, h, w = (b[:, 0, k].double() for k in range(4))
    hit = h > 0
    assert abs(hit.double().mean().item() - 0.25) < 0.015  # 5 sigma
    top, left, h, w = top[hit], left[hit], h[hit], w[hit]
    assert ((top >= 0) & (left >= 0) & (top + h <= S) & (left + w <= S) & (h < S) & (w < S)).all()
    # area fraction uniform in [0.02, 1/3], aspect (h / w) log-uniform in [0.3, 1/0.3]: the
    # sides are rounded, so the bounds hold up to half a pixel on each side
    frac = h * w / S ** 2
    slack_lo, slack_hi = (h - 0.5) * (w - 0.5) / (h * w), (h + 0.5) * (w + 0.5) / (h * w)
    assert ((frac >= 0.02 * slack_lo) & (frac <= slack_hi / 3)).all()
    assert frac.min() < 0.022 and frac.max() > 0.32 and abs(frac.mean().item() - (0.02 + 1 / 3) / 2) < 0.005
    aspect = h / w
    lo, hi = (h - 0.5) / (w + 0.5), (h + 0.5) / (w - 0.5)
    assert ((hi >= 0.3) & (lo <= 1 / 0.3)).all()
    assert aspect.min() < 0.32 and aspect.max() > 3.1 and abs(aspect.log().median().item()) < 0.05
    # the position is uniform over the places the box fits
    assert abs((top / (S - h)).mean().item() - 0.5) < 0.02 and abs((left / (S - w)).mean().item() - 0.5) < 0.02
    assert (b[~hit.bool()] == 0).all() and len(set(b[hit.bool(), 0, 4].tolist())) == int(hit.sum())  # seeds


def test_recount_draws_one_to_count_boxes_sharing_the_area():
    S, n = 224, 6000
    b = draw_boxes(n, S, EraseSpec(probability=1.0, max_count=3), seed=1)
    boxes = (b[..., 2] > 0).sum(1)
    counts = torch.bincount(boxes, minlength=4)[1:].double() / n
    assert counts.sum() == 1 and ((counts - 1 / 3).abs() < 0.03).all(), counts
    for k in (1, 2, 3):  # each box's area fraction in [0.02, 1/3] / count
        sel = b[boxes == k][:, :k]
        frac = (sel[..., 2] * sel[..., 3]).double() / S ** 2 * k
        assert frac.min() > 0.017 and frac.max() < 0.36 and abs(frac.mean().item() - 0.1767) < 0.01


def test_erase_fills_one_box_on_every_frame_with_unit_noise():
    N, T, S = 3, 4, 64
    video = torch.randn(N, 3, T, S, S) * 0.3 + 2.0  # far from N(0, 1): the fill stands out
    boxes = torch.zeros(N, 2, BOX_FIELDS, dtype=torch.int64)
    boxes[0, 0] = torch.tensor([5, 7, 40, 30, 11])
    boxes[2, 0] = torch.tensor([0, 0, 20, 64 - 1, 12])
    boxes[2, 1] = torch.tensor([30, 10, 10, 10, 13])
    before = video.clone()
    erase_(video, boxes, "pixel")
    inside = torch.zeros(N, 1, 1, S, S, dtype=torch.bool)
    inside[0, ..., 5:45, 7:37] = True
    inside[2, ..., 0:20, 0:63] = True
    inside[2, ..., 30:40, 10:20] = True
    inside = inside.expand_as(video)
    assert torch.equal(video[~inside], before[~inside])  # untouched elsewhere
    noise = video[inside]
    assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1) < 0.03
    region = video[0, :, :, 5:45, 7:37]
    assert not torch.equal(region[:, 0], region[:, 1])  # new noise for every frame, as the official
    # from the box's seed: the same noise again, whatever else is in the batch
    again = torch.zeros(1, 3, T, S, S)
    erase_(again, boxes[:1], "pixel")
    assert torch.equal(again[0, :, :, 5:45, 7:37], region)
    # rand: one colour per channel and frame; const: 0
    for mode in ("rand", "const"):
        v = before.clone()
        erase_(v, boxes, mode)
        r = v[0, :, :, 5:45, 7:37]
        assert torch.equal(r, r[..., :1, :1].expand_as(r)) and torch.equal(v[~inside], before[~inside])
        assert (r == 0).all() if mode == "const" else not torch.equal(r[:, 0], r[:, 1])


def test_collate_carries_the_boxes_in_view_order(folder):
    ds = dataset(folder, erase=EraseSpec(probability=1.0, max_count=2))
    samples = [ds[(0, 0)], ds[(1, 0)]]
    batch = collate(samples)
    assert batch["video"].shape[0] == 4 and batch["erase"].shape == (4, 2, BOX_FIELDS)
    assert torch.equal(batch["erase"], torch.cat([samples[0]["erase"], samples[1]["erase"]]))
    assert "erase" not in collate([dataset(folder)[(0, 0)]])


# ----------------------------------------------------------------------------- fine-tuning CLI
TINY_CLF = ["--model", "vit_small_patch16_224", "--model-overrides", "depth=1,embed_dim=32,num_heads=2,patch_size=8",
            "--num-frames", "4", "--sampling-rate", "2", "--img-size", "32", "--num-workers", "0", "--no-progress",
            "--batch-size", "2", "--num-sample", "2"]


@pytest.fixture
def train_list(folder, tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{folder} 12 {i % 4}\n" for i in range(4)))  # the rawframes format
    return lst


def test_the_recipe_turns_both_on_and_the_flags_turn_them_off(train_list, tmp_path):
    base = ["--train-list", str(train_list), "--num-classes", "4", "--output-dir", str(tmp_path / "o")]
    args = finetune.parse_args(base)
    assert (args.aa, args.train_interpolation, args.reprob, args.remode, args.recount) == \
        (OFFICIAL, "bicubic", 0.25, "pixel", 1)
    assert parse_rand_augment(args.aa) is not None and args.erase_spec() == EraseSpec(0.25, "pixel", 1)
    for aa in ("none", ""):
        args = finetune.parse_args(base + ["--aa", aa, "--reprob", "0"])
        assert parse_rand_augment(args.aa) is None and args.erase_spec() is None


def test_the_loss_erases_then_mixes(train_list, tmp_path, monkeypatch):
    """Two steps of a tiny fine-tuning on CPU with RandAugment and erasing on every clip: the
    boxes reach the loss, are filled on the normalized clips, and the loss is finite."""
    seen, order = [], []

    def spy(video, boxes, mode):
        seen.append((boxes.clone(), mode, video.dtype))
        order.append("erase")
        return erase_(video, boxes, mode)

    def mix(mixup, video, label):
        order.append("mixup")
        return apply_mixup(mixup, video, label)

    apply_mixup = finetune.apply_mixup
    monkeypatch.setattr(finetune, "erase_", spy)
    monkeypatch.setattr(finetune, "apply_mixup", mix)
    res = finetune.main(["--train-list", str(train_list), "--num-classes", "4", "--output-dir", str(tmp_path / "o"),
                         *TINY_CLF, "--steps", "2", "--warmup-steps", "1", "--lr", "1e-3", "--reprob", "1",
                         "--remode", "pixel", "--recount", "2", "--log-every", "1"])
    assert res["step"] == 2 and len(seen) == 2 and order == ["erase", "mixup"] * 2
    for boxes, mode, dtype in seen:
        assert boxes.shape == (4, 2, BOX_FIELDS) and (boxes[:, 0, 2] > 0).all() and mode == "pixel"
        assert dtype == torch.float32
    from train.metrics import read_metrics
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "o") if "loss" in r)


@pytest.mark.parametrize("extra, message", [
    (["--reprob", "1.5"], "--reprob must be in [0, 1], got 1.5"),
    (["--reprob", "-0.1"], "--reprob must be in [0, 1], got -0.1"),
    (["--recount", "0"], "--recount must be >= 1, got 0"),
    (["--aa", "rand-m7-x4"], "--aa 'rand-m7-x4': unknown section 'x4'; expected rand-m<int>-n<int>"),
    (["--aa", "autoaugment"], "--aa 'autoaugment': only RandAugment specs are supported"),
])
def test_bad_flags_are_one_line_before_any_work(train_list, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    rc = run_cli(finetune.main, "vmae-finetune", ["--train-list", str(train_list), "--num-classes", "4",
                                                  "--output-dir", str(out), *TINY_CLF, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("vmae-finetune: error: ") and message in err[0], err
    assert not out.exists()
