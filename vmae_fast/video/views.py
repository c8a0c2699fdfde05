"""The official multi-view test protocol's views of one video (the official fine-tuning code's
``test`` mode for Kinetics, ``--test_num_segment S --test_num_crop C``; ``5x3`` in its Kinetics
scripts), as ``vmae-predict`` and ``vmae-finetune --eval`` both take them:

1. Frames ``0, r, 2r, ...`` of the whole video (``r`` the sampling rate, 4 for Kinetics), the
   last repeated until there are at least ``num_frames``.
2. Every frame resized so that its short side is ``img_size`` (bilinear without antialiasing,
   as the official ``cv2.INTER_LINEAR``; the long side ``int(img_size * long / short)``;
   ``vmae_fast.video.resize.resize_frames``).
3. ``S`` temporal clips: clip ``k`` is ``num_frames`` consecutive frames of that list from
   position ``int(k * (L - num_frames) / (S - 1))`` (``L`` its length; from 0 when shorter).
4. ``C`` spatial crops of ``img_size x img_size`` along the long side: crop ``j`` from
   ``int(j * (long - img_size) / (C - 1))``.

``S = 1`` or ``C = 1`` (where the official code divides by zero) takes the middle clip / crop.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .resize import resize_frames

DEFAULT_VIEWS = (5, 3)


def parse_views(spec: str | Sequence[int]) -> tuple[int, int]:
    """``"5x3"`` -> ``(5, 3)``: temporal clips x spatial crops."""
    if isinstance(spec, str):
        parts = spec.lower().split("x")
        try:
            s, c = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"views must look like '5x3' (temporal clips x spatial crops), got {spec!r}") from None
    else:
        s, c = spec
    if s < 1 or c < 1:
        raise ValueError(f"views need at least 1 clip and 1 crop, got {s}x{c}")
    return int(s), int(c)


def clip_frame_indices(n_frames: int, num_frames: int, sampling_rate: int, num_clips: int) -> list[list[int]]:
    """Frame indices of the ``num_clips`` temporal clips (steps 1 and 3 of the module docstring)."""
    if n_frames < 1:
        raise ValueError("the video has no frames")
    if num_frames < 1 or sampling_rate < 1 or num_clips < 1:
        raise ValueError("num_frames, sampling_rate and num_clips must be >= 1")
    frames = list(range(0, n_frames, sampling_rate))
    while len(frames) < num_frames:
        frames.append(frames[-1])
    room = len(frames) - num_frames
    if num_clips == 1:
        starts = [room // 2]
    else:
        step = max(room / (num_clips - 1), 0.0)
        starts = [int(k * step) for k in range(num_clips)]
    return [frames[s:s + num_frames] for s in starts]


def crop_offsets(height: int, width: int, size: int, num_crops: int) -> list[tuple[int, int]]:
    """``(top, left)`` of the ``num_crops`` crops of a frame already resized to short side
    ``size`` (step 4 of the module docstring)."""
    long_side = max(height, width)
    if num_crops == 1:
        starts = [(long_side - size) // 2]
    else:
        step = (long_side - size) / (num_crops - 1)
        starts = [int(j * step) for j in range(num_crops)]
    return [(s, 0) if height >= width else (0, s) for s in starts]


def make_views(get_frames: Callable[[list[int]], torch.Tensor], n_frames: int, *, num_frames: int,
               img_size: int, sampling_rate: int = 4, views: str | Sequence[int] = DEFAULT_VIEWS,
               stack: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """The ``S x C`` views of one video as a uint8 batch ``(S*C, 3, num_frames, img_size, img_size)``,
    clip-major (view ``k*C + j`` = clip ``k``, crop ``j``). ``get_frames(indices)`` returns those
    frames as ``(len, H, W, 3)`` uint8; each needed frame is asked for and resized once.
    ``stack=False``: the views as a list of (strided) crops, for a caller that copies them into
    its own batch anyway (the training loader's collate)."""
    s, c = parse_views(views)
    clips = clip_frame_indices(n_frames, num_frames, sampling_rate, s)
    needed = sorted({i for clip in clips for i in clip})
    resized = resize_frames(get_frames(needed), img_size)  # (n, 3, h, w)
    pos = {f: i for i, f in enumerate(needed)}
    h, w = resized.shape[-2:]
    out = []
    for clip in clips:
        x = resized[[pos[f] for f in clip]]  # (T, 3, h, w)
        for top, left in crop_offsets(h, w, img_size, c):
            out.append(x[:, :, top:top + img_size, left:left + img_size].transpose(0, 1))
    return torch.stack(out) if stack else out
