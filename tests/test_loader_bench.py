"""`python -m bench.loader` end to end on tiny inputs, and the Kinetics-like clip generator."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (the `test` extra) writes and reads the clips")

from bench import loader  # noqa: E402
from vmae_fast.video import decoders as decode  # noqa: E402
from train.make_synthetic import make_kinetics_like, write_kinetics_like  # noqa: E402

DATA = Path(__file__).parent / "data"


def test_kinetics_like_clip_is_h264_with_b_frames(tmp_path):
    p = tmp_path / "k.mp4"
    write_kinetics_like(p, seconds=1.2, fps=30, width=320, height=256, preset="veryfast")
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        pkts = [pk for pk in c.demux(s) if pk.size]
        assert (s.codec_context.name, s.width, s.height, float(s.average_rate)) == ("h264", 320, 256, 30.0)
    assert len(pkts) == 36 and pkts[0].is_keyframe
    assert any(b.pts < a.pts for a, b in zip(pkts, pkts[1:]))  # B-frames: decode order != display order
    with pytest.raises(ValueError, match="even"):
        write_kinetics_like(tmp_path / "odd.mp4", seconds=0.2, width=321)


def test_make_kinetics_like_writes_a_list(tmp_path):
    paths = make_kinetics_like(tmp_path, n=2, seconds=0.4, sizes=((64, 48), (48, 64)), preset="ultrafast")
    assert [p.name for p in paths] == ["kin000_64x48_25fps.mp4", "kin001_48x64_30fps.mp4"]
    assert (tmp_path / "pretrain.txt").read_text().splitlines() == [f"videos/{p.name} 0 -1" for p in paths]


def test_bench_loader_writes_rows_goals_and_a_table(tmp_path, capsys):
    ours = "pyav"
    official = "decord" if decode.why_unavailable("decord") is None else "pyav"
    res = loader.main(["--videos", str(DATA / "carphone_distorted.mp4"), str(DATA / "bikes.mp4"),
                       "--decoders", ours, "--official-decoders", official, "--num-sample", "1,2",
                       "--workers", "1", "--clips", "2", "--batch", "1", "--frames", "4", "--size", "32",
                       "--out", str(tmp_path), "--name", "t"])
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"], default=str))
    assert {(r["pipeline"], r["decoder"], r["num_sample"]) for r in saved["rows"]} == {
        ("official", official, 1), ("official", official, 2), ("ours", ours, 1), ("ours", ours, 2)}
    for r in saved["rows"]:
        assert r["workers"] == 1 and r["clips"] >= 2 and r["cpu_s"] > 0 and r["clips_per_cpu_s"] > 0
        assert r["wall_clips_per_s"] > 0
    assert [f["file"] for f in saved["files"]] == ["carphone_distorted.mp4", "bikes.mp4"]
    assert saved["config"]["frames"] == 4 and saved["auto_decoder"] == decode.resolve_decoder("auto")
    if official == "decord" and saved["auto_decoder"] == ours:
        assert [g["num_sample"] for g in saved["goals"]] == [1]  # (no goal is set for num_sample 2)
    out = capsys.readouterr().out
    assert "| pipeline | source | decoder | num_sample | workers | clips / CPU-s |" in out
    assert out.count("\n| ours | files | pyav |") == 2


def test_bench_loader_sources_read_each_shard_once_per_clip(tmp_path, capsys):
    pytest.importorskip("webdataset", reason="the shards extra")
    video = DATA / "carphone_distorted.mp4"
    res = loader.main(["--videos", str(video), "--decoders", "pyav", "--official-decoders", "pyav",
                       "--sources", "files,shards,http", "--num-sample", "1", "--workers", "1", "--clips", "2",
                       "--batch", "1", "--frames", "4", "--size", "32", "--out", str(tmp_path), "--name", "t"])
    rows = {(r["pipeline"], r["source"]): r for r in res["rows"]}
    assert set(rows) == {("official", "files"), ("ours", "files"), ("ours", "shards"), ("ours", "http")}
    # one sample a shard: each clip after the first batch reads that shard once, whole (a 10240-byte
    # tar: 512-byte headers and the 7019-byte video padded, in one tar record), and the loader's own
    # messages and /proc/thread-self/io (rchar counts every read: ~0.5 kB a batch); the files row reads the
    # file at least once a clip
    shard = loader.write_bench_shards([video], tmp_path / "again") / "shard-000000.tar"
    for src in ("shards", "http"):
        r = rows[("ours", src)]
        assert r["clips"] >= 2 and r["clips_per_cpu_s"] > 0
        assert shard.stat().st_size == 10240 and 10240 <= r["bytes_per_clip"] < 10240 + 1024, (src, r)
    assert rows[("ours", "files")]["bytes_per_clip"] >= video.stat().st_size
    assert "| ours | http | pyav | 1 | 1 |" in capsys.readouterr().out


def test_bench_loader_finetune_rows_price_the_augmentation(tmp_path, capsys):
    res = loader.main(["--videos", str(DATA / "carphone_distorted.mp4"), "--decoders", "pyav",
                       "--official-decoders", "pyav", "--num-sample", "1", "--workers", "1", "--clips", "2",
                       "--batch", "1", "--frames", "4", "--size", "32", "--finetune", "--out", str(tmp_path),
                       "--name", "t"])
    rows = {r["pipeline"]: r for r in res["rows"]}
    assert set(rows) == {"official", "ours", "ours-finetune", "ours-finetune+aug"}
    auto = decode.resolve_decoder("auto")
    for name in ("ours-finetune", "ours-finetune+aug"):
        assert rows[name]["decoder"] == auto and rows[name]["clips"] >= 2 and rows[name]["clips_per_cpu_s"] > 0
    out = capsys.readouterr().out
    assert "| ours-finetune+aug |" in out and "baseline: official (decord)" in out


def test_bench_loader_breakdown_splits_a_video_s_cpu_time_by_stage(tmp_path, monkeypatch):
    pytest.importorskip("webdataset", reason="the shards extra")
    from bench import loader_breakdown as bd
    from train import data as D
    from vmae_fast.video.decoders import PyAVReader

    video = DATA / "carphone_distorted.mp4"
    spec = str(loader.write_bench_shards([video, video], tmp_path))
    before = {k: getattr(PyAVReader, k) for k in ("__init__", "_frames", "_rgb", "get")}
    shared, real = [], D.shared_batch

    def recorded(views):  # every batch made as a worker makes it: in shared memory
        out = real(views)
        shared.append((len(views), out.is_shared()))
        return out

    monkeypatch.setattr(D, "shared_batch", recorded)
    rows = bd.breakdown([video, video], spec, num_sample=2, frames=4, rate=4, size=32, reps=1)
    assert shared == [(2, True)] * 8  # (warm-up + 1 rep) x 2 videos x (files, shards), 2 views each
    assert torch.utils.data.get_worker_info() is None
    assert [r["source"] for r in rows] == ["files", "shards"]
    for r in rows:
        assert r["videos"] == 2
        parts = [r[k] for k in bd.STAGES]
        assert min(parts) >= -0.05 and r["decode"] > 0 and r["open+index"] > 0
        assert sum(parts) == pytest.approx(r["total_ms"])
        assert r["clips_per_cpu_s"] == pytest.approx(2e3 / r["total_ms"])
        assert r["decode_ceiling"] == pytest.approx(2e3 / r["decode"]) and r["decode_ceiling"] > r["clips_per_cpu_s"]
    assert rows[0]["read"] == 0 and rows[1]["read"] > 0
    assert {k: getattr(PyAVReader, k) for k in before} == before  # the timers are taken off again
    assert "| shards | 2 |" in bd.table(rows, {2: 10.0})


def test_a_bad_video_named_by_videos_is_one_line_before_any_measurement(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n" * 20)
    for name, why in (("empty.mp4", "not a readable video (empty file)"),
                      ("text.mp4", "not a readable video (FFmpeg: moov atom not found)")):
        with pytest.raises(SystemExit) as err:
            loader.main(["--videos", str(DATA / "bikes.mp4"), str(tmp_path / name), "--clips", "2",
                         "--workers", "1", "--out", str(tmp_path / "out")])
        assert str(err.value) == f"--videos: {tmp_path / name}: {why}"
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written
