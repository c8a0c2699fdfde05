"""Encoder features: the classifier's forward_features(pool=True|False), and
vmae-extract-features (vmae_fast.tools.extract_features; sliding windows as the official TAD extractor, resume, bad
videos) on real videos."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import vmae_fast
from vmae_fast.tools import extract_features as E

from conftest import rel_err

VIDEO = str(Path(__file__).resolve().parent / "data" / "carphone_distorted.mp4")  # 120 frames, 176x144
KW = dict(depth=1, num_frames=4, img_size=32, patch_size=8)


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_forward_features_pooled_and_per_token(mean_pooling):
    m = vmae_fast.create_model("vit_small_patch16_224", num_classes=3, use_mean_pooling=mean_pooling, **KW).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 3, 4, 32, 32)
        tokens = m.forward_features(x, pool=False)
        pooled = m.forward_features(x, pool=True)
        raw = m.blocks(m.patch_embed(x) + m.pos_embed)  # the encoder on every token, by hand
        assert tokens.shape == (2, 32, 384) and pooled.shape == (2, 384)
        if mean_pooling:  # raw tokens; the head sees fc_norm of their mean
            assert torch.equal(tokens, raw) and rel_err(pooled, m.fc_norm(raw.mean(1))) < 1e-6
        else:  # the final norm per token; the head sees the first token's
            assert rel_err(tokens, m.norm(raw)) < 1e-6 and rel_err(pooled, tokens[:, 0]) < 1e-6
        assert rel_err(m.head(pooled), m(x)) < 1e-6


def test_window_starts_as_official():
    assert E.window_starts(100, 16, 4) == list(range(0, 100 - 15, 4))  # official range(0, n - 15, 4)
    assert E.window_starts(100, 16, 16) == list(range(0, 85, 16))
    assert E.window_starts(10, 16, 4) == [0] and E.window_frames(0, 10, 16)[-7:] == [9] * 7
    assert E.window_starts(20, 4, 2, sampling_rate=3) == list(range(0, 20 - 9, 2))


@pytest.mark.parametrize("norm", ["imagenet", "none"])
def test_preprocess_in_groups_of_frames_equals_all_at_once(monkeypatch, norm):
    frames = torch.randint(0, 256, (7, 37, 53, 3), dtype=torch.uint8)
    whole = E.preprocess(frames, 24, norm)
    x = frames.permute(0, 3, 1, 2).float() / 255  # the definition, on all frames at once
    x = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    if norm == "imagenet":
        x = (x - torch.tensor(vmae_fast.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(vmae_fast.IMAGENET_STD).view(1, 3, 1, 1)
    assert whole.shape == (7, 3, 24, 24) and torch.equal(whole, x)
    for frames_a_group in (1, 3):  # 3 does not divide 7: a short last group
        monkeypatch.setattr(E, "PREPROCESS_BYTES", 37 * 53 * 3 * 4 * frames_a_group)
        assert torch.equal(E.preprocess(frames, 24, norm), whole)
    assert E.preprocess(frames[:0], 24, norm).shape == (0, 3, 24, 24)


def _ckpt(tmp_path):
    torch.manual_seed(0)
    m = vmae_fast.create_model("vit_small_patch16_224", num_classes=10, **KW).eval()
    path = tmp_path / "clf.pth"
    torch.save({"model": m.state_dict()}, path)
    return m, str(path)


def test_extract_features_windows_values_and_resume(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test videos")
    from vmae_fast.video import Entry, VideoSource

    model, ckpt = _ckpt(tmp_path)
    out = tmp_path / "feats"
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    args = [VIDEO, str(bad), "--checkpoint", ckpt, "--output-dir", str(out), "--num-frames", "4", "--img-size", "32",
            "--stride", "16", "--batch-size", "3", "--no-progress", "--device", "cpu", "--dtype", "fp32"]
    assert E.main(args) == 1  # the broken file is named (one line) and counted; the good one is written
    err = [line for line in capsys.readouterr().err.splitlines() if "broken.mp4" in line]
    assert len(err) == 1 and err[0].startswith(f"vmae-extract-features: skipping {bad}: "), err
    feats = np.load(out / "carphone_distorted.npy")
    starts = E.window_starts(120, 4, 16)
    assert feats.shape == (len(starts), 384) == (8, 384) and feats.dtype == np.float32
    # windows 0 and 7, computed directly: frames s..s+3, /255, resized to 32x32, ImageNet-normalized
    src = VideoSource(Entry(path=os.path.abspath(VIDEO)))
    mean = torch.tensor(vmae_fast.IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(vmae_fast.IMAGENET_STD).view(3, 1, 1, 1)
    for k in (0, 7):
        assert E.window_frames(starts[k], 120, 4) == list(range(16 * k, 16 * k + 4))
        frames = src.get(list(range(16 * k, 16 * k + 4))).permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)
        x = torch.nn.functional.interpolate(frames, size=(32, 32), mode="bilinear", align_corners=False)
        clip = ((x.transpose(0, 1) - mean) / std)[None]
        with torch.no_grad():
            assert rel_err(torch.from_numpy(feats[k]), model.forward_features(clip)[0]) < 1e-5
    # --input-norm none: the official extractor's unnormalized [0, 1] frames
    x01 = src.get(E.window_frames(0, 120, 4)).permute(3, 0, 1, 2).float()[None] / 255
    src.close()
    raw = E.video_features(model, VideoSource(Entry(path=os.path.abspath(VIDEO))).get, 120, stride=16,
                           input_norm="none")
    with torch.no_grad():
        want = model.forward_features(torch.nn.functional.interpolate(x01[0].transpose(0, 1), size=(32, 32),
                                                                      mode="bilinear").transpose(0, 1)[None])
    assert rel_err(torch.from_numpy(raw[0]), want[0]) < 1e-5
    # resume: the written file is skipped, not rewritten; per-token features go to their own folder
    before = os.stat(out / "carphone_distorted.npy").st_mtime_ns
    done = E.extract(model, [VIDEO], out, stride=16, progress=False)
    assert done == {"written": [], "skipped": [VIDEO], "failed": []}
    assert os.stat(out / "carphone_distorted.npy").st_mtime_ns == before
    assert E.main(args[:1] + args[2:] + ["--no-pool", "--output-dir", str(tmp_path / "tok")]) == 0
    assert np.load(tmp_path / "tok" / "carphone_distorted.npy").shape == (8, 32, 384)


def test_windows_of_several_videos_share_forward_passes(tmp_path, monkeypatch, capsys):
    """Consecutive videos fill one batch together (8 + 8 windows in batches of 5: 5, 5, 5, 1), and
    each video's rows are those of the video alone; the progress counts windows."""
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test videos")
    pytest.importorskip("tqdm", reason="the progress bar is tqdm's (train/test extras)")
    import shutil

    from vmae_fast.video import Entry, VideoSource

    model, _ = _ckpt(tmp_path)
    other = tmp_path / "other.mp4"
    shutil.copy(VIDEO, other)
    sizes = []
    real = E.forward_windows
    monkeypatch.setattr(E, "forward_windows", lambda m, clips, *a, **k: sizes.append(len(clips)) or real(m, clips, *a, **k))
    done = E.extract(model, [VIDEO, str(other)], tmp_path / "f", stride=16, batch_size=5, progress=True,
                     workers=1)
    assert done["written"] == [VIDEO, str(other)] and sizes == [5, 5, 5, 1]
    assert "16/16" in capsys.readouterr().err  # windows, not videos
    sizes.clear()
    alone = E.video_features(model, VideoSource(Entry(path=os.path.abspath(VIDEO))).get, 120, stride=16, batch_size=8)
    for name in ("carphone_distorted", "other"):
        assert rel_err(torch.from_numpy(np.load(tmp_path / "f" / f"{name}.npy")), torch.from_numpy(alone)) < 1e-5


def test_cpu_workers_split_each_batch_and_give_the_same_rows(tmp_path, monkeypatch):
    """``workers=2``: the windows run as parts of ``CPU_PART`` (2), each handed over once read (not
    once a batch of 5 is), on two threads with half the intra-op threads each (one on 2 cores), at
    most 5 windows (3 parts) in the model at once; the files equal those of one worker, and the
    thread count is restored."""
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test videos")
    model, _ = _ckpt(tmp_path)
    threads = torch.get_num_threads()
    E.extract(model, [VIDEO], tmp_path / "one", stride=16, batch_size=5, progress=False, workers=1)
    parts = []
    real = E.forward_windows

    def spy(m, clips, *a, **k):
        parts.append((len(clips), torch.get_num_threads()))
        return real(m, clips, *a, **k)

    monkeypatch.setattr(E, "forward_windows", spy)
    held, most = [0], [0]  # handed over and not yet collected
    real_submit = E._Forward.submit

    def submit(self, clips):
        held[0] += 1
        most[0] = max(most[0], held[0])
        wait = real_submit(self, clips)
        return lambda: held.__setitem__(0, held[0] - 1) or wait()

    monkeypatch.setattr(E._Forward, "submit", submit)
    E.extract(model, [VIDEO], tmp_path / "two", stride=16, batch_size=5, progress=False, workers=2)
    t = max(1, threads // 2)
    assert parts == [(2, t)] * 4 and most[0] == 3  # 8 windows; 5 in the model: 3 parts
    assert torch.get_num_threads() == threads
    one, two = (torch.from_numpy(np.load(tmp_path / d / "carphone_distorted.npy")) for d in ("one", "two"))
    assert one.shape == (8, 384) and rel_err(two, one) < 1e-6


def test_cpu_workers_share_the_threads_of_a_large_machine(tmp_path, monkeypatch):
    """64 intra-op threads, batches of 16: 8 workers (one per part of 2 windows) of 8 threads
    each, not 64 workers of which 56 would idle; 2 threads: 2 workers of one."""
    model, _ = _ckpt(tmp_path)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    for threads, batch, want in ((64, 16, (8, 8)), (2, 16, (2, 1)), (64, 3, (2, 32))):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        fwd = E._Forward(model, True, None, None, batch)
        assert (fwd.workers, fwd.intra) == want
        fwd.close()
        assert set_to[-2:] == [want[1], threads]  # the share while it runs, then the count restored


def test_bf16_on_cpu_runs_cpu_bf16_attention_within_the_bf16_tolerance(tmp_path, monkeypatch):
    """``--dtype bf16`` on a CPU: attention runs as ``cpu_bf16`` in every pass, and the features
    stay within bf16's model tolerance of the fp32 ones."""
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test videos")
    import vmae_fast.attention as A
    from tolerances import MODEL_TOL

    _, ckpt = _ckpt(tmp_path)
    monkeypatch.delenv("VMAE_FAST_ATTN", raising=False)
    calls = []
    real = A.cpu_bf16_attention
    monkeypatch.setattr(A, "cpu_bf16_attention", lambda qkv, scale: calls.append(qkv.shape[0]) or real(qkv, scale))
    args = [VIDEO, "--checkpoint", ckpt, "--num-frames", "4", "--img-size", "32", "--stride", "16", "--device", "cpu",
            "--no-progress"]
    assert E.main(args + ["--dtype", "fp32", "--output-dir", str(tmp_path / "fp32")]) == 0
    assert calls == []
    assert E.main(args + ["--dtype", "bf16", "--output-dir", str(tmp_path / "bf16")]) == 0
    assert sum(calls) == 8  # every window of the video through cpu_bf16 (depth 1)
    fp32, bf16 = (torch.from_numpy(np.load(tmp_path / d / "carphone_distorted.npy")) for d in ("fp32", "bf16"))
    assert bf16.shape == fp32.shape == (8, 384)
    assert 0 < rel_err(bf16, fp32) < MODEL_TOL[torch.bfloat16][0]


def test_a_video_failing_mid_way_leaves_the_others_whole(tmp_path, monkeypatch):
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test videos")
    import shutil

    model, _ = _ckpt(tmp_path)
    bad = tmp_path / "bad.mp4"
    shutil.copy(VIDEO, bad)
    real = E._WindowReader.read

    def read(self, count):
        if self.next >= 4 and self.n == 120 and getattr(self, "_bad", False):
            raise OSError("decoder lost the stream")
        return real(self, count)

    real_open = E._open

    def open_(video, *a):
        item = real_open(video, *a)
        item.reader._bad = video == str(bad)
        return item

    monkeypatch.setattr(E._WindowReader, "read", read)
    monkeypatch.setattr(E, "_open", open_)
    errors = E.VideoErrors("vmae-extract-features")
    done = E.extract(model, [str(bad), VIDEO], tmp_path / "f", stride=16, batch_size=3, progress=False, errors=errors)
    assert done["failed"] == [str(bad)] and done["written"] == [VIDEO] and errors.failed == [str(bad)]
    assert not (tmp_path / "f" / "bad.npy").exists()
    assert np.load(tmp_path / "f" / "carphone_distorted.npy").shape == (8, 384)


@pytest.mark.parametrize("held", [64, 1])
def test_each_video_is_opened_once_and_the_bar_counts_every_window(tmp_path, monkeypatch, held):
    """The counting pass's reader is the extraction's (held=64); past HELD_OPEN a video is opened
    again at its turn (held=1). The files are the same bytes either way, and the bar's total is
    every window of the videos to do (8 + 8; the broken one fails at its first open)."""
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test videos")
    import shutil

    model, _ = _ckpt(tmp_path)
    other, bad = tmp_path / "other.mp4", tmp_path / "broken.mp4"
    shutil.copy(VIDEO, other)
    bad.write_bytes(b"not a video")
    opens, totals = [], []
    real_open, real_bar = E.open_source, E._Progress
    monkeypatch.setattr(E, "open_source", lambda path, *a: opens.append(os.path.basename(path)) or real_open(path, *a))
    monkeypatch.setattr(E, "_Progress", lambda total, enabled: totals.append(total) or real_bar(total, False))
    monkeypatch.setattr(E, "HELD_OPEN", held)
    errors = E.VideoErrors("vmae-extract-features")
    # (a batch is one video's 8 windows, so every row comes from the same pass as alone: equal bytes)
    done = E.extract(model, [VIDEO, str(bad), str(other)], tmp_path / "f", stride=16, batch_size=8, progress=True,
                     errors=errors, workers=1)
    assert done == {"written": [VIDEO, str(other)], "skipped": [], "failed": [str(bad)]} and totals == [16]
    want = ["carphone_distorted.mp4", "broken.mp4", "other.mp4"] + (["other.mp4"] if held == 1 else [])
    assert opens == want
    alone = tmp_path / "alone"
    E.extract(model, [VIDEO], alone, stride=16, batch_size=8, progress=False, workers=1)
    ref = (alone / "carphone_distorted.npy").read_bytes()
    assert (tmp_path / "f" / "carphone_distorted.npy").read_bytes() == ref == (tmp_path / "f" / "other.npy").read_bytes()
