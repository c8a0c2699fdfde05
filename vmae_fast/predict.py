"""Classify videos with a fine-tuned checkpoint: top-k labels with probabilities, by the official
multi-view test protocol.

    python -m vmae_fast.predict VIDEO... --checkpoint FILE [--labels k400|FILE] [--views 5x3]
                                [--topk 5] [--json]

The protocol (the official fine-tuning code's ``test`` mode for Kinetics, ``--test_num_segment S
--test_num_crop C``; ``5x3`` in its Kinetics scripts), per video:

1. Frames ``0, r, 2r, ...`` of the whole video (``r = --sampling-rate``, 4 for Kinetics), the
   last repeated until there are at least ``num_frames``.
2. Every frame resized so that its short side is ``img_size`` (bilinear without antialiasing,
   as the official ``cv2.INTER_LINEAR``; the long side ``int(img_size * long / short)``).
3. ``S`` temporal clips: clip ``k`` is ``num_frames`` consecutive frames of that list from
   position ``int(k * (L - num_frames) / (S - 1))`` (``L`` its length; from 0 when shorter).
4. ``C`` spatial crops of ``img_size x img_size`` along the long side: crop ``j`` from
   ``int(j * (long - img_size) / (C - 1))``.
5. The softmax of each of the ``S x C`` views' logits, averaged (the official ``prob`` merge).

``S = 1`` or ``C = 1`` (where the official code divides by zero) takes the middle clip / crop.

Steps 1-4 are ``vmae_fast.video.views``. Video files and frame folders are read by
``vmae_fast.video`` (PyAV, torchcodec or decord; the ``train`` extra brings them);
``predict_frames`` takes decoded frames from anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .video.sources import open_source
from .video.views import DEFAULT_VIEWS, make_views

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
    from .labels import load_labels

    n = model.num_classes
    id2label = {int(k): str(v) for k, v in ((hf_config or {}).get("id2label") or {}).items()}
    if sorted(id2label) == list(range(n)) and n > 0:
        return [id2label[i] for i in range(n)]
    if n in (400, 600, 700, 710):
        return load_labels(f"k{n}")
    return None


# --------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vmae_fast.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (or frame folders)")
    p.add_argument("--checkpoint", required=True,
                   help="fine-tuned classifier: an official file, or a Hugging Face VideoMAEForVideoClassification "
                        "file or folder")
    p.add_argument("--labels", default=None,
                   help="k400, k600, k700, k710, or a file (one name per line, or JSON); default: by class count")
    p.add_argument("--views", default="5x3", help="temporal clips x spatial crops (official Kinetics test: 5x3)")
    p.add_argument("--sampling-rate", type=int, default=4, help="frame stride of a clip (official Kinetics: 4)")
    p.add_argument("--num-frames", type=int, default=None, help="frames per clip (default 16, or the HF config's)")
    p.add_argument("--img-size", type=int, default=None, help="crop size (default 224, or the HF config's)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (default: those of the named arch of the checkpoint's width)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="views per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--decoder", default="auto", help="video decoder (vmae_fast.video: auto, pyav, torchcodec, decord)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout, for scripts")
    return p


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype | None]:
    """``--device`` and ``--dtype`` (``auto``: bf16 on CUDA, else fp32) of an inference CLI ->
    ``(device, autocast dtype or None)``."""
    from .device import select_device

    dev = select_device(device)  # validated; a cuda:N device becomes the current one
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return dev, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _read_hf_config(checkpoint: str) -> dict | None:
    path = os.path.join(checkpoint, "config.json") if os.path.isdir(checkpoint) else \
        os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        if cfg.get("model_type") == "videomae":
            return cfg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .labels import load_labels
    from .models.factory import load_model

    hf_config = _read_hf_config(args.checkpoint)
    extra = {"num_heads": args.num_heads} if args.num_heads else {}
    model = load_model(args.checkpoint, "classifier", num_frames=args.num_frames, img_size=args.img_size,
                       hf_config=hf_config, **extra)
    if model.num_classes == 0:
        raise SystemExit(f"{args.checkpoint} holds no classification head: predict needs a fine-tuned classifier")
    device, amp = device_and_dtype(args.device, args.dtype)
    model = model.to(device).eval()
    labels = load_labels(args.labels) if args.labels else default_labels(model, hf_config)
    if labels is not None and len(labels) != model.num_classes:
        raise SystemExit(f"--labels gives {len(labels)} names for a model of {model.num_classes} classes")
    results = []
    for video in args.videos:
        pred = predict(model, video, labels=labels, views=args.views, sampling_rate=args.sampling_rate,
                       topk=args.topk, batch_size=args.batch_size, decoder=args.decoder, amp_dtype=amp)
        results.append(pred)
        if not args.json:
            print(f"{video}  ({pred.views} views)")
            width = max(len(label) for _, label, _ in pred.top)
            for rank, (i, label, p) in enumerate(pred.top, 1):
                print(f"  {rank}. {label:<{width}}  {p:.4f}")
    if args.json:
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
