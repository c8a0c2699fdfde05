"""Classify videos with a fine-tuned checkpoint: top-k labels with probabilities, by the official
multi-view test protocol.

    vmae-predict VIDEO... --checkpoint FILE [--labels k400|FILE] [--views 5x3] [--topk 5] [--json]
                 [--device auto] [--dtype auto] [--decoder auto] [--debug]

A video that cannot be read is named in one line on stderr and the others are classified (exit
status 1; ``vmae_fast.errors``).

The protocol (the official fine-tuning code's ``test`` mode for Kinetics, ``--test_num_segment S
--test_num_crop C``; ``5x3`` in its Kinetics scripts), per video: the ``S x C`` views of
``vmae_fast.video.views`` (every ``--sampling-rate``-th frame, short side resized to
``img_size``, ``S`` temporal clips x ``C`` spatial crops), then the softmax of each view's
logits, averaged (the official ``prob`` merge).

Video files and frame folders are read by ``vmae_fast.video`` (PyAV, torchcodec or decord; the
``train`` extra brings them); ``predict_frames`` takes decoded frames from anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import UsageError, check_at_least
from ..video.sources import open_source
from ..video.views import DEFAULT_VIEWS, make_views, parse_views
from .common import (VideoErrors, add_model_args, add_run_args, device_and_dtype, entry,
                     inference_attention, load_model_from_args, make_parser, read_hf_config, say)


@dataclass
class Prediction:
    """``top``: ``(class index, label, probability)`` best first; ``probs``: the averaged
    probabilities of every class; ``views``: how many views were averaged."""

    video: str
    top: list[tuple[int, str, float]]
    probs: torch.Tensor = field(repr=False)
    views: int = 0

    def to_json(self) -> dict:
        return {"video": self.video, "views": self.views,
                "top": [{"index": i, "label": label, "prob": p} for i, label, p in self.top]}


# --------------------------------------------------------------------------- the protocol

@torch.no_grad()
def predict_views(model: torch.nn.Module, views: torch.Tensor, batch_size: int = 8,
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Average over views of the softmax of ``model``'s logits (float32 ``(num_classes,)``)."""
    device = next(model.parameters()).device
    total = None
    for chunk in views.split(batch_size):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(chunk.to(device, non_blocking=True))
        p = logits.float().softmax(-1).sum(0)
        total = p if total is None else total + p
    return total / views.shape[0]


def predict_frames(model: torch.nn.Module, get_frames: Callable[[list[int]], torch.Tensor], n_frames: int, *,
                   labels: Sequence[str] | None = None, views: str | Sequence[int] = DEFAULT_VIEWS,
                   sampling_rate: int = 4, topk: int = 5, batch_size: int = 8, name: str = "",
                   amp_dtype: torch.dtype | None = None) -> Prediction:
    """Classify one video given as ``get_frames(indices) -> (len, H, W, 3) uint8`` and its frame
    count (a ``(T, H, W, 3)`` tensor ``x`` works as ``x.__getitem__, len(x)``)."""
    cfg = model.cfg
    v = make_views(get_frames, n_frames, num_frames=cfg.num_frames, img_size=cfg.img_size,
                   sampling_rate=sampling_rate, views=views)
    probs = predict_views(model, v, batch_size, amp_dtype).cpu()
    if labels is not None and len(labels) != probs.numel():
        raise ValueError(f"{len(labels)} labels for a model of {probs.numel()} classes")
    k = min(topk, probs.numel())
    vals, idx = probs.topk(k)
    top = [(int(i), labels[int(i)] if labels is not None else str(int(i)), float(p)) for p, i in zip(vals, idx)]
    return Prediction(name, top, probs, v.shape[0])


def predict(model: torch.nn.Module, video: str | torch.Tensor, **kw) -> Prediction:
    """Classify a video file (path) or a decoded ``(T, H, W, 3)`` uint8 tensor (keywords of
    ``predict_frames``, plus ``decoder`` for files)."""
    decoder = kw.pop("decoder", "auto")
    if isinstance(video, torch.Tensor):
        if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
            raise ValueError(f"frames must be a (T, H, W, 3) uint8 tensor, got {tuple(video.shape)} {video.dtype}")
        return predict_frames(model, lambda idx: video[idx], video.shape[0], **kw)
    with open_source(video, decoder) as src:
        return predict_frames(model, src.get, len(src), name=kw.pop("name", os.fspath(video)), **kw)


def default_labels(model: torch.nn.Module, hf_config: dict | None = None) -> list[str] | None:
    """The shipped Kinetics names for a 400/600/700/710-class model, a Hugging Face config's
    ``id2label``, else ``None`` (indices are printed)."""
    from ..labels import load_labels

    n = model.num_classes
    id2label = {int(k): str(v) for k, v in ((hf_config or {}).get("id2label") or {}).items()}
    if sorted(id2label) == list(range(n)) and n > 0:
        return [id2label[i] for i in range(n)]
    if n in (400, 600, 700, 710):
        return load_labels(f"k{n}")
    return None


# --------------------------------------------------------------------------- CLI

PROG = "vmae-predict"


def _parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, __doc__)
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (or frame folders)")
    add_model_args(p, "fine-tuned classifier: an official file, or a Hugging Face VideoMAEForVideoClassification "
                      "file or folder")
    p.add_argument("--labels", default=None,
                   help="k400, k600, k700, k710, or a file (one name per line, or JSON); default: by class count")
    p.add_argument("--views", default="5x3", help="temporal clips x spatial crops (official Kinetics test: 5x3)")
    p.add_argument("--sampling-rate", type=int, default=4, help="frame stride of a clip (official Kinetics: 4)")
    p.add_argument("--topk", type=int, default=5, help="labels shown per video")
    p.add_argument("--batch-size", type=int, default=8, help="views per forward pass")
    add_run_args(p)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout, for scripts")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ..labels import load_labels

    try:
        parse_views(args.views)
    except ValueError as exc:
        raise UsageError(f"--views: {exc}") from None
    check_at_least(args, {"sampling_rate": 1, "topk": 1, "batch_size": 1})
    device, amp, device_line = device_and_dtype(args.device, args.dtype)
    try:
        labels = load_labels(args.labels) if args.labels else None
    except (OSError, ValueError) as exc:
        # the library's message names the file already
        raise UsageError(f"--labels: {exc}" if args.labels in str(exc) else f"--labels {args.labels}: {exc}") from None
    hf_config = read_hf_config(args.checkpoint) if os.path.exists(args.checkpoint) else None
    model = load_model_from_args(args, "classifier", hf_config=hf_config)
    if model.num_classes == 0:
        raise UsageError(f"--checkpoint {args.checkpoint} holds no classification head: predict needs a "
                         "fine-tuned classifier")
    model = model.to(device).eval()
    inference_attention(model, device, amp)
    labels = labels if args.labels else default_labels(model, hf_config)
    if labels is not None and len(labels) != model.num_classes:
        raise UsageError(f"--labels gives {len(labels)} names for a model of {model.num_classes} classes")
    say(device_line)
    errors = VideoErrors(PROG, args.debug)
    results = []
    for video in args.videos:
        ok, pred = errors.attempt(video, predict, model, video, labels=labels, views=args.views,
                                  sampling_rate=args.sampling_rate, topk=args.topk, batch_size=args.batch_size,
                                  decoder=args.decoder, amp_dtype=amp)
        if not ok:
            continue
        results.append(pred)
        if not args.json:
            print(f"{video}  ({pred.views} views)")
            width = max(len(label) for _, label, _ in pred.top)
            for rank, (i, label, p) in enumerate(pred.top, 1):
                print(f"  {rank}. {label:<{width}}  {p:.4f}")
    if args.json:
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        print()
    if errors.failed:
        say(f"{PROG}: {len(errors.failed)} of {len(args.videos)} videos failed (each named above); "
            f"{len(results)} classified")
    return errors.exit_status


cli = entry(main, PROG)

if __name__ == "__main__":
    cli()
