"""Video datasets as WebDataset tar shards: the format, where shards are found, and an exact,
resumable split of every epoch over ranks and loader workers.

Format (written by ``vmae-shards``, read with the ``webdataset`` package's own tar reader)::

    DIR/shard-000000.tar ...        plain tar, one sample = the members sharing a key:
        <key>.mp4 (or .avi, .webm, ... the video's own container)   the video bytes
        <key>.NNNNNN.jpg             instead of a video: the frames of a frame folder, from 0
        <key>.json                   {"path", "index", "label", "frames", "height", "width",
                                      "fps", "start_idx", "total_frames", "folder",
                                      "pts_runs", "keyframes", "index_by"}
    DIR/manifest.json               {"format": "vmae-shards/1", "shards": [{"name", "count",
                                     "bytes"}], "total", "list", "short_side"}

``pts_runs`` and ``keyframes`` (video samples; absent in shards written before them, which then
read as before) are the PyAV reader's packet index of the stored bytes: every frame's pts, sorted,
as ``[first, step, count]`` runs (``pack_pts``), and the frame numbers of the keyframes;
``index_by`` the libavformat version that found them (another version's demuxer may number the
timestamps otherwise, edit lists for one: its reader then indexes the video itself). A reader
given them skips the pass that demuxes the whole video to find them, which a file cannot skip
(``vmae-bench loader --breakdown``'s ``open+index``, 10 s 320p clips on a 2-vCPU AMD EPYC: 0.8
against 1.6 CPU-ms a video; README, the loader's source axis).

``key`` is the list line's index, 9 digits (unique even when a list names a video twice; the
JSON's ``path`` is the list's path); ``index`` the same number, which seeds the sample's random
choices exactly as ``train.data.VideoDataset`` seeds those of list line ``index``, so a sample
read from a shard is the sample read from the file.

An epoch (``EpochLayout``): the shards in an order drawn from ``(seed, epoch)``, their samples
concatenated; padded, as ``torch.utils.data.DistributedSampler`` pads, by repeating samples from
the start of that order until the count divides by the world size; rank ``r`` takes the ``r``-th
contiguous part and splits it, contiguously again, over its loader workers (each worker reads a
run of whole shards, at most the first and last in part). Within a worker's part the order is a
shuffle buffer's (``buffer_order``), drawn from ``(seed, epoch, first position)`` up front over
sample positions, so a position in that order is the whole state: a resume re-reads the part,
drops the samples already given and releases the rest in the same order.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .decoders import DecordReader, PyAVReader, TorchCodecReader, VideoReader, open_reader, resolve_decoder
from .frames import FrameFolder
from .sources import FrameWindow

FORMAT = "vmae-shards/1"
MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
KEY_DIGITS = 9
VIDEO_EXTS = ("mp4", "avi", "mkv", "webm", "mov", "m4v", "flv", "mpg", "mpeg", "ts")


class ShardError(ValueError):
    """A shard specification that does not resolve: one line naming the shard or the manifest."""


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def frame_member(i: int) -> str:
    """Member suffix of frame ``i`` of a frame folder sample (``<key>.000003.jpg``)."""
    return f"{i:06d}.jpg"


# ----------------------------------------------------------------------------- where shards are
@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]     # in the manifest's order
    counts: tuple[int, ...]   # samples in each
    manifest: dict

    @property
    def total(self) -> int:
        return sum(self.counts)


def _is_url(spec: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", spec) is not None and not re.match(r"^[A-Za-z]:[\\/]", spec)


def _local_path(url: str) -> str | None:
    """The file a local URL names (a plain path or ``file://``), else None."""
    if url.startswith("file:"):
        return re.sub(r"^file://?", "/", url) if url.startswith("file:/") else url[5:]
    return None if _is_url(url) else url


def _open(url: str, mode: str = "rb"):
    path = _local_path(url)
    if path is not None:
        # 1 MiB reads: the tar reader asks for 10 KiB at a time, each a read(2) through the 8 KiB
        # buffer webdataset opens local files with (0.8 -> 0.5 CPU-ms a 1 MB sample: the tar read
        # of `vmae-bench loader --breakdown`, 2-vCPU AMD EPYC)
        return open(path, mode, buffering=1 << 20)
    from webdataset.gopen import gopen  # (the package imports in seconds: only when reading)

    return gopen(url, mode)


def _manifest_url(first: str) -> str:
    """The manifest beside a shard URL: its last ``*.tar`` name replaced (works inside a
    ``pipe:`` command too, e.g. ``pipe:aws s3 cp s3://b/shard-000000.tar -``)."""
    names = list(re.finditer(r"[^/\s'\"]+\.tar\b", first))
    if not names:
        raise ShardError(f"--shards {first}: no '*.tar' name in it to find {MANIFEST} beside")
    m = names[-1]
    return first[:m.start()] + MANIFEST + first[m.end():]


def read_manifest(url: str) -> dict:
    try:
        with _open(url) as f:
            data = json.loads(f.read().decode("utf-8"))
    except Exception as exc:
        raise ShardError(f"cannot read the shard manifest {url} ({type(exc).__name__}: {exc}); "
                         "vmae-shards writes it beside the shards") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardError(f"{url}: not a {FORMAT} manifest")
    if not data.get("complete", False):
        raise ShardError(f"{url}: the shards are not all written yet (rerun vmae-shards with the same options "
                         "to finish them)")
    return data


def resolve(spec: str, check: bool = True) -> ShardSet:
    """Shards of ``spec``: a folder (every shard its ``manifest.json`` lists), a brace pattern
    (``/data/shard-{000000..000127}.tar``), a URL or URL pattern (``file://``, ``http(s)://``, or
    an object store through webdataset's ``pipe:`` URLs). The manifest is read from beside the
    first shard. ``check``: a local shard that is missing, or any not in the manifest, is a
    ``ShardError`` now (remote shards are not probed: one that cannot be read is counted as
    truncated when reached)."""
    import braceexpand

    local = _local_path(spec)
    if local is not None and os.path.isdir(local):
        man = read_manifest(os.path.join(local, MANIFEST))
        names = [s["name"] for s in man["shards"] if s["count"] > 0]
        urls = [os.path.join(local, n) for n in names]
    else:
        if local is not None and not re.search(r"\.tar\b", spec):
            raise ShardError(f"--shards {spec}: no such folder (a folder, or a pattern of '.tar' shards)")
        urls = list(braceexpand.braceexpand(spec))
        man = read_manifest(_manifest_url(urls[0]))
        names = [re.findall(r"[^/\s'\"]+\.tar\b", u)[-1] if re.search(r"\.tar\b", u) else u for u in urls]
    counts = {s["name"]: int(s["count"]) for s in man["shards"]}
    unknown = [n for n in names if n not in counts]
    if unknown:
        raise ShardError(f"--shards {spec}: {unknown[0]} is not in the manifest "
                         f"({len(unknown)} of {len(names)} shards are not)")
    if check:
        for u in urls:
            p = _local_path(u)
            if p is not None and not os.path.isfile(p):
                raise ShardError(f"--shards {spec}: shard {p} is missing")
    if not urls or sum(counts[n] for n in names) == 0:
        raise ShardError(f"--shards {spec}: no samples")
    return ShardSet(tuple(urls), tuple(counts[n] for n in names), man)


# ----------------------------------------------------------------------------- the epoch layout
def buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``buffer`` items releases positions ``0..n-1`` that arrive
    in order: fill it, then each arrival releases a random held item; drain at the end. Item
    ``out[p] <= p + buffer - 1``: reading never runs more than ``buffer`` samples ahead."""
    out = np.empty(n, np.int64)
    held: list[int] = []
    draws = rng.random(n)
    k = 0
    for i in range(n):
        held.append(i)
        if len(held) >= buffer:
            j = int(draws[k] * len(held))
            held[j], held[-1] = held[-1], held[j]
            out[k] = held.pop()
            k += 1
    while held:
        j = int(draws[k] * len(held))
        held[j], held[-1] = held[-1], held[j]
        out[k] = held.pop()
        k += 1
    return out


@dataclass(frozen=True)
class Piece:
    shard: int   # index into ShardSet.urls
    start: int   # first sample (in the shard's order)
    stop: int


class EpochLayout:
    """Which samples each (rank, worker) reads in epoch ``epoch``, and in which order.

    ``per_rank`` = ceil(total / world) samples a rank; the padding (``per_rank * world - total``
    samples, fewer than ``world``) repeats the first samples of the epoch's order, as
    ``DistributedSampler`` does."""

    def __init__(self, counts: Sequence[int], world: int, seed: int, epoch: int, shuffle: bool = True):
        self.counts, self.world, self.seed, self.epoch = list(counts), world, seed, epoch
        self.total = sum(self.counts)
        self.per_rank = math.ceil(self.total / world)
        n = len(self.counts)
        self.order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)).tolist()
        self.starts = np.cumsum([0] + [self.counts[s] for s in self.order]).tolist()  # in epoch order

    def part(self, rank: int, worker: int, workers: int) -> tuple[int, int]:
        """``[lo, hi)`` positions of the padded epoch that (rank, worker) reads."""
        base, extra = divmod(self.per_rank, workers)
        lo = rank * self.per_rank + worker * base + min(worker, extra)
        return lo, lo + base + (worker < extra)

    def pieces(self, lo: int, hi: int) -> list[Piece]:
        """Positions ``[lo, hi)`` as contiguous runs of shards (positions past ``total`` wrap:
        the padding)."""
        out: list[Piece] = []
        g = lo
        while g < hi:
            q = g % self.total
            k = int(np.searchsorted(self.starts, q, side="right")) - 1  # epoch-order shard of q
            take = min(self.starts[k + 1] - q, hi - g)
            off = q - self.starts[k]
            out.append(Piece(self.order[k], off, off + take))
            g += take
        return out


# ----------------------------------------------------------------------------- reading
def read_piece(url: str, start: int, stop: int) -> Iterator[dict | None]:
    """Samples ``start..stop-1`` of one shard (a dict of member suffix -> bytes, ``__key__``),
    read with webdataset's tar reader; the samples before ``start`` are read past. Yields
    ``None`` for each sample the shard does not deliver (truncated, unreadable), after one
    warning naming the shard."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    got = 0
    why = "it ends early"
    try:
        with _open(url) as stream:
            for i, sample in enumerate(group_by_keys(
                    ({**f, "__url__": url} for f in tar_file_iterator(stream)))):
                if i >= stop:
                    break
                if i >= start:
                    got += 1
                    yield sample
                if i + 1 >= stop:
                    break
    except Exception as exc:  # truncated tar, broken header, unreachable URL
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    lost = stop - start - got
    if lost:
        warnings.warn(f"shard {url}: {lost} of samples {start}..{stop - 1} not read ({why}); skipped",
                      stacklevel=2)
        for _ in range(lost):
            yield None


class PartStream:
    """One (rank, worker) part of one epoch, in its shuffle-buffer order, from position ``at``
    on: yields ``(position + 1, sample)``; a sample the shard did not deliver is
    ``{"__lost__": "<url>#<index in the shard>"}``."""

    def __init__(self, shards: ShardSet, layout: EpochLayout, rank: int, worker: int, workers: int,
                 buffer: int):
        self.shards, self.layout = shards, layout
        self.lo, self.hi = layout.part(rank, worker, workers)
        self.pieces = layout.pieces(self.lo, self.hi)
        rng = np.random.default_rng([layout.seed, layout.epoch, self.lo, 1])
        self.order = buffer_order(self.hi - self.lo, max(1, buffer), rng)

    def __len__(self) -> int:
        return self.hi - self.lo

    def iter_from(self, at: int = 0) -> Iterator[tuple[int, dict]]:
        given = set(self.order[:at].tolist())
        held: dict[int, dict] = {}
        reader = self._read(given)
        for p in range(at, len(self)):
            want = int(self.order[p])
            while want not in held:
                i, s = next(reader)
                if i not in given:
                    held[i] = s
            yield p + 1, held.pop(want)

    def _read(self, given: set[int]) -> Iterator[tuple[int, dict]]:
        i = 0
        for pc in self.pieces:
            n = pc.stop - pc.start
            if all(j in given for j in range(i, i + n)):  # given before a resume: not opened
                i += n
                continue
            url = self.shards.urls[pc.shard]
            for k, s in enumerate(read_piece(url, pc.start, pc.stop)):
                yield i, s if s is not None else {"__lost__": f"{url}#{pc.start + k}"}
                i += 1


def meta_of(sample: dict) -> dict:
    """The sample's JSON (a ``ValueError`` when it is missing or not JSON)."""
    if "json" not in sample:
        raise ValueError(f"sample {sample.get('__key__')}: no .json member")
    return json.loads(sample["json"].decode("utf-8"))


def video_member(sample: dict) -> str | None:
    """The suffix of the sample's video member, or None (a frame folder sample)."""
    for k in sample:
        if k in VIDEO_EXTS:
            return k
    return None


# ----------------------------------------------------------------------------- decoding bytes
def pack_pts(pts: Sequence[int]) -> list[list[int]]:
    """Sorted pts as ``[first, step, count]`` runs: one run for a constant frame rate."""
    runs: list[list[int]] = []
    for p in pts:
        p = int(p)
        if runs and runs[-1][2] == 1 and p > runs[-1][0]:
            runs[-1][1:] = [p - runs[-1][0], 2]
        elif runs and p == runs[-1][0] + runs[-1][1] * runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([p, 0, 1])
    return runs


def unpack_pts(runs: Sequence[Sequence[int]]) -> list[int]:
    return [int(a) + int(d) * k for a, d, c in runs for k in range(int(c))]


@functools.lru_cache(maxsize=None)
def demuxer_version() -> str:
    """The libavformat version PyAV runs on (``index_by`` of a stored index)."""
    import av

    return ".".join(str(v) for v in av.library_versions["libavformat"])


def stored_index(meta: dict) -> tuple[list[int], list[int]] | None:
    """``(pts, keyframes)`` of a sample's JSON, or None when absent, found by another libavformat
    than this one, or not consistent with its ``frames`` (the reader then demuxes the video)."""
    if "pts_runs" not in meta or "keyframes" not in meta or meta.get("index_by") != demuxer_version():
        return None
    try:
        pts, keys = unpack_pts(meta["pts_runs"]), [int(k) for k in meta["keyframes"]]
    except (TypeError, ValueError):
        return None
    n = len(pts)
    if n != int(meta.get("frames", -1)) or not keys or any(not 0 <= k < n for k in keys) \
            or any(b <= a for a, b in zip(pts, pts[1:])):
        return None
    return pts, keys


class _PyAVBytes(PyAVReader):
    # FFmpeg reads a file-like object through Python calls, one per buffer: 1 MiB buffers make
    # that a few calls a video instead of one per 32 KiB
    open_options = {"buffer_size": 1 << 20}

    def __init__(self, data: bytes, threads: int = 1, index: tuple[list[int], list[int]] | None = None):
        self._data = data
        super().__init__("<bytes>", threads, index=index)

    def _open(self) -> None:  # every (re)open starts at byte 0 of a fresh view of the same bytes
        self.path = io.BytesIO(self._data)
        super()._open()


class _DecordBytes(DecordReader):
    def __init__(self, data: bytes, threads: int = 1, index=None):  # index: PyAV's only
        import decord

        decord.bridge.set_bridge("native")
        self.vr = decord.VideoReader(io.BytesIO(data), num_threads=threads, ctx=decord.cpu(0))
        self.n = len(self.vr)


class _TorchCodecBytes(TorchCodecReader):
    def __init__(self, data: bytes, threads: int = 1, index=None):  # index: PyAV's only
        from torchcodec.decoders import VideoDecoder

        self.dec = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=threads, dimension_order="NHWC",
                                device="cpu")
        self.n = len(self.dec)


_BYTES_READERS = {"pyav": _PyAVBytes, "decord": _DecordBytes, "torchcodec": _TorchCodecBytes}


def open_video_bytes(data: bytes, decoder: str = "auto", threads: int = 1,
                     index: tuple[list[int], list[int]] | None = None) -> VideoReader:
    """``open_video`` for a video held in memory (the same frames as from its file). ``index``:
    PyAV's packet index of these bytes (``stored_index``), used by the pyav reader."""
    name = resolve_decoder(decoder)
    return open_reader(_BYTES_READERS[name], data, name, "<bytes>", not data, "empty member", threads=threads,
                       index=index)


class _FramesInMemory(FrameFolder):
    """A frame folder sample: the images ``<key>.000000.jpg`` .. as stored."""

    def __init__(self, sample: dict, n: int):
        self.sample, self.n = sample, n

    def get(self, indices):
        from PIL import Image

        frames = []
        for i in self._check(indices):
            with Image.open(io.BytesIO(self.sample[frame_member(i)])) as im:
                frames.append(np.asarray(im.convert("RGB")))
        return torch.from_numpy(np.stack(frames))


class SampleSource(FrameWindow):
    """``vmae_fast.video.VideoSource`` of a shard sample: frames ``start_idx .. + total_frames - 1`` of
    a video when the list gave ``total_frames > 0``, as from the file."""

    def __init__(self, sample: dict, meta: dict, decoder: str, threads: int = 1):
        if meta.get("folder"):
            self._open(_FramesInMemory(sample, int(meta["frames"])), "frames")
            return
        ext = video_member(sample)
        if ext is None:
            raise ValueError("no video member")
        name = resolve_decoder(decoder)
        index = stored_index(meta) if name == "pyav" else None  # only PyAV's reader takes one
        reader = open_video_bytes(sample[ext], name, threads, index=index)
        self._open(reader, reader.name, int(meta.get("start_idx", 0)), int(meta.get("total_frames", -1)))


__all__ = ["FORMAT", "MANIFEST", "SHARD_NAME", "ShardError", "ShardSet", "resolve", "read_manifest",
           "sample_key", "frame_member", "buffer_order", "EpochLayout", "Piece", "read_piece", "PartStream",
           "meta_of", "video_member", "pack_pts", "unpack_pts", "demuxer_version", "stored_index", "open_video_bytes", "SampleSource"]
