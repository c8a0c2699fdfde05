"""Dataset lists (every format the official code reads, BOM, errors naming file:line), evaluation
that never substitutes an unreadable video, and skipped videos counted per file."""
from __future__ import annotations

import warnings

import pytest
import torch

from train import finetune
from train.data import VideoDataset, collate
from vmae_fast.video.lists import Entry, read_list
from train.distributed import Dist


def write(path, text, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


# ----------------------------------------------------------------------------- list formats
def test_pretrain_lists_three_and_four_columns(tmp_path):
    three = read_list(write(tmp_path / "p3.txt", "a/x.mp4 0 -1\nSomethingV2/12 1 48\n"), "/r", "pretrain")
    assert three == [Entry("/r/a/x.mp4", 0, -1), Entry("/r/SomethingV2/12", 1, 48)]
    # the official hybrid list: path start_idx total_frames label
    four = read_list(write(tmp_path / "p4.txt", "k400/x.mp4 0 -1 3\n\nAVA2.2/clip 1 300 -1\n"), kind="pretrain")
    assert four == [Entry("k400/x.mp4", 0, -1, 3), Entry("AVA2.2/clip", 1, 300, -1)]
    # a path with spaces (the numbers are split off the right)
    assert read_list(write(tmp_path / "sp.txt", "my videos/x y.mp4 0 -1\n"), kind="pretrain") == \
        [Entry("my videos/x y.mp4", 0, -1)]


def test_finetune_lists_path_label_and_rawframes(tmp_path):
    assert read_list(write(tmp_path / "f2.txt", "a/x.mp4 3\nrawframes/77 1\n"), "/r", "finetune") == \
        [Entry("/r/a/x.mp4", label=3), Entry("/r/rawframes/77", label=1)]
    # the official rawframes list (SSv2): folder total_frames label, frames img_{:05}.jpg from 1
    raw = read_list(write(tmp_path / "f3.txt", "12345 48 87\n7 30 0\n"), "/r", "finetune")
    assert raw == [Entry("/r/12345", 1, 48, 87), Entry("/r/7", 1, 30, 0)]
    # a 'path label' list whose paths have spaces stays 'path label' (not every line fits 3 fields)
    assert read_list(write(tmp_path / "f2s.txt", "my dir/x 1.mp4 4\nb.mp4 2\n"), kind="finetune") == \
        [Entry("my dir/x 1.mp4", label=4), Entry("b.mp4", label=2)]


def test_a_bom_is_ignored(tmp_path):
    assert read_list(write(tmp_path / "b.txt", "x.mp4 2\n", bom=True), kind="finetune") == [Entry("x.mp4", label=2)]
    assert read_list(write(tmp_path / "b4.txt", "x.mp4 0 -1 5\n", bom=True), kind="pretrain") == \
        [Entry("x.mp4", 0, -1, 5)]


@pytest.mark.parametrize("kind,text,line,why", [
    ("finetune", "a.mp4 1\nb.mp4\n", 2, "integers after the path"),
    ("finetune", "a.mp4 1\nb.mp4 cat\n", 2, "integers after the path"),
    ("finetune", "a.mp4 1\n\nb.mp4 -2\n", 3, "a label >= 0"),
    ("finetune", "a 10 1\nb 0 1\n", 2, "total_frames >= 1"),
    ("pretrain", "a.mp4 0 -1\nb.mp4 5\n", 2, "integers after the path"),
    ("pretrain", "a.mp4 0 -1\nb.mp4 0 0\n", 2, "total_frames > 0 or -1"),
])
def test_a_bad_line_names_file_line_expected_and_got(tmp_path, kind, text, line, why):
    lst = write(tmp_path / "bad.txt", text)
    with pytest.raises(ValueError) as exc:
        read_list(lst, kind=kind)
    msg = str(exc.value)
    assert msg.startswith(f"{lst}:{line}: expected '<path> ") and why in msg and "got '" in msg, msg


def test_empty_list_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        read_list(write(tmp_path / "e.txt", "\n\n", bom=True), kind="finetune")


# ----------------------------------------------------------------------------- evaluation, skips
@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    pytest.importorskip("av", reason="PyAV writes the synthetic videos")
    from train.make_synthetic import make_dataset

    root = tmp_path_factory.mktemp("lists")
    make_dataset(root, n=4, frames=8, height=32, width=32, seed=0)  # labels 0, 1, 2, 3
    (root / "corrupt.mp4").write_bytes(b"\x00not a video" * 100)
    return root


class ConstantModel(torch.nn.Module):
    """Always predicts class 0; counts its forwards."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tensor([5.0, 0, 0, 0]).expand(x.shape[0], 4) + self.w


@pytest.mark.parametrize("bs", [1, 3])
def test_eval_skips_an_unreadable_video_instead_of_substituting(videos, tmp_path, bs):
    # the corrupt video (label 1) would be replaced by the next one (label 0): 2/4 instead of 1/3
    names = sorted(p.name for p in (videos / "videos").iterdir())
    lst = write(tmp_path / "val.txt", "corrupt.mp4 1\n" + "".join(f"videos/{n} {k}\n" for k, n in
                                                                 zip((0, 1, 2), names[:3])))
    weights = write(tmp_path / "weights.pth", "")  # --eval needs weights; only the list is read here
    cfg = finetune.parse_args(["--eval", "--finetune", str(weights), "--val-list", str(lst), "--num-classes", "3",
                               "--data-root", str(videos), "--num-frames", "4", "--sampling-rate", "2",
                               "--img-size", "32", "--test-num-segment", "2", "--test-num-crop", "1",
                               "--eval-batch-size", str(bs), "--batch-size", str(bs), "--num-workers", "0",
                               "--output-dir", str(tmp_path / "out")])
    evaluate = finetune.make_evaluate(cfg, Dist(), "fp32")
    model = ConstantModel()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = evaluate(model)
    assert res["videos"] == 3 and res["val_skipped"] == 1
    assert res["acc1"] == pytest.approx(100 / 3) and res["acc5"] == pytest.approx(100.0)
    lines = [str(x.message) for x in w if "corrupt.mp4" in str(x.message)]
    assert lines == [f"skipping video {videos / 'corrupt.mp4'}: not a readable video (FFmpeg: moov atom not found)"], lines
    assert model.calls == (4 if bs == 1 else 2)  # one per batch: bs 1, a dummy one for the empty batch
    assert evaluate(model)["val_skipped"] == 1  # the next evaluation counts it again (not a training count)


def test_collate_leaves_out_samples_not_loaded():
    v = [torch.zeros(3, 2, 4, 4, dtype=torch.uint8)]
    out = collate([{"video": None, "label": 1, "index": 0, "skipped": ["a"]},
                   {"video": v, "label": 2, "index": 1, "skipped": []}])
    assert out["video"].shape == (1, 3, 2, 4, 4) and out["label"].tolist() == [2]
    assert out["index"].tolist() == [1] and out["loaded"].tolist() == [False, True] and out["skipped"] == ["a"]
    assert out["loaded"].dtype == torch.bool
    empty = collate([{"video": None, "label": 1, "index": 0, "skipped": ["a"]}])
    assert empty["video"] is None and empty["loaded"].tolist() == [False] and empty["loaded"].dtype == torch.bool
    # nothing loaded: empty int64 labels and indices, as a batch with samples has
    assert sorted(empty) == ["index", "label", "loaded", "skipped", "video"] and empty["skipped"] == ["a"]
    for k in ("label", "index"):
        assert empty[k].dtype == out[k].dtype == torch.int64 and tuple(empty[k].shape) == (0,)


def test_training_skips_count_files_once_across_epochs(videos, monkeypatch):
    entries = [Entry(str(videos / "corrupt.mp4"), label=1)] + read_list(videos / "train.txt", videos, "finetune")
    ds = VideoDataset(entries, "finetune", 4, 2, 32, seed=0)
    opened = []
    load = VideoDataset._load
    monkeypatch.setattr(VideoDataset, "_load", lambda self, e, rng: (opened.append(e.path), load(self, e, rng))[1])
    reported = []
    with pytest.warns(UserWarning, match="corrupt.mp4"):
        for epoch in (0, 1):
            for i in range(len(ds)):
                s = ds[(epoch, i)]
                assert s["index"] != 0  # substituted in training (the official behaviour)
                reported += s["skipped"]
    assert reported == [str(videos / "corrupt.mp4")]  # once, not once per epoch
    assert opened.count(str(videos / "corrupt.mp4")) == 1  # remembered, not tried again
    # the substitute is the one a retry would have given: the same clip as a fresh dataset's
    fresh = VideoDataset(entries, "finetune", 4, 2, 32, seed=0)
    with pytest.warns(UserWarning):
        assert torch.equal(fresh[(1, 0)]["video"][0], ds[(1, 0)]["video"][0])


def test_training_loop_counts_a_file_once_over_two_epochs(videos, tmp_path):
    from train import pretrain
    from train.metrics import read_metrics

    good = read_list(videos / "pretrain.txt", videos, "pretrain")
    lst = write(tmp_path / "p.txt", f"{videos}/corrupt.mp4 0 -1 7\n" + "".join(f"{e.path} 0 -1 0\n" for e in good))
    out = tmp_path / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.warns(UserWarning, match="corrupt.mp4"):
            res = pretrain.main(["--data-list", str(lst), "--output-dir", str(out), "--model", "vit_small_patch16_224",
                                 "--model-overrides", "depth=1,embed_dim=32,num_heads=2,decoder_embed_dim=32,"
                                 "decoder_num_heads=2,patch_size=8", "--decoder-depth", "1", "--num-frames", "4",
                                 "--sampling-rate", "2", "--img-size", "32", "--num-workers", "0", "--no-progress",
                                 "--batch-size", "4", "--num-sample", "1", "--steps", "3", "--log-every", "1",
                                 "--lr", "1e-3"])
    finally:
        torch.set_num_threads(n)
    rows = [r for r in read_metrics(out) if "skipped_videos" in r]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["skipped_videos"] for r in rows] == [1, 1, 1] and res["skipped"] == 1
