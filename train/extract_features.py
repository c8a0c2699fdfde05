"""Per-video encoder features over sliding windows, as the official temporal-action-detection
extractor (``extract_tad_feature.py`` of VideoMAE V2) computes them.

    python -m train.extract_features --checkpoint FILE --output-dir OUT VIDEO... [--video-dir DIR]
        [--num-frames 16] [--stride 4] [--sampling-rate 1] [--img-size 224] [--no-pool]
        [--input-norm imagenet|none]

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
script fails there). A video that cannot be read is named in a warning and skipped (exit code 1
at the end).

``--input-norm``: ``imagenet`` (default) feeds the model what it was fine-tuned on (ImageNet
mean/std). The official script feeds frames scaled to ``[0, 1]`` without that normalization:
``--input-norm none`` reproduces its features exactly.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vmae_fast.checkpoint import write_atomic
from vmae_fast.ops._common import imagenet_stats
from vmae_fast.predict import device_and_dtype
from vmae_fast.video.decoders import add_decoder_arg
from vmae_fast.video.sources import open_source

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


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    write_atomic(path, buf.getvalue())


def list_videos(videos: Sequence[str], video_dir: str | None) -> list[str]:
    paths = list(videos)
    if video_dir:
        paths += sorted(str(p) for p in Path(video_dir).iterdir()
                        if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    seen: dict[str, str] = {}
    for p in paths:
        key = output_path("", p).name
        if key in seen and seen[key] != p:
            raise ValueError(f"{seen[key]} and {p} would both write {key}")
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


def extract(model: torch.nn.Module, videos: Sequence[str], out_dir: str | os.PathLike, *, stride: int = 4,
            sampling_rate: int = 1, pool: bool = True, batch_size: int = 8, input_norm: str = "imagenet",
            decoder: str = "auto", amp_dtype: torch.dtype | None = None, progress: bool = True) -> dict[str, list[str]]:
    """Write the features of each video (module docstring). Returns ``{"written": [...],
    "skipped": [...] (existing files), "failed": [...]}``."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    done: dict[str, list[str]] = {"written": [], "skipped": [], "failed": []}
    bar = _progress(list(videos), progress)
    for video in bar:
        dest = output_path(out_dir, video)
        if dest.exists():
            done["skipped"].append(video)
            continue
        try:
            with open_source(video, decoder) as src:
                feats = video_features(model, src.get, len(src), stride=stride, sampling_rate=sampling_rate,
                                       pool=pool, batch_size=batch_size, input_norm=input_norm, amp_dtype=amp_dtype)
        except Exception as exc:  # a bad video: say which, go on
            warnings.warn(f"skipping {video}: {type(exc).__name__}: {exc}", stacklevel=2)
            done["failed"].append(video)
            continue
        _save_npy(dest, feats)
        done["written"].append(video)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{Path(video).name}: {feats.shape[0]} windows")
    return done


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.extract_features", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="*", metavar="VIDEO")
    p.add_argument("--video-dir", default=None, help="also every video file in this folder")
    p.add_argument("--checkpoint", required=True,
                   help="classifier (official fine-tuned, e.g. ViT-g K710 for TAD) or pretraining file, or HF")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--num-frames", type=int, default=None, help="frames per window (default 16)")
    p.add_argument("--img-size", type=int, default=None, help="default 224")
    p.add_argument("--num-heads", type=int, default=None, help="default: the named arch of the checkpoint's width")
    p.add_argument("--stride", type=int, default=4, help="frames between window starts (THUMOS14 4, FineAction 16)")
    p.add_argument("--sampling-rate", type=int, default=1, help="frame step inside a window (official: 1)")
    p.add_argument("--no-pool", dest="pool", action="store_false", help="per-token features (windows, N, D)")
    p.add_argument("--input-norm", default="imagenet", choices=("imagenet", "none"),
                   help="none: [0, 1] frames without normalization, as the official extractor")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    add_decoder_arg(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from vmae_fast.models.factory import load_model

    videos = list_videos(args.videos, args.video_dir)
    if not videos:
        raise SystemExit("no videos given (VIDEO... or --video-dir)")
    extra = {"num_heads": args.num_heads} if args.num_heads else {}
    model = load_model(args.checkpoint, "classifier", num_frames=args.num_frames, img_size=args.img_size, **extra)
    dev, amp = device_and_dtype(args.device, args.dtype)
    model = model.to(dev).eval()
    done = extract(model, videos, args.output_dir, stride=args.stride, sampling_rate=args.sampling_rate,
                   pool=args.pool, batch_size=args.batch_size, input_norm=args.input_norm, decoder=args.decoder,
                   amp_dtype=amp, progress=args.progress)
    print(f"features: {len(done['written'])} written, {len(done['skipped'])} already there (skipped), "
          f"{len(done['failed'])} failed -> {args.output_dir}", file=sys.stderr)
    return 1 if done["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
