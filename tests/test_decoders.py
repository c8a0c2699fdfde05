"""Every decoder returns the same frames, numbered the same way, as a plain decode of the whole
file; PyAV seeks instead of decoding everything; ``auto`` and the fallback line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (the `test` extra) decodes the reference frames")

from vmae_fast.video import decoders as decode  # noqa: E402
from train.make_synthetic import write_kinetics_like  # noqa: E402

DATA = Path(__file__).parent / "data"
REAL = sorted(DATA.glob("*.mp4"))


def decoder_param(name):
    why = decode.why_unavailable(name)
    return pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=f"{name}: {why}"), id=name)


DECODER_PARAMS = [decoder_param(n) for n in decode.DECODERS]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[Path]:
    """Kinetics-like H.264 (B-frames, CABAC): libx264's default GOP, and a 12-frame GOP (many
    keyframes, so the seeking paths run), landscape 25 fps and portrait 30 fps."""
    d = tmp_path_factory.mktemp("kin")
    a, b = d / "default_gop_340x256_25fps.mp4", d / "gop12_256x320_30fps.mp4"
    write_kinetics_like(a, seconds=2, fps=25, width=340, height=256, seed=1, preset="veryfast")
    write_kinetics_like(b, seconds=2, fps=30, width=256, height=320, seed=2, preset="veryfast", gop=12)
    return [a, b]


_REFS: dict[Path, np.ndarray] = {}


def full_decode(path: Path) -> np.ndarray:
    """The reference: every frame in presentation order, decoded from the start (once per file)."""
    if path not in _REFS:
        with av.open(str(path)) as c:
            frames = list(c.decode(video=0))  # display order already; pts may be None (raw)
            pts = [f.pts for f in frames]
            assert None in pts or pts == sorted(pts)
            _REFS[path] = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    return _REFS[path]


def index_sets(n: int, everything: bool) -> list[list[int]]:
    """Training clips (16 frames 4 apart), the ends, repeats, out of order; every frame for the
    small files."""
    rng = np.random.default_rng(0)
    clips = [list(range(s, min(s + 64, n), 4)) for s in rng.integers(0, n, 2)]
    sets = [[n - 1], [n - 1, 0, 7, 7, 7], sorted(rng.choice(n, 6, replace=False).tolist()), *clips]
    return [list(range(n)), *sets] if everything else sets


def test_real_test_files_are_small_and_real():
    assert {p.name for p in REAL} == {"bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4"}
    assert sum(p.stat().st_size for p in REAL) < 5 * 2**20


@pytest.mark.parametrize("decoder", DECODER_PARAMS)
def test_decoder_returns_the_reference_frames(decoder, synthetic):
    for path in [*REAL, *synthetic]:
        ref = full_decode(path)
        with decode.open_video(path, decoder) as r:
            assert r.name == decoder
            assert len(r) == len(ref), path.name
            for idx in index_sets(len(ref), everything=ref[0].size < 400 * 400 * 3):
                out = r.get(idx)  # one reader, many requests: seeking back and forth
                assert out.dtype == torch.uint8 and tuple(out.shape) == (len(idx), *ref.shape[1:])
                assert np.array_equal(out.numpy(), ref[idx]), (path.name, decoder, idx[:6])


def test_pyav_seeks_to_the_keyframe_and_skips_unneeded_frames(synthetic):
    path = synthetic[1]  # keyframe every 12 frames, 60 frames
    counted = []

    class Counting(decode.PyAVReader):
        def _frames(self, packets, *args):
            for f in super()._frames(packets, *args):
                counted.append(f.pts)
                yield f

    with Counting(str(path)) as r:
        assert r.keys[:3] == [0, 12, 24] and len(r) == 60
        out = r.get([40, 44])
        # decoded from keyframe 36 on, not from 0; and past the last needed frame only by the
        # decoder's reorder delay
        first = min(r.index_of[p] for p in counted)
        assert first >= 36 and len(counted) <= 12, sorted(r.index_of[p] for p in counted)
        n_skip = len(counted)
        counted.clear()
        r.skip_nonref = False
        assert torch.equal(r.get([40, 44]), out)
        assert len(counted) > n_skip  # non-reference B-frames were skipped, pixels unchanged
        counted.clear()
        r.skip_nonref = True
        r.get([2, 50])  # two runs: a seek between them, not a decode through 12..47
        assert not any(14 <= r.index_of[p] < 48 for p in counted), sorted(r.index_of[p] for p in counted)


def test_pyav_reads_no_packet_after_the_last_needed_one(synthetic):
    """The decoder is drained once the last needed packet is in: no packet after it is decoded
    (a plain decode sends 1-3 more before the reorder delay lets the frame out), same pixels."""
    path = synthetic[0]  # one keyframe, B-frames: frames come out 1-3 packets late
    sent = []

    class Recording(decode.PyAVReader):
        def _frames(self, packets, *args):
            def recorded():
                for p in packets:
                    sent.append(p.pts)
                    yield p
            return super()._frames(recorded(), *args)

    ref = full_decode(path)
    with Recording(str(path)) as r:
        for idx in ([20, 24, 28], [0], [len(r) - 1], [5, 5, 3]):
            sent.clear()
            assert np.array_equal(r.get(idx).numpy(), ref[idx]), idx
            last = max(sent.index(r.pts[i]) for i in idx)  # the last needed packet, in decode order
            assert len(sent) == last + 1, (idx, [r.index_of.get(p) for p in sent[last:]])


def test_auto_picks_the_first_that_loads_and_says_why_once(monkeypatch, capsys):
    monkeypatch.setattr(decode, "_announced", set())
    monkeypatch.setattr(decode, "_status", {"torchcodec": "FFmpeg libraries missing (test)", "decord": None,
                                            "pyav": None})
    monkeypatch.setattr(decode, "AUTO_ORDER", ("torchcodec", "pyav", "decord"))
    assert decode.resolve_decoder("auto") == "pyav"
    assert decode.resolve_decoder("auto") == "pyav"
    assert decode.resolve_decoder("torchcodec") == "pyav"  # named but missing: falls back
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchcodec unavailable: FFmpeg libraries missing (test)" in err[0], err
    with pytest.raises(RuntimeError, match="torchcodec: FFmpeg libraries missing"):
        decode.resolve_decoder("torchcodec", strict=True)
    with pytest.raises(ValueError, match="unknown decoder"):
        decode.resolve_decoder("opencv")


def test_torchcodec_loads_or_says_it_needs_ffmpeg():
    why = decode.why_unavailable("torchcodec")
    if why is None:  # FFmpeg's shared libraries are here: it decodes (the test above checks how)
        assert "torchcodec" in decode.available_decoders()
    else:
        assert "torchcodec" not in decode.available_decoders()
        assert "FFmpeg" in why or "not installed" in why or "does not load against torch" in why, why
        assert "\n" not in why


def test_a_torchcodec_built_for_another_torch_is_one_line_and_a_fallback(monkeypatch, capsys):
    """pip's resolver may pair torch 2.6 with a torchcodec built for a newer torch (their
    metadata names no torch): its import fails on an undefined symbol. That is a reason in one
    line and the next decoder, never an error."""
    import ctypes.util
    import sys

    class Broken:  # a finder that fails the import as such a build does
        def find_spec(self, name, path=None, target=None):
            if name == "torchcodec.decoders":
                raise OSError("/x/torchcodec/libtorchcodec_core7.so: undefined symbol: _ZN3c1010TensorImpl\nmore")

    pytest.importorskip("av", reason="PyAV is the decoder auto falls back to here")
    monkeypatch.delitem(sys.modules, "torchcodec.decoders", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so")  # FFmpeg is there
    monkeypatch.setattr(decode, "_status", {})
    monkeypatch.setattr(decode, "_announced", set())
    why = decode.why_unavailable("torchcodec")
    assert why.startswith("torchcodec ") and f"does not load against torch {torch.__version__}" in why
    assert "undefined symbol" in why and "\n" not in why
    assert decode.resolve_decoder("torchcodec") == decode.resolve_decoder("auto", quiet=True) != "torchcodec"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("decoder torchcodec unavailable: torchcodec "), err


def test_missing_and_corrupt_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode.open_video(tmp_path / "nope.mp4", "pyav")
    bad, empty, cut = tmp_path / "bad.mp4", tmp_path / "empty.mp4", tmp_path / "cut.mp4"
    bad.write_bytes(b"\x00not a video" * 50)
    empty.write_bytes(b"")
    cut.write_bytes((DATA / "carphone_distorted.mp4").read_bytes()[:2000])  # its index (moov) is at the end
    # every decoder's "cannot open" is one type, in words; the library's own error is its cause
    for name in decode.available_decoders():
        for path in (bad, empty, cut):
            with pytest.raises(decode.UnreadableVideo) as err:
                decode.open_video(path, name)
            assert err.value.path == str(path) and str(err.value).startswith("not a readable video ("), name
            assert "Errno" not in str(err.value) and len(str(err.value)) < 140, str(err.value)
    with pytest.raises(decode.UnreadableVideo) as err:
        decode.open_video(empty, "pyav")
    assert str(err.value) == "not a readable video (empty file)" and err.value.__cause__ is None
    for path in (bad, cut):  # FFmpeg's own reason, from its log (not "[Errno 1094995529] Invalid data ...")
        with pytest.raises(decode.UnreadableVideo) as err:
            decode.open_video(path, "pyav")
        assert str(err.value) == "not a readable video (FFmpeg: moov atom not found)"
        assert isinstance(err.value.__cause__, av.error.InvalidDataError)


def test_an_empty_frame_folder_is_not_a_readable_video(tmp_path):
    from vmae_fast.video import FrameFolder

    (tmp_path / "notes.txt").write_text("no frames here")
    with pytest.raises(decode.UnreadableVideo) as err:
        FrameFolder(str(tmp_path))
    assert str(err.value) == "not a readable video (a folder without frames: no .jpg or .png files)"
    assert err.value.path == str(tmp_path)


def test_pyav_reads_a_raw_stream_without_timestamps(tmp_path):
    """A raw .h264 stream has no timestamps and cannot seek: the reader counts and decodes in
    order (decord and torchcodec refuse such files)."""
    from train.make_synthetic import render_textured

    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.options = 96, 64, "yuv420p", {"preset": "veryfast"}
        for f in render_textured(20, 64, 96, np.random.default_rng(0)):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    ref = full_decode(path)
    with decode.PyAVReader(str(path)) as r:
        assert r.pts is None and len(r) == len(ref) == 20
        assert np.array_equal(r.get([19, 0, 5, 5]).numpy(), ref[[19, 0, 5, 5]])


def test_opening_a_good_video_logs_no_ffmpeg_error():
    """PyAV pins FFmpeg's last error log on its next exception, whatever raised it: an open that
    logs one (an invalid probe option did, per stream) would make a later corrupt file's reason
    "Error setting option skip_frame ..." instead of its own."""
    import av.logging

    from vmae_fast.video.shards import open_video_bytes

    decode.quiet_pyav()
    before = av.logging.get_last_error()[0]
    for name in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_distorted.mp4"):
        with decode.open_video(DATA / name, "pyav") as r:
            assert r.get([0, len(r) - 1]).shape[0] == 2
        r = open_video_bytes((DATA / name).read_bytes(), "pyav")
        assert r.get([1]).shape[0] == 1
        r.close()
    assert av.logging.get_last_error()[0] == before
    with pytest.raises(decode.UnreadableVideo) as err:
        open_video_bytes(b"\x00garbage" * 100, "pyav")
    assert str(err.value) == "not a readable video (FFmpeg: Invalid data found when processing input)"
    with pytest.raises(decode.UnreadableVideo, match=r"^not a readable video \(empty member\)$"):
        open_video_bytes(b"", "pyav")
