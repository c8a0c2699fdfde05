"""Video decoders behind one interface: random access to the frames of one file.

    reader = open_video(path, decoder="auto")   # "auto" | "torchcodec" | "decord" | "pyav"
    len(reader)                                  # frame count (presentation order)
    reader.get([0, 4, 8, 8])                     # (4, H, W, 3) uint8 torch.Tensor, in the order asked

Every decoder numbers frames the same way (presentation order, every frame the container
indexes) and returns the same RGB pixels for them: tests/test_decoders.py checks this bit for bit
on real and synthetic H.264. They differ only in cost:

* ``pyav`` (our reader on PyAV): indexes the packets once (demux, no decoding), seeks to the
  keyframe at or before each needed frame and decodes forward, never the whole file; packets of
  frames that are not needed are decoded with ``skip_frame=NONREF``, so non-reference frames
  (most B-frames) between the needed ones are not decoded at all. The needed frames and every
  reference frame are decoded in full, so the output is unchanged. Once the last needed packet
  is sent the decoder is drained instead of fed the packets after it, and the frames go to RGB
  through one swscale context per reader (``to_ndarray`` would make one per frame).
* ``torchcodec`` (``seek_mode="exact"``): needs FFmpeg's shared libraries (4 to 8) installed on
  the system (``.ci/install-system-deps`` installs Debian's); without them it does not load.
* ``decord``: the official VideoMAE V2 decoder.

``auto`` takes the first of ``AUTO_ORDER`` that loads here: the order ``python -m bench.loader``
measured (pyav fastest on every file we have, then torchcodec, then decord). A decoder asked
for by name that does not load (torchcodec without FFmpeg's libraries, say) costs one line on
stderr, saying why and which decoder is used instead (``strict=True`` raises instead).
"""
from __future__ import annotations

import bisect
import functools
import os
import sys
from typing import Callable, Sequence

import numpy as np
import torch

DECODERS = ("torchcodec", "decord", "pyav")
AUTO_ORDER = ("pyav", "torchcodec", "decord")

_status: dict[str, str | None] = {}  # name -> None when it loads, else why not
_announced: set[str] = set()


# ----------------------------------------------------------------------------- availability
def _probe(name: str) -> str | None:
    if name == "pyav":
        try:
            import av  # noqa: F401  (importable is enough)
        except Exception as exc:
            return f"PyAV is not installed ({type(exc).__name__}: {exc}); `pip install av`"
        return None
    if name == "decord":
        try:
            import decord  # noqa: F401  (importable is enough)
        except Exception as exc:
            return f"decord is not installed ({type(exc).__name__}); `pip install decord` (Linux x86_64)"
        return None
    if name == "torchcodec":
        try:
            from torchcodec.decoders import VideoDecoder  # older releases load FFmpeg here
        except ImportError as exc:
            if "libtorchcodec" not in str(exc):
                return "torchcodec is not installed; `pip install torchcodec` (needs FFmpeg 4-8 shared libraries)"
            return _torchcodec_load_error(exc)
        except Exception as exc:
            return _torchcodec_load_error(exc)
        # Newer releases load FFmpeg at the first decoder: open a few garbage bytes. A decoder
        # that loaded fails on the data instead ("Invalid data ..."), one that did not says so.
        try:
            VideoDecoder(torch.zeros(64, dtype=torch.uint8))
        except Exception as exc:
            if "libtorchcodec" in str(exc):
                return _torchcodec_load_error(exc)
        return None
    raise ValueError(f"unknown decoder {name!r}; choose one of auto, {', '.join(DECODERS)}")


def _torchcodec_load_error(exc: BaseException) -> str:
    import ctypes.util
    from importlib import metadata

    try:
        ver = metadata.version("torchcodec")
    except Exception:
        ver = "?"
    missing = [lib for lib in ("avutil", "avcodec", "avformat", "avfilter", "avdevice", "swscale", "swresample")
               if ctypes.util.find_library(lib) is None]
    if missing:
        return (f"torchcodec {ver} needs FFmpeg's shared libraries (FFmpeg 4-8) and lib{', lib'.join(missing)} "
                "are not installed: run .ci/install-system-deps (Debian/Ubuntu) or install FFmpeg")
    return (f"torchcodec {ver} does not load against torch {torch.__version__} (their versions are tied: "
            f"torch 2.6 needs torchcodec 0.2, see torchcodec's compatibility table): "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}")


def why_unavailable(name: str) -> str | None:
    """``None`` when decoder ``name`` loads here, else the reason (one line)."""
    if name not in _status:
        _status[name] = _probe(name)
    return _status[name]


def available_decoders() -> list[str]:
    return [n for n in DECODERS if why_unavailable(n) is None]


def resolve_decoder(name: str = "auto", *, strict: bool = False, quiet: bool = False) -> str:
    """The decoder ``name`` stands for. ``auto``: the first of ``AUTO_ORDER`` that loads. A named
    decoder that does not load: with ``strict``, ``RuntimeError`` with the reason; else one line
    on stderr (the reason, and the decoder used instead; once per process) and ``auto``'s pick."""
    if name != "auto":
        if name not in DECODERS:
            raise ValueError(f"unknown decoder {name!r}; choose one of auto, {', '.join(DECODERS)}")
        why = why_unavailable(name)
        if why is None:
            return name
        if strict:
            raise RuntimeError(f"decoder {name}: {why}")
        fallback = resolve_decoder("auto", quiet=True)
        _say(name, f"decoder {name} unavailable: {why}; using {fallback}", quiet)
        return fallback
    for cand in AUTO_ORDER:
        if why_unavailable(cand) is None:
            return cand
        _say(cand, f"decoder {cand} unavailable: {why_unavailable(cand)}; trying the next", quiet)
    raise RuntimeError("no video decoder loads: install PyAV (`pip install av`), decord or torchcodec")


def _say(key: str, line: str, quiet: bool) -> None:
    if not quiet and key not in _announced:
        _announced.add(key)
        print(line, file=sys.stderr, flush=True)


def add_decoder_arg(parser) -> None:
    """``--decoder`` of a command line that reads videos (pass ``args.decoder`` on)."""
    parser.add_argument("--decoder", default="auto", choices=("auto", *DECODERS),
                        help="video decoder; auto: the fastest that loads here (torchcodec needs "
                             "FFmpeg's shared libraries)")


_av_quiet = False


def quiet_pyav() -> None:
    """FFmpeg's own log lines (PyAV prints them to stderr from C: "moov atom not found", "Invalid
    data found" ...) kept off the console: a file that fails is said once, by its caller.
    Once per process, and only when PyAV's log level is unset (a level the user set is kept).
    decord and torchcodec have no such switch; fd 2 is left alone."""
    global _av_quiet
    if _av_quiet:
        return
    _av_quiet = True
    try:
        import av.logging

        if av.logging.get_level() is None:
            av.logging.set_level(av.logging.PANIC)
    except Exception:  # no PyAV, or one without the switch
        pass


# ----------------------------------------------------------------------------- readers
class VideoReader:
    """Base: ``len(reader)`` frames; ``reader.get(indices)`` -> ``(len(indices), H, W, 3)`` uint8."""

    name = "?"

    def __len__(self) -> int:
        return self.n

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, indices: Sequence[int]) -> list[int]:
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < self.n]
        if bad:
            raise IndexError(f"frame indices {bad[:4]} out of range for {self.n} frames")
        return idx


class DecordReader(VideoReader):
    name = "decord"

    def __init__(self, path: str, threads: int = 1):
        import decord

        decord.bridge.set_bridge("native")
        self.vr = decord.VideoReader(path, num_threads=threads, ctx=decord.cpu(0))
        self.n = len(self.vr)

    def get(self, indices):
        return torch.from_numpy(self.vr.get_batch(self._check(indices)).asnumpy())

    def close(self):
        self.vr = None


class TorchCodecReader(VideoReader):
    name = "torchcodec"

    def __init__(self, path: str, threads: int = 1):
        from torchcodec.decoders import VideoDecoder

        # "exact": the frame index comes from a scan of the whole file, as decord's and ours do,
        # so every decoder numbers the same frames (approximate mode trusts the header's rate)
        self.dec = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=threads,
                                dimension_order="NHWC", device="cpu")
        self.n = len(self.dec)

    def get(self, indices):
        return self.dec.get_frames_at(self._check(indices)).data

    def close(self):
        self.dec = None


class PyAVReader(VideoReader):
    """Seek to the keyframe at or before each run of needed frames and decode forward from it.

    The index (every frame's pts, and which are keyframes) comes from demuxing the file once,
    without decoding: 2.2-2.5 ms for a 10 s clip, against 0.6-0.7 ms per decoded frame (PyAV 18.1,
    the 2-core Xeon of ``bench/results/loader-*.json``, ``bench.loader``'s generated 10 s 320p
    H.264 clips, median of 15 opens).
    """

    name = "pyav"
    open_options: dict = {}  # more keywords of av.open (a reader of bytes in memory sets its buffer)

    def __init__(self, path: str, threads: int = 1, skip_nonref: bool = True,
                 index: tuple[list[int], list[int]] | None = None):
        """``index``: ``(pts, keys)`` as a reader of the same bytes found them (``self.pts``,
        ``self.keys``; a shard sample stores them): the demux pass is then skipped."""
        self.path, self.threads, self.container = path, threads, None
        self._reformatter = None
        self._open()
        self.skip_nonref = skip_nonref and self._can_skip()
        pts, keys = index if index is not None else self._demux_index()
        if pts is None:
            self.pts = None
            self.n = sum(1 for p in self._packets_from_start() if p.size)
        else:
            self.pts = list(pts)
            self.index_of = {p: i for i, p in enumerate(self.pts)}
            self.keys, self.n = list(keys), len(self.pts)

    def _demux_index(self) -> tuple[list[int] | None, list[int] | None]:
        """``(pts, keys)`` from one pass over the packets: every frame's pts in order, and the
        indices of the keyframes; ``(None, None)`` for a stream without timestamps (raw streams:
        decoded in order, no seeking)."""
        pts, key_pts = [], []
        for pkt in self.container.demux(self.stream):
            if pkt.size == 0:  # the flush packet at the end
                continue
            if pkt.pts is None:
                return None, None
            pts.append(pkt.pts)
            if pkt.is_keyframe:
                key_pts.append(pkt.pts)
        pts.sort()
        at = {p: i for i, p in enumerate(pts)}
        return pts, sorted(at[k] for k in key_pts) or [0]

    def _open(self) -> None:
        import av

        if self.container is not None:
            self.container.close()
        # Opening probes the streams (avformat_find_stream_info), which by default decodes frames
        # until it has seen enough: 9.8 CPU-ms for tests/data/bigbuckbunny.mp4 (0.74 for bikes.mp4),
        # as much as decoding a dozen frames. Probing with skip_frame=all (FFmpeg's own name; PyAV's
        # "NONKEY" is "nokey" there, which still decodes) stops after the container's header: 0.98
        # (0.47) CPU-ms (median of 20 opens, 2-vCPU AMD EPYC, PyAV 18.1). The decoder below is a
        # fresh one and finds the pixel format in the stream itself (frames identical:
        # tests/test_decoders.py). An invalid value would be faster still (the probe's decoder fails
        # to open) but logs an FFmpeg error per stream that PyAV then pins on the next, unrelated
        # exception: a corrupt file's reason would read "Error setting option skip_frame".
        self.container = av.open(self.path, stream_options=[{"skip_frame": "all"}] * 8, **self.open_options)
        try:
            self.stream = self.container.streams.video[0]
        except IndexError:
            self.container.close()
            raise UnreadableVideo(self.path, "no video stream") from None
        ctx = self.stream.codec_context
        ctx.thread_count = self.threads
        if self.threads == 1:
            ctx.thread_type = "NONE"  # a frame-threaded decoder would apply skip_frame late

    def _can_skip(self) -> bool:
        try:
            self.stream.codec_context.skip_frame = "DEFAULT"
            return self.stream.codec_context.thread_count == 1
        except Exception:  # an old PyAV without the property
            return False

    def _packets_from_start(self):
        self._open()  # (raw streams cannot seek: read them again from the start)
        return self.container.demux(self.stream)

    def get(self, indices):
        idx = self._check(indices)
        if not idx:
            raise IndexError("no frame indices")
        frames = self._decode_sorted(sorted(set(idx)))
        first = frames[idx[0]]
        out = np.empty((len(idx), *first.shape), np.uint8)
        for k, i in enumerate(idx):  # repeats (padded short videos) are copies, not re-decodes
            out[k] = frames[i]
        return torch.from_numpy(out)

    def _decode_sorted(self, need: list[int]) -> dict[int, np.ndarray]:
        got: dict[int, np.ndarray] = {}
        if self.pts is None:  # timestamp-less stream: count frames from the start
            wanted = set(need)
            for k, frame in enumerate(self._frames(self._packets_from_start(), None)):
                if k in wanted:
                    got[k] = self._rgb(frame)
                if k >= need[-1]:
                    break
            return self._complete(got, need)
        want = {self.pts[i] for i in need}
        pos = 0  # need[pos]: the next frame still to get
        while pos < len(need):
            # the keyframe at or before the next needed frame (PyAV flushes the decoder on seek)
            key = self.keys[bisect.bisect_right(self.keys, need[pos]) - 1]
            self.container.seek(self.pts[key], stream=self.stream, backward=True, any_frame=False)
            reseek = False
            unsent = {self.pts[i] for i in need[pos:] if i not in got}
            for frame in self._frames(self.container.demux(self.stream), want, unsent):
                i = self.index_of.get(frame.pts)
                if i is None:
                    continue
                if frame.pts in want and i not in got:
                    got[i] = self._rgb(frame)
                while pos < len(need) and need[pos] in got:
                    pos += 1
                if pos == len(need) or i > need[pos]:  # done, or a needed frame never came out
                    break
                # Decode forward unless a keyframe lies beyond the next frame and at or before the
                # next needed one: then seeking there skips the frames in between.
                if self.keys[bisect.bisect_right(self.keys, need[pos]) - 1] > i + 1:
                    reseek = True
                    break
            if not reseek:
                break
        if self.skip_nonref:
            self.stream.codec_context.skip_frame = "DEFAULT"
        return self._complete(got, need)

    def _rgb(self, frame) -> np.ndarray:
        """``frame.to_ndarray(format="rgb24")``, the same pixels, through one swscale context
        per reader on one thread: ``to_ndarray`` makes a new context for every frame, and a
        context's default (threads=0: one per core) starts its threads each time. Once warm, 0.10
        against 0.056 CPU-ms a frame (``time.process_time`` over the first 60 frames of
        tests/data/bikes.mp4, 640x272, PyAV 18.1, 2-vCPU AMD EPYC); equal bit for bit:
        tests/test_decoders.py."""
        if self._reformatter is None:
            from av.video.reformatter import VideoReformatter

            reformat = VideoReformatter().reformat
            self._reformatter = functools.partial(reformat, format="rgb24", threads=1)
            try:
                return self._reformatter(frame).to_ndarray()
            except TypeError:  # a PyAV before the threads keyword (< 13): decided once, not per frame
                self._reformatter = functools.partial(reformat, format="rgb24")
        return self._reformatter(frame).to_ndarray()

    def _frames(self, packets, want: set | None, unsent: set | None = None):
        """Decoded frames of ``packets``; the packets of frames not in ``want`` are decoded with
        ``skip_frame=NONREF`` (a non-reference frame nothing needs is not decoded at all).
        ``unsent``: pts of the needed frames whose packets are still to come (emptied here); once
        the last of them is sent the decoder is drained and no further packet is read: the frames
        it still holds back for reordering come out without decoding the 1-3 packets after them
        (a decoded frame does not depend on later packets, so its pixels are the same)."""
        ctx = self.stream.codec_context
        skip = self.skip_nonref and want is not None
        for pkt in packets:
            if skip:
                ctx.skip_frame = "DEFAULT" if (pkt.pts in want or pkt.pts is None) else "NONREF"
            yield from ctx.decode(pkt)
            if unsent and pkt.pts in unsent:
                unsent.discard(pkt.pts)
                if not unsent:
                    yield from ctx.decode(None)  # drain (the next seek resets the decoder)
                    return

    def _complete(self, got, need):
        missing = [i for i in need if i not in got]
        if missing:
            raise RuntimeError(f"frames {missing[:4]} could not be decoded (of {self.n} indexed)")
        return got

    def close(self):
        if self.container is not None:
            self.container.close()
            self.container = None


_READERS = {"decord": DecordReader, "torchcodec": TorchCodecReader, "pyav": PyAVReader}


class UnreadableVideo(ValueError):
    """A file no video could be read from: ``not a readable video (FFmpeg: moov atom not
    found)``, FFmpeg's reason in a few words (``reason``), instead of the decoder library's raw
    text (``[Errno 1094995529] Invalid data found when processing input: '...'; last error log:
    [mov,mp4,m4a,3gp,3g2,mj2] moov atom not found``). The message leaves the file to ``path``:
    every line that reports it (the tools' ``skipping VIDEO: ...``, the loader's) names it first."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"not a readable video ({reason})")


def _short_reason(exc: BaseException) -> str:
    """The decoder's reason in a few words: FFmpeg's last log line when PyAV kept it (the
    specific one: ``moov atom not found``), else its error text (``Invalid data found when
    processing input``), else the first line of the message, cut at 100 characters."""
    log = getattr(exc, "log", None)  # PyAV: (level, component, message) of FFmpeg's last error
    if isinstance(log, tuple) and len(log) == 3 and str(log[2]).strip():
        return f"FFmpeg: {str(log[2]).strip()}"
    if getattr(exc, "strerror", None):
        return f"FFmpeg: {exc.strerror}"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first if len(first) <= 100 else first[:99] + "\u2026"


def failure_reason(exc: BaseException) -> str:
    """Why a video was skipped, for the line that names it: in words for the expected failures (a
    file that is missing or not a readable video), with the exception type for anything else (a
    bug to report). The tools' ``skipping VIDEO: ...`` and the loader's warnings use it."""
    if isinstance(exc, FileNotFoundError) and exc.filename:  # the OS's, not "[Errno 2] ..."
        return f"no such file: {exc.filename}"
    if isinstance(exc, (UnreadableVideo, FileNotFoundError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def open_video(path: str | os.PathLike, decoder: str = "auto", threads: int = 1) -> VideoReader:
    """A reader for one video file with decoder ``decoder`` (``auto`` resolved first).
    ``FileNotFoundError`` when there is no such file; ``UnreadableVideo`` when the decoder cannot
    open it as a video (empty, cut off, not a video at all, no video stream)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video: {path}")
    name = resolve_decoder(decoder)  # (a named one that fails to load: see there)
    return open_reader(_READERS[name], path, name, path, os.path.getsize(path) == 0, threads=threads)


def open_reader(reader: Callable[..., VideoReader], source, name: str, label: str, empty: bool,
                empty_reason: str = "empty file", **kw) -> VideoReader:
    """``reader(source, **kw)`` (decoder ``name``'s reader of a file or of bytes), with every
    decoder's own type and text for "cannot open this" as one ``UnreadableVideo(label, ...)``; an
    ``empty`` source is refused before the decoder sees it."""
    if name == "pyav":
        quiet_pyav()  # FFmpeg's reason comes back in the error (PyAV keeps it once logging is set), not on stderr
    if empty:
        raise UnreadableVideo(label, empty_reason)
    try:
        return reader(source, **kw)
    except Exception as exc:
        raise UnreadableVideo(label, _short_reason(exc)) from exc
