"""Per-video encoder features over sliding windows, as the official temporal-action-detection
extractor (``extract_tad_feature.py`` of VideoMAE V2) computes them.

    vmae-extract-features --checkpoint FILE --output-dir OUT VIDEO... [--video-dir DIR]
        [--num-frames 16] [--stride 4] [--sampling-rate 1] [--img-size 224] [--no-pool]
        [--input-norm imagenet|none] [--device auto] [--dtype auto] [--decoder auto] [--debug]

For each video, window ``k`` is frames ``s_k + i * sampling_rate`` (``i < num_frames``) with
``s_k = k * stride`` for every start that fits (``range(0, n - span + 1, stride)``, ``span =
(num_frames - 1) * sampling_rate + 1``; official: 16 consecutive frames, stride 4 for THUMOS14,
16 for FineAction). Each frame is resized to ``img_size x img_size`` (bilinear, no antialiasing,
aspect not kept, as official), and the classifier's ``forward_features`` gives one row per window:
pooled ``(D,)`` (official: ``fc_norm`` of the token mean) or, with ``--no-pool``, per token
``(N, D)``. ``OUT/<video name without extension>.npy`` holds the float32 ``(windows, D)`` (or
``(windows, N, D)``) array, written atomically.

Resume: a video whose ``.npy`` exists is skipped, so an interrupted run continues where it
stopped. A video shorter than one window gives one window, its last frame repeated (the official
script fails there). A video that cannot be read is named in one line on stderr and skipped; the
others are written (exit status 1 at the end; ``vmae_fast.errors``).

``--input-norm``: ``imagenet`` (default) feeds the model what it was fine-tuned on (ImageNet
mean/std). The official script feeds frames scaled to ``[0, 1]`` without that normalization:
``--input-norm none`` reproduces its features exactly.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError, check_at_least
from ..ops._common import imagenet_stats
from ..video.sources import open_source
from .common import (VideoErrors, add_model_args, add_run_args, check_output, device_and_dtype, entry,
                     inference_attention, load_model_from_args, make_parser, say, write_npy)

PROG = "vmae-extract-features"

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")


def window_starts(n_frames: int, num_frames: int, stride: int, sampling_rate: int = 1) -> list[int]:
    """First frame of every window: ``range(0, n - span + 1, stride)``; ``[0]`` when the video is
    shorter than one window."""
    if num_frames < 1 or stride < 1 or sampling_rate < 1:
        raise ValueError("num_frames, stride and sampling_rate must be >= 1")
    if n_frames < 1:
        raise ValueError("the video has no frames")
    span = (num_frames - 1) * sampling_rate + 1
    return list(range(0, n_frames - span + 1, stride)) or [0]


def window_frames(start: int, n_frames: int, num_frames: int, sampling_rate: int = 1) -> list[int]:
    """Frame indices of the window from ``start`` (the last frame repeated past the end)."""
    return [min(start + i * sampling_rate, n_frames - 1) for i in range(num_frames)]


# Frames are made float a group of at most this many bytes at a time: the 32 frames of two 720p
# windows are 354 MB of float32 at full size (4K: 3.2 GB), memory mapped and faulted in afresh at
# every read; the resized clip is what is kept. Max RSS of the README's feature-extraction command
# (/usr/bin/time's %M, idle 2-core AMD EPYC, 2 runs each): 1.71-1.72 GiB before, 1.63 GiB after.
PREPROCESS_BYTES = 16 << 20


def preprocess(frames: torch.Tensor, img_size: int, input_norm: str = "imagenet") -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, img_size, img_size)`` float32: ``/255``, bilinear resize
    to a square (no antialiasing, as the official ``F.interpolate``), then the ImageNet
    normalization (``input_norm="imagenet"``) or none (``"none"``, the official extractor's).
    Frame by frame the same values as the whole batch at once (each frame is resized alone)."""
    T, H, W, _ = frames.shape
    group = max(1, PREPROCESS_BYTES // (H * W * 3 * 4))
    if T > group:
        return torch.cat([preprocess(frames[i:i + group], img_size, input_norm) for i in range(0, T, group)])
    x = frames.permute(0, 3, 1, 2).float().div_(255)
    if tuple(x.shape[-2:]) != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    if input_norm == "imagenet":
        mean, std = imagenet_stats(x.device)
        x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    elif input_norm != "none":
        raise ValueError(f"input_norm must be 'imagenet' or 'none', got {input_norm!r}")
    return x


class _WindowReader:
    """The windows of one video as preprocessed clips ``(3, T, S, S)``, in order, a chunk at a
    time; frames are read and preprocessed at most once (overlapping windows share them) and
    dropped once no later window needs them."""

    def __init__(self, get_frames: Callable[[list[int]], torch.Tensor], n_frames: int, num_frames: int,
                 img_size: int, stride: int, sampling_rate: int, input_norm: str):
        self.get, self.n = get_frames, n_frames
        self.num_frames, self.img_size, self.rate, self.norm = num_frames, img_size, sampling_rate, input_norm
        self.starts = window_starts(n_frames, num_frames, stride, sampling_rate)
        self.next = 0  # the first window not read yet
        self.cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, count: int) -> list[torch.Tensor]:
        """The next ``count`` windows (fewer at the end)."""
        chunk = self.starts[self.next:self.next + count]
        windows = [window_frames(s, self.n, self.num_frames, self.rate) for s in chunk]
        missing = sorted({i for w in windows for i in w} - self.cache.keys())
        if missing:
            for i, x in zip(missing, preprocess(self.get(missing), self.img_size, self.norm)):
                self.cache[i] = x
        clips = [torch.stack([self.cache[i] for i in w], dim=1) for w in windows]
        self.next += len(chunk)
        keep = self.starts[self.next] if self.next < len(self.starts) else self.n
        for i in [i for i in self.cache if i < keep]:
            del self.cache[i]
        return clips


# Windows per forward pass on a CPU. Small parts keep ViT-B's largest activations (the MLP's
# hidden layer: 19 MB for 2 clips in bf16) under glibc's 32 MB mmap threshold, so freed blocks
# are reused instead of mapped and faulted in again at every pass (system CPU 6.7 -> 3.2-4.6 s
# for the README's feature-extraction command, 30 ViT-B windows, 2-vCPU AMD EPYC under load);
# larger parts gain nothing in the matmuls (ViT-B's MLP matmul in bf16, one thread, idle: 236-242
# GMAC per CPU-s for 1-2 clips, 186-190 for 8; the command: README, "Feature extraction speed").
CPU_PART = 2


@torch.no_grad()
def forward_windows(model: torch.nn.Module, clips: Sequence[torch.Tensor], pool: bool = True,
                    amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``forward_features`` of a batch of window clips, float32 on the CPU."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        feats = model.forward_features(torch.stack(list(clips)).to(device, non_blocking=True), pool=pool)
    return feats.float().cpu()


class _Forward:
    """Forward passes of window batches beside the reading. On a CPU a batch is cut into parts of
    at most ``CPU_PART`` windows, run by ``workers`` threads (default: one per intra-op thread,
    at most one per part of a batch), each with its share of the intra-op threads (one on a small
    machine). The parts are independent clips, so the rows are those of one pass. With one
    intra-op thread no op waits at a barrier for a core another process holds (on this 2-vCPU AMD
    EPYC at load 8 from other jobs: 1.3 vs 3.8-5.8 CPU s per ViT-B 16x224 clip, not reproduced
    idle, where the gain is the overlap: README, "Feature extraction speed"), and the next batch
    is read while this one runs. Elsewhere (CUDA) the pass runs on the caller's thread, as
    ``forward_windows``.

    ``step``: windows the caller hands over at a time (a part when there are several workers, so
    the first part starts after 2 windows are read, not 16); ``depth``: hand-overs in the model at
    once (``batch_size`` windows in parts, or one batch)."""

    def __init__(self, model: torch.nn.Module, pool: bool, amp_dtype: torch.dtype | None, workers: int | None,
                 batch_size: int):
        self.model, self.pool, self.amp = model, pool, amp_dtype
        on_cpu = next(model.parameters()).device.type == "cpu"
        self.threads = torch.get_num_threads()
        if workers is None:
            workers = min(self.threads, -(-batch_size // CPU_PART))
        self.workers = max(1, workers) if on_cpu else 0
        self.intra = max(1, self.threads // self.workers) if self.workers else self.threads
        parts = self.workers > 1
        # each worker thread takes its share of the intra-op threads once, as it starts
        share = dict(initializer=torch.set_num_threads, initargs=(self.intra,)) if parts else {}
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix=PROG, **share) if self.workers else None
        self.step = CPU_PART if parts else batch_size
        self.depth = -(-batch_size // CPU_PART) if parts else 1
        if parts:
            torch.set_num_threads(self.intra)  # the reading too: the workers hold the cores

    def submit(self, clips: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Starts the pass of ``clips`` (at most ``step`` windows: one part, or with one worker the
        whole batch on all cores); the returned function waits for its ``(len(clips), ...)`` rows."""
        if self.executor is None:
            feats = forward_windows(self.model, clips, self.pool, self.amp)
            return lambda: feats
        return self.executor.submit(forward_windows, self.model, clips, self.pool, self.amp).result

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(self.threads)


def video_features(model: torch.nn.Module, get_frames: Callable[[list[int]], torch.Tensor], n_frames: int, *,
                   stride: int = 4, sampling_rate: int = 1, pool: bool = True, batch_size: int = 8,
                   input_norm: str = "imagenet", amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Features of every window of one video: float32 ``(windows, D)`` (``pool``) or
    ``(windows, N, D)``. ``get_frames(indices) -> (len, H, W, 3)`` uint8. (``extract`` batches
    the windows of several videos together; this is one video alone.)"""
    cfg = model.cfg
    reader = _WindowReader(get_frames, n_frames, cfg.num_frames, cfg.img_size, stride, sampling_rate, input_norm)
    out = []
    while reader.next < len(reader):
        out.append(forward_windows(model, reader.read(batch_size), pool, amp_dtype))
    return torch.cat(out).numpy()


def output_path(out_dir: str | os.PathLike, video: str | os.PathLike) -> Path:
    """``OUT/<name without extension>.npy`` (the official naming cuts at the first dot)."""
    return Path(out_dir) / (Path(video).name.split(".")[0] + ".npy")


def list_videos(videos: Sequence[str], video_dir: str | None) -> list[str]:
    """``videos`` and the video files of ``video_dir``, each once; two that would write the same
    output file are a ``UsageError``."""
    paths = list(videos)
    if video_dir:
        if not os.path.isdir(video_dir):
            raise UsageError(f"--video-dir {video_dir}: " + ("not a folder" if os.path.exists(video_dir)
                                                             else "no such folder"))
        paths += sorted(str(p) for p in Path(video_dir).iterdir()
                        if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    seen: dict[str, str] = {}
    for p in paths:
        key = output_path("", p).name
        if key in seen and seen[key] != p:
            raise UsageError(f"{seen[key]} and {p} would both write {key} in --output-dir")
        seen[key] = p
    return list(dict.fromkeys(paths))


class _Progress:
    """Windows done of all windows, with rate and ETA (tqdm on stderr when installed and asked for)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="window", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
            except ImportError:  # tqdm comes with the train/test extras; without it, no bar
                pass

    def update(self, windows: int, video: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(Path(video).name, refresh=False)
            self.bar.update(windows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Pending:
    """One video being extracted: its window reader while open, its rows as they come."""

    def __init__(self, video: str, dest: Path, source, reader: _WindowReader):
        self.video, self.dest, self.source, self.reader = video, dest, source, reader
        self.rows: list[torch.Tensor] = []  # one a window, in order, until the file is written
        self.failed = False

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None


def _open(video: str, decoder: str, dest: Path, cfg, stride: int, sampling_rate: int, input_norm: str) -> _Pending:
    src = open_source(video, decoder)
    try:
        reader = _WindowReader(src.get, len(src), cfg.num_frames, cfg.img_size, stride, sampling_rate, input_norm)
    except BaseException:
        src.close()
        raise
    return _Pending(video, dest, src, reader)


# Videos the counting pass keeps open for their extraction, so each is opened (and, for the
# decoders, indexed: a demux of the whole file) once. Past it a video is counted, closed and
# opened again at its turn: a dataset of thousands of videos must not hold thousands of file
# descriptors and decoder buffers at once.
HELD_OPEN = 64


def extract(model: torch.nn.Module, videos: Sequence[str], out_dir: str | os.PathLike, *, stride: int = 4,
            sampling_rate: int = 1, pool: bool = True, batch_size: int = 16, input_norm: str = "imagenet",
            decoder: str = "auto", amp_dtype: torch.dtype | None = None, progress: bool = True,
            errors: VideoErrors | None = None, workers: int | None = None) -> dict[str, list[str]]:
    """Write the features of each video (module docstring). Returns ``{"written": [...],
    "skipped": [...] (existing files), "failed": [...]}``; ``errors`` says each failure (default:
    one line on stderr).

    The windows of consecutive videos share forward passes of ``batch_size`` windows (a video of
    3 windows does not run a batch of 3 alone); each video's file is written as soon as its last
    window is through. Every video is opened before any model work, to count its windows (the
    progress bar's total and ETA); one that cannot be opened is named and counted then. The first
    ``HELD_OPEN`` stay open for their extraction (one open each); later ones are opened again at
    their turn.
    On a CPU, ``workers`` threads (default: one per intra-op thread, at most one per 2 windows of a
    batch) run parts of 2 windows, each handed over as soon as it is read, up to ``batch_size``
    windows in the model at once (``_Forward``)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    errors = errors or VideoErrors(PROG)
    cfg = model.cfg
    done: dict[str, list[str]] = {"written": [], "skipped": [], "failed": []}
    todo: list[tuple[str, Path, _Pending | None]] = []  # (video, file, its open reader or None)
    total = 0
    bar = forward = None
    try:
        for video in videos:
            dest = output_path(out_dir, video)
            if dest.exists():
                done["skipped"].append(video)
                continue
            ok, item = errors.attempt(video, _open, video, decoder, dest, cfg, stride, sampling_rate, input_norm)
            if not ok:
                done["failed"].append(video)
                continue
            total += len(item.reader)
            if len(todo) >= HELD_OPEN:
                item.close()
                item = None
            todo.append((video, dest, item))
        bar = _Progress(total, progress)
        queue: list[tuple[_Pending, torch.Tensor]] = []  # windows read, not yet through the model
        forward = _Forward(model, pool, amp_dtype, workers, batch_size)
        running: deque = deque()  # (batch, wait for its rows), oldest first: in the model while more is read

        def finish() -> None:
            batch, wait = running.popleft()
            feats = wait()
            for (item, _), row in zip(batch, feats):
                item.rows.append(row)
            for item in dict.fromkeys(item for item, _ in batch):
                if len(item.rows) == len(item.reader) and not item.failed:
                    write_npy(item.dest, torch.stack(item.rows).numpy())
                    done["written"].append(item.video)
                    item.rows = []
            bar.update(len(batch), batch[-1][0].video)

        def run(batch: list[tuple[_Pending, torch.Tensor]]) -> None:
            while len(running) >= forward.depth:
                finish()
            running.append((batch, forward.submit([clip for _, clip in batch])))

        for k, (video, dest, item) in enumerate(todo):
            if item is None:
                ok, item = errors.attempt(video, _open, video, decoder, dest, cfg, stride, sampling_rate, input_norm)
                if not ok:
                    done["failed"].append(video)
                    continue
            todo[k] = (video, dest, None)  # closed below, by whoever holds it now
            try:
                while item.reader.next < len(item.reader):
                    ok, clips = errors.attempt(video, item.reader.read, forward.step - len(queue))
                    if not ok:  # read error mid-video: its windows leave the queue, the others go on
                        item.failed = True
                        done["failed"].append(video)
                        queue = [q for q in queue if q[0] is not item]
                        break
                    queue += [(item, c) for c in clips]
                    if len(queue) >= forward.step:
                        run(queue)
                        queue = []
            finally:
                item.close()
        if queue:
            run(queue)
        while running:
            finish()
    finally:
        for _, _, item in todo:  # held readers of videos not reached (an error or an interrupt)
            if item is not None:
                item.close()
        if forward is not None:
            forward.close()
        if bar is not None:
            bar.close()
    return done


def _parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, __doc__)
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="video files (or frame folders)")
    p.add_argument("--video-dir", default=None, help="also every video file in this folder")
    add_model_args(p, "classifier (official fine-tuned, e.g. ViT-g K710 for TAD) or pretraining file, or HF")
    p.add_argument("--output-dir", required=True, help="where OUT/<video name>.npy are written")
    p.add_argument("--stride", type=int, default=4, help="frames between window starts (THUMOS14 4, FineAction 16)")
    p.add_argument("--sampling-rate", type=int, default=1, help="frame step inside a window (official: 1)")
    p.add_argument("--no-pool", dest="pool", action="store_false", help="per-token features (windows, N, D)")
    p.add_argument("--input-norm", default="imagenet", choices=("imagenet", "none"),
                   help="none: [0, 1] frames without normalization, as the official extractor")
    p.add_argument("--batch-size", type=int, default=16,
                   help="windows per forward pass (of consecutive videos together)")
    add_run_args(p)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (windows done, rate, ETA) on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_at_least(args, {"stride": 1, "sampling_rate": 1, "batch_size": 1})
    videos = list_videos(args.videos, args.video_dir)
    if not videos:
        raise UsageError("no videos given (VIDEO... or --video-dir)")
    check_output("--output-dir", args.output_dir, folder=True)
    dev, amp, device_line = device_and_dtype(args.device, args.dtype)
    model = load_model_from_args(args, "classifier")
    model = model.to(dev).eval()
    inference_attention(model, dev, amp)
    say(device_line)
    errors = VideoErrors(PROG, args.debug)
    done = extract(model, videos, args.output_dir, stride=args.stride, sampling_rate=args.sampling_rate,
                   pool=args.pool, batch_size=args.batch_size, input_norm=args.input_norm, decoder=args.decoder,
                   amp_dtype=amp, progress=args.progress, errors=errors)
    print(f"features: {len(done['written'])} written, {len(done['skipped'])} already there (skipped), "
          f"{len(done['failed'])} failed -> {args.output_dir}", file=sys.stderr)
    return errors.exit_status


cli = entry(main, PROG, kept="the feature files written are whole and kept; the same command goes on "
                               "with the videos that have none")

if __name__ == "__main__":
    cli()
