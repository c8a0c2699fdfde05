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
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..ops._common import imagenet_stats
from ..video.sources import open_source
from .common import (VideoErrors, add_model_args, add_run_args, device_and_dtype, entry, load_model_from_args,
                     make_parser, write_npy)

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


def preprocess(frames: torch.Tensor, img_size: int, input_norm: str = "imagenet") -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, img_size, img_size)`` float32: ``/255``, bilinear resize
    to a square (no antialiasing, as the official ``F.interpolate``), then the ImageNet
    normalization (``input_norm="imagenet"``) or none (``"none"``, the official extractor's)."""
    x = frames.permute(0, 3, 1, 2).float().div_(255)
    if tuple(x.shape[-2:]) != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    if input_norm == "imagenet":
        mean, std = imagenet_stats(x.device)
        x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    elif input_norm != "none":
        raise ValueError(f"input_norm must be 'imagenet' or 'none', got {input_norm!r}")
    return x


@torch.no_grad()
def video_features(model: torch.nn.Module, get_frames: Callable[[list[int]], torch.Tensor], n_frames: int, *,
                   stride: int = 4, sampling_rate: int = 1, pool: bool = True, batch_size: int = 8,
                   input_norm: str = "imagenet", amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Features of every window of one video: float32 ``(windows, D)`` (``pool``) or
    ``(windows, N, D)``. ``get_frames(indices) -> (len, H, W, 3)`` uint8. Frames are read in
    window batches, each at most once (overlapping windows reuse the preprocessed frames)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    starts = window_starts(n_frames, cfg.num_frames, stride, sampling_rate)
    cache: dict[int, torch.Tensor] = {}
    out = []
    for b in range(0, len(starts), batch_size):
        windows = [window_frames(s, n_frames, cfg.num_frames, sampling_rate) for s in starts[b:b + batch_size]]
        need = sorted({i for w in windows for i in w})
        missing = [i for i in need if i not in cache]
        if missing:
            for i, x in zip(missing, preprocess(get_frames(missing), cfg.img_size, input_norm)):
                cache[i] = x
        clips = torch.stack([torch.stack([cache[i] for i in w], dim=1) for w in windows])  # (b, 3, T, S, S)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feats = model.forward_features(clips.to(device), pool=pool)
        out.append(feats.float().cpu())
        keep = starts[b + batch_size] if b + batch_size < len(starts) else n_frames
        for i in [i for i in cache if i < keep]:
            del cache[i]
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
            raise UsageError(f"--video-dir {video_dir}: no such folder")
        paths += sorted(str(p) for p in Path(video_dir).iterdir()
                        if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    seen: dict[str, str] = {}
    for p in paths:
        key = output_path("", p).name
        if key in seen and seen[key] != p:
            raise UsageError(f"{seen[key]} and {p} would both write {key} in --output-dir")
        seen[key] = p
    return list(dict.fromkeys(paths))


def _progress(items: list, enabled: bool) -> Iterable:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(items, unit="video", dynamic_ncols=True, file=sys.stderr)
        except ImportError:  # pragma: no cover - tqdm is in the train/test extras
            pass
    return items


def _features_of(model: torch.nn.Module, video: str, decoder: str, **kw) -> np.ndarray:
    with open_source(video, decoder) as src:
        return video_features(model, src.get, len(src), **kw)


def extract(model: torch.nn.Module, videos: Sequence[str], out_dir: str | os.PathLike, *, stride: int = 4,
            sampling_rate: int = 1, pool: bool = True, batch_size: int = 8, input_norm: str = "imagenet",
            decoder: str = "auto", amp_dtype: torch.dtype | None = None, progress: bool = True,
            errors: VideoErrors | None = None) -> dict[str, list[str]]:
    """Write the features of each video (module docstring). Returns ``{"written": [...],
    "skipped": [...] (existing files), "failed": [...]}``; ``errors`` says each failure (default:
    one line on stderr)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    errors = errors or VideoErrors(PROG)
    done: dict[str, list[str]] = {"written": [], "skipped": [], "failed": []}
    bar = _progress(list(videos), progress)
    for video in bar:
        dest = output_path(out_dir, video)
        if dest.exists():
            done["skipped"].append(video)
            continue
        ok, feats = errors.attempt(video, _features_of, model, video, decoder, stride=stride,
                                   sampling_rate=sampling_rate, pool=pool, batch_size=batch_size,
                                   input_norm=input_norm, amp_dtype=amp_dtype)
        if not ok:
            done["failed"].append(video)
            continue
        write_npy(dest, feats)
        done["written"].append(video)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{Path(video).name}: {feats.shape[0]} windows")
    return done


def _parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, __doc__)
    p.add_argument("videos", nargs="*", metavar="VIDEO")
    p.add_argument("--video-dir", default=None, help="also every video file in this folder")
    add_model_args(p, "classifier (official fine-tuned, e.g. ViT-g K710 for TAD) or pretraining file, or HF")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--stride", type=int, default=4, help="frames between window starts (THUMOS14 4, FineAction 16)")
    p.add_argument("--sampling-rate", type=int, default=1, help="frame step inside a window (official: 1)")
    p.add_argument("--no-pool", dest="pool", action="store_false", help="per-token features (windows, N, D)")
    p.add_argument("--input-norm", default="imagenet", choices=("imagenet", "none"),
                   help="none: [0, 1] frames without normalization, as the official extractor")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    add_run_args(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    videos = list_videos(args.videos, args.video_dir)
    if not videos:
        raise UsageError("no videos given (VIDEO... or --video-dir)")
    model = load_model_from_args(args, "classifier")
    dev, amp = device_and_dtype(args.device, args.dtype)
    model = model.to(dev).eval()
    errors = VideoErrors(PROG, args.debug)
    done = extract(model, videos, args.output_dir, stride=args.stride, sampling_rate=args.sampling_rate,
                   pool=args.pool, batch_size=args.batch_size, input_norm=args.input_norm, decoder=args.decoder,
                   amp_dtype=amp, progress=args.progress, errors=errors)
    print(f"features: {len(done['written'])} written, {len(done['skipped'])} already there (skipped), "
          f"{len(done['failed'])} failed -> {args.output_dir}", file=sys.stderr)
    return errors.exit_status


cli = entry(main, PROG)

if __name__ == "__main__":
    cli()
