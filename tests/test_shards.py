"""WebDataset shards: the writer (vmae-shards), the reader against the files it came from, the
epoch layout over ranks and workers, resume positions, and faults."""
from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV probes and re-encodes the videos")
pytest.importorskip("webdataset", reason="the shards extra: pip install webdataset")

from train import write_shards  # noqa: E402
from train.data import VideoDataset  # noqa: E402
from train.shard_data import (ShardPosition, ShardStream, SkipAware, load_sample,  # noqa: E402
                              resume_start)
from vmae_fast.video import read_list  # noqa: E402
from vmae_fast.video import shards as fmt  # noqa: E402
from vmae_fast.errors import EXIT_SOME_FAILED, UsageError  # noqa: E402
from run_helpers import interrupted_when  # noqa: E402

DATA = Path(__file__).parent / "data"
VIDEOS = ("bikes.mp4", "carphone_distorted.mp4", "bigbuckbunny.mp4")


def write_list(path: Path, lines) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The three real test videos, a missing one and a corrupt one, as a fine-tuning list, in
    shards of 2."""
    root = tmp_path_factory.mktemp("real")
    for v in VIDEOS:
        shutil.copy(DATA / v, root / v)
    (root / "corrupt.mp4").write_bytes(b"\x00not a video" * 50)
    lst = write_list(root / "list.txt", ["bikes.mp4 0", "missing.mp4 1", "carphone_distorted.mp4 2",
                                         "corrupt.mp4 3", "bigbuckbunny.mp4 4"])
    out = root / "shards"
    rc = write_shards.main(["--data-list", str(lst), "--data-root", str(root), "--kind", "finetune",
                            "--out", str(out), "--samples-per-shard", "2", "--workers", "1", "--no-progress"])
    return root, lst, out, rc


def test_writer_stores_bytes_and_probe_and_lists_what_failed(real):
    root, lst, out, rc = real
    assert rc == EXIT_SOME_FAILED
    man = json.loads((out / fmt.MANIFEST).read_text())
    assert man["complete"] and man["total"] == 3
    assert [(s["name"], s["count"]) for s in man["shards"]] == [
        ("shard-000000.tar", 1), ("shard-000001.tar", 1), ("shard-000002.tar", 1)]
    skipped = (out / write_shards.SKIPPED).read_text().splitlines()
    assert [s.split("\t")[0] for s in skipped] == ["missing.mp4", "corrupt.mp4"]
    assert skipped[0].split("\t")[1] == f"no such file: {root / 'missing.mp4'}"
    assert skipped[1].split("\t")[1] == "not a readable video (FFmpeg: Invalid data found when processing input)"
    with tarfile.open(out / "shard-000001.tar") as t:
        assert t.getnames() == ["000000002.json", "000000002.mp4"]
        assert t.extractfile("000000002.mp4").read() == (DATA / "carphone_distorted.mp4").read_bytes()
        meta = json.loads(t.extractfile("000000002.json").read())
    # tests/data/README.md: 176x144, 29.97 fps, 120 frames; with the packet index a reader would
    # demux: 1001 ticks of 1/30000 s a frame from 0, one keyframe
    assert meta == {"frames": 120, "height": 144, "width": 176, "fps": pytest.approx(30000 / 1001),
                    "folder": False, "start_idx": 0, "total_frames": -1, "path": "carphone_distorted.mp4",
                    "index": 2, "label": 2, "pts_runs": [[0, 1001, 120]], "keyframes": [0],
                    "index_by": ".".join(map(str, av.library_versions["libavformat"]))}


def test_an_interrupted_write_continues_and_ends_as_an_uninterrupted_one(real, tmp_path, monkeypatch):
    root, lst, whole, _ = real
    out = tmp_path / "out"
    argv = ["--data-list", str(lst), "--data-root", str(root), "--kind", "finetune", "--out", str(out),
            "--samples-per-shard", "2", "--workers", "1", "--no-progress"]
    real_make = write_shards.make_sample

    def dies_at_4(job):
        if job[0] == 4:
            raise KeyboardInterrupt
        return real_make(job)

    monkeypatch.setattr(write_shards, "make_sample", dies_at_4)
    with pytest.raises(KeyboardInterrupt):
        write_shards.main(argv)
    assert not json.loads((out / fmt.MANIFEST).read_text())["complete"]
    # what a kill leaves: the half shard under its temporary name only
    assert not (out / "shard-000002.tar").exists() and (out / "shard-000002.tar.tmp").exists()
    with pytest.raises(fmt.ShardError, match="not all written"):
        fmt.resolve(str(out))
    first = (out / "shard-000000.tar").stat().st_mtime_ns
    monkeypatch.setattr(write_shards, "make_sample", real_make)
    assert write_shards.main(argv) == EXIT_SOME_FAILED
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first  # kept, not rewritten
    assert not list(out.glob("*.tmp"))
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", write_shards.SKIPPED):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    with pytest.raises(UsageError, match=r"other settings \(samples_per_shard 2 -> 3\)"):
        write_shards.main(argv[:-5] + ["--samples-per-shard", "3", "--workers", "1", "--no-progress"])


def test_short_side_reencodes_keeping_frames_and_rate(real, tmp_path):
    root = real[0]
    lst = write_list(tmp_path / "l.txt", ["bikes.mp4 0 -1", "corrupt.mp4 0 -1", "bigbuckbunny.mp4 0 -1"])
    out = tmp_path / "s"
    assert write_shards.main(["--data-list", str(lst), "--data-root", str(root), "--kind", "pretrain", "--out",
                              str(out), "--short-side", "64", "--workers", "2", "--no-progress"]) == EXIT_SOME_FAILED
    # a corrupt input is named in the reader's words, as when it is stored unresized
    assert (out / write_shards.SKIPPED).read_text() == \
        "corrupt.mp4\tnot a readable video (FFmpeg: Invalid data found when processing input)\n"
    with tarfile.open(out / "shard-000000.tar") as t:
        metas = [json.loads(t.extractfile(n).read()) for n in t.getnames() if n.endswith(".json")]
    # 640x272 -> 150x64, 1280x720 -> 114x64 (even sides); the frame counts and 25 fps of the files
    assert [(m["width"], m["height"], m["frames"], m["fps"]) for m in metas] == [(150, 64, 250, 25.0),
                                                                                (114, 64, 132, 25.0)]


def test_ctrl_c_stops_the_workers_in_one_line_and_the_same_command_continues(tmp_path):
    """The real thing: SIGINT to the process group (Ctrl-C reaches the spawned workers too), once
    the first shard is whole and in the manifest."""
    import sys

    # 40 short videos: the run goes on 2.4 s after its first shard is in the manifest (4.0 s to it,
    # 6.5 s in all: the same command alone, idle 2-core AMD EPYC), time enough to poll every 20 ms
    lst = write_list(tmp_path / "l.txt", ["carphone_distorted.mp4 0 -1"] * 40)
    out = tmp_path / "s"
    cmd = [sys.executable, "-c", "from train.write_shards import cli; cli()", "--data-list", str(lst), "--data-root",
           str(DATA), "--kind", "pretrain", "--out", str(out), "--short-side", "32", "--samples-per-shard", "1",
           "--workers", "2", "--no-progress"]
    rc, err = interrupted_when(cmd, (out / fmt.MANIFEST).exists, "its first shard")
    assert rc == 130, err
    assert err == ("vmae-shards: stopped: interrupted (SIGINT); the shards written are whole and listed in the "
                   "manifest; the same command continues from them\n")
    done = json.loads((out / fmt.MANIFEST).read_text())
    assert not done["complete"] and 1 <= len(done["shards"]) < 40
    assert write_shards.main(cmd[3:-3] + ["--workers", "1", "--no-progress"]) == 0
    assert json.loads((out / fmt.MANIFEST).read_text())["complete"] and len(fmt.resolve(str(out)).urls) == 40


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("mode", ["pretrain", "finetune", "test"])
def test_a_shard_sample_is_the_file_sample_bit_for_bit(real, mode):
    root, lst, out, _ = real
    extra = {"auto_augment": "rand-m7-n4-mstd0.5-inc1"} if mode == "finetune" else {}
    if mode == "finetune":
        from train.augment import EraseSpec
        extra["erase"] = EraseSpec(probability=1.0, mode="pixel", max_count=1)
    ds = VideoDataset(read_list(lst, root, "finetune"), mode, 4, 3, 48, num_sample=1 if mode == "test" else 2,
                      seed=5, num_segments=2, num_crops=3, decoder="pyav", **extra)
    shards = fmt.resolve(str(out))
    seen = set()
    for epoch in ((0,) if mode == "finetune" else (0, 1)):  # RandAugment of 720p frames is slow
        for url in shards.urls:
            for sample in fmt.read_piece(url, 0, 1):
                got = load_sample(ds, sample, epoch)
                ref = ds[(epoch, got["index"])]
                assert ref["index"] == got["index"] and ref["label"] == got["label"]
                assert len(got["video"]) == len(ref["video"]) == (6 if mode == "test" else 2)
                for a, b in zip(got["video"], ref["video"]):
                    assert torch.equal(a, b)
                if mode == "finetune":
                    assert torch.equal(got["erase"], ref["erase"])
                seen.add(got["index"])
    assert seen == {0, 2, 4}


def test_pts_runs_round_trip_and_a_bad_stored_index_is_not_used():
    for pts in ([], [7], [0, 512, 1024, 1536, 3000, 3001, 5000, 5100], list(range(0, 300 * 1001, 1001))):
        runs = fmt.pack_pts(pts)
        assert fmt.unpack_pts(runs) == pts
    assert fmt.pack_pts(range(0, 300 * 1001, 1001)) == [[0, 1001, 300]]
    good = {"frames": 4, "pts_runs": [[0, 2, 4]], "keyframes": [0, 2], "index_by": fmt.demuxer_version()}
    assert fmt.stored_index(good) == ([0, 2, 4, 6], [0, 2])
    for bad in ({"frames": 5}, {"keyframes": []}, {"keyframes": [4]}, {"pts_runs": [[0, 0, 4]]},
                {"pts_runs": "x"}, {"index_by": "58.29.100"}):  # the last: another demuxer's
        assert fmt.stored_index({**good, **bad}) is None, bad
    assert fmt.stored_index({"frames": 4}) is None  # shards written before the index


def test_a_stored_index_skips_the_demux_and_gives_the_same_frames(real):
    """The reader given the sample's stored index reads no packet before decoding and returns the
    frames of the reader that demuxed the video to index it (the old path), for seeks too."""
    _, _, out, _ = real
    shards = fmt.resolve(str(out))
    samples = [s for u in shards.urls for s in fmt.read_piece(u, 0, 1)]
    assert len(samples) == 3

    class Container:  # the reader's container, counting the demux passes asked of it
        def __init__(self, c):
            self.c, self.demuxed = c, 0

        def __getattr__(self, name):
            return getattr(self.c, name)

        def demux(self, *a, **k):
            self.demuxed += 1
            return self.c.demux(*a, **k)

    class Counting(fmt._PyAVBytes):
        def _open(self):
            super()._open()
            self.container = Container(self.container)

    for sample in samples:
        meta = fmt.meta_of(sample)
        index = fmt.stored_index(meta)
        data = sample[fmt.video_member(sample)]
        with Counting(data) as old:
            assert index == (old.pts, old.keys) and old.container.demuxed == 1
            with Counting(data, index=index) as new:
                assert new.container.demuxed == 0 and len(new) == len(old) == meta["frames"]
                n = len(old)
                rng = np.random.default_rng(0)
                for idx in ([n - 1, 0], sorted(rng.choice(n, 5, replace=False).tolist()),
                            list(range(int(rng.integers(0, n - 8)), n, 4))[:16]):
                    assert torch.equal(new.get(idx), old.get(idx)), (meta["path"], idx)


def test_spec_forms_folder_brace_file_url_and_http(real):
    root, lst, out, _ = real
    names = [f"shard-{i:06d}.tar" for i in range(3)]
    assert fmt.resolve(str(out)).urls == tuple(str(out / n) for n in names)
    brace = fmt.resolve(f"{out}/shard-{{000000..000002}}.tar")
    assert brace.urls == tuple(f"{out}/{n}" for n in names) and brace.counts == (1, 1, 1)
    assert fmt.resolve(f"file://{out}/shard-{{000001..000002}}.tar").counts == (1, 1)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(out))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{srv.server_address[1]}/shard-{{000000..000002}}.tar"
            shards = fmt.resolve(url)
            got = [s["__key__"] for u in shards.urls for s in fmt.read_piece(u, 0, 1)]
            assert got == ["000000000", "000000002", "000000004"]
            assert (list(fmt.read_piece(shards.urls[1], 0, 1))[0]["mp4"]
                    == (DATA / "carphone_distorted.mp4").read_bytes())
        finally:
            srv.shutdown()


def test_an_object_store_through_a_pipe_url(real):
    # what `pipe:aws s3 cp s3://bucket/shard-{...}.tar -` does, with cat: the manifest is read
    # through the same command, its shard name replaced
    root, lst, out, _ = real
    shards = fmt.resolve(f"pipe:cat {out}/shard-{{000000..000002}}.tar")
    assert shards.urls[2] == f"pipe:cat {out}/shard-000002.tar" and shards.counts == (1, 1, 1)
    assert [s["__key__"] for u in shards.urls for s in fmt.read_piece(u, 0, 1)] == ["000000000", "000000002",
                                                                                    "000000004"]


def test_frame_folders_are_stored_as_their_images_and_read_the_same(tmp_path):
    import av
    from PIL import Image

    folder = tmp_path / "SomethingV2" / "clip"  # a rawframes folder, frames named from 1
    folder.mkdir(parents=True)
    with av.open(str(DATA / "carphone_distorted.mp4")) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i == 12:
                break
            frame.to_image().save(folder / f"img_{i + 1:05}.jpg", quality=90)
    lst = write_list(tmp_path / "raw.txt", ["SomethingV2/clip 12 3"])  # the official 'folder total label'
    out = tmp_path / "s"
    assert write_shards.main(["--data-list", str(lst), "--data-root", str(tmp_path), "--kind", "finetune",
                              "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    with tarfile.open(out / "shard-000000.tar") as t:
        names = t.getnames()
        assert t.extractfile("000000000.000011.jpg").read() == (folder / "img_00012.jpg").read_bytes()
    assert len(names) == 13 and "000000000.json" in names
    for mode in ("finetune", "test"):
        ds = VideoDataset(read_list(lst, tmp_path, "finetune"), mode, 4, 2, 32, seed=1, num_segments=2,
                          decoder="pyav")
        (sample,) = list(fmt.read_piece(str(out / "shard-000000.tar"), 0, 1))
        got, ref = load_sample(ds, sample, 0), ds[(0, 0)]
        assert got["label"] == ref["label"] == 3
        assert all(torch.equal(a, b) for a, b in zip(got["video"], ref["video"]))
    with Image.open(folder / "img_00001.jpg") as im:
        assert json.loads(sample["json"])["width"] == im.width


def test_a_missing_shard_is_one_line_at_the_start(real, tmp_path):
    root, lst, out, _ = real
    broken = tmp_path / "b"
    shutil.copytree(out, broken)
    (broken / "shard-000001.tar").unlink()
    with pytest.raises(fmt.ShardError, match=r"shard .*shard-000001.tar is missing$"):
        fmt.resolve(str(broken))
    with pytest.raises(fmt.ShardError, match=r"shard-000008.tar is not in the manifest \(2 of 2 shards are not\)"):
        fmt.resolve(f"{out}/shard-{{000008..000009}}.tar")
    with pytest.raises(fmt.ShardError, match="cannot read the shard manifest"):
        fmt.resolve(f"{tmp_path}/nothing-{{0..1}}.tar")
    with pytest.raises(fmt.ShardError, match=r"no such folder \(a folder, or a pattern of '.tar' shards\)$"):
        fmt.resolve(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("counts,world,workers", [((3, 5, 2, 4), 2, 2), ((7,), 3, 2), ((1, 1, 1), 2, 3),
                                                  ((4, 4), 4, 1)])
def test_an_epoch_visits_every_sample_once_padded_as_distributed_sampler(counts, world, workers):
    total = sum(counts)
    for epoch in (0, 1):
        lay = fmt.EpochLayout(counts, world, seed=3, epoch=epoch)
        got = []
        for rank in range(world):
            for w in range(workers):
                lo, hi = lay.part(rank, w, workers)
                got += [(p.shard, j) for p in lay.pieces(lo, hi) for j in range(p.start, p.stop)]
        ref = torch.utils.data.DistributedSampler(range(total), num_replicas=world, rank=0)
        assert len(got) == ref.total_size == lay.per_rank * world  # the same padding count
        order = [(s, j) for s in lay.order for j in range(counts[s])]
        assert sorted(got) == sorted(order + order[:ref.total_size - total])  # repeats from the start


def test_buffer_order_is_a_bounded_deterministic_permutation():
    a = fmt.buffer_order(500, 16, np.random.default_rng(1))
    assert sorted(a.tolist()) == list(range(500))
    assert all(a[p] <= p + 15 for p in range(500))
    assert np.array_equal(a, fmt.buffer_order(500, 16, np.random.default_rng(1)))
    assert not np.array_equal(a, np.arange(500))
    assert np.array_equal(fmt.buffer_order(9, 1, np.random.default_rng(0)), np.arange(9))


def test_a_part_resumes_at_a_position_with_exactly_the_samples_left(real, tmp_path):
    root, lst, out, _ = real
    shards = fmt.resolve(str(out))
    lay = fmt.EpochLayout(shards.counts, 1, seed=0, epoch=0)
    part = fmt.PartStream(shards, lay, 0, 0, 1, buffer=3)
    full = [(p, s["__key__"]) for p, s in part.iter_from(0)]
    assert sorted(k for _, k in full) == ["000000000", "000000002", "000000004"]
    for at in range(4):
        assert [(p, s["__key__"]) for p, s in part.iter_from(at)] == full[at:]


# ----------------------------------------------------------------------------- faults
def test_a_truncated_shard_and_a_corrupt_member_are_skipped_and_counted(real, tmp_path, recwarn):
    root, lst, out, _ = real
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    t = bad / "shard-000002.tar"  # bigbuckbunny, cut in the middle of its video
    t.write_bytes(t.read_bytes()[:300_000])
    with tarfile.open(bad / "shard-000000.tar") as tf:  # bikes: its video bytes replaced
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    members["000000000.mp4"] = b"\x00garbage" * 100
    with tarfile.open(bad / "shard-000000.tar", "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    man = json.loads((bad / fmt.MANIFEST).read_text())
    ds = VideoDataset([], "pretrain", 4, 2, 32, decoder="pyav")
    stream = ShardStream(fmt.resolve(str(bad)), ds, world=1, rank=0, workers=1, seed=0, buffer=1)
    batches = SkipAware(stream, 1, write_shards_collate())
    it = iter(batches)
    got = [next(it) for _ in range(2)]  # two epochs' worth of good samples: carphone only
    assert [b["keys"] for b in got] == [["000000002"], ["000000002"]]
    # 2 a epoch: one corrupt, one truncated; each named by its key or shard#index
    lost = f"{bad / 'shard-000002.tar'}#0"
    assert sorted(x for b in got for x in b["skipped"]) == sorted(["000000000", lost] * 2)
    msgs = [str(w.message) for w in recwarn]
    assert any("shard-000002.tar: 1 of samples 0..0 not read" in m for m in msgs), msgs
    # in words, as for a file: not PyAV's "[Errno 1094995529] Invalid data found ..."
    assert any(m.startswith("skipping shard sample 000000000") and
               m.endswith(": not a readable video (FFmpeg: Invalid data found when processing input)") for m in msgs), msgs
    assert man["total"] == 3


def write_shards_collate():
    from train.data import Collate
    return Collate(pin_memory=False)


def test_position_state_and_resume_on_another_layout():
    pos = ShardPosition(world=2, workers=2, seed=0)
    pos.take({"position": (0, 0, 3)})
    pos.take({"position": (1, 0, 2)})
    pos.take({"position": (0, 1, 1)})
    s = pos.state_dict()
    assert s == {"world": 2, "workers": 2, "seed": 0, "first": 1, "roles": {"0": [1, 1], "1": [0, 2]}}
    start, why = resume_start([s, s], 1, 2, 2, 0)
    assert start == {"first": 1, "roles": {0: (1, 1), 1: (0, 2)}} and why == ""
    start, why = resume_start([s, s], 0, 4, 2, 0)
    assert start == {"first": 0, "roles": {0: (0, 0), 1: (0, 0)}}
    assert "saved with world 2 x 2 workers" in why and "epoch 0 restarts from its start" in why
