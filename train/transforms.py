"""Frame sampling and crops of the official VideoMAE V2 pretraining pipeline, on uint8 tensors.

The choices are the official ones (docs/semantics.md §9), restated: which frames
(``pretrain_frame_ids``), which crop box (``multiscale_crop_boxes`` / ``sample_multiscale_crop``);
only the random source differs (a ``numpy.random.Generator`` per sample instead of the global
``random``/``np.random``), with the same distribution: tests/test_data_semantics.py enumerates
every choice against ``bench/official_pipeline.py``.

The pixels of a box are cut and resized by ``vmae_fast.video.resize.crop_resize`` (uint8 end to
end, no float round trip).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

PRETRAIN_SCALES = (1.0, 0.875, 0.75, 0.66)


# ----------------------------------------------------------------------------- frames
def pretrain_frame_ids(n: int, num_frames: int, rate: int, start: int) -> list[int]:
    """The official frame list from ``start``: ``num_frames`` indices ``rate`` apart, except that
    the index only advances while the next one stays below ``n - 1`` (the official loop steps its
    1-based offset ``o`` while ``o + rate < n``). A clip that runs out repeats its last strided
    index: n=10, 4 frames, rate 4 -> [0, 4, 8, 8] (not [0, 4, 8, 9]); and with rate 1 from the
    last start the final index repeats: n=20, 4 frames -> start 16 gives [16, 17, 18, 18]."""
    out, o = [], start + 1  # the official 1-based offset
    for _ in range(num_frames):
        out.append(o - 1)
        if o + rate < n:
            o += rate
    return out


def pretrain_start(n: int, num_frames: int, rate: int, rng: np.random.Generator) -> int:
    """Uniform over ``0 .. n - num_frames * rate`` (one segment, as the official); 0 when the video
    is shorter than the clip span (it is then padded by ``pretrain_frame_ids``)."""
    room = n - num_frames * rate + 1
    return int(rng.integers(room)) if room > 0 else 0


def pretrain_indices(n: int, num_frames: int, rate: int, rng: np.random.Generator) -> list[int]:
    """The official pretraining frame list of a clip from a random start."""
    return pretrain_frame_ids(n, num_frames, rate, pretrain_start(n, num_frames, rate, rng))


# ----------------------------------------------------------------------------- multi-scale crop
def crop_sizes(width: int, height: int, size: int | tuple[int, int], scales: Sequence[float] = PRETRAIN_SCALES,
               max_distort: int = 1) -> list[tuple[int, int]]:
    """Candidate ``(crop_w, crop_h)``: sides ``int(min(H, W) * scale)`` (snapped to the output size
    when within 2 pixels of it), every pair whose scale steps differ by at most ``max_distort``."""
    out_w, out_h = (size, size) if isinstance(size, int) else size
    base = min(width, height)
    sides = [int(base * s) for s in scales]
    hs = [out_h if abs(s - out_h) < 3 else s for s in sides]
    ws = [out_w if abs(s - out_w) < 3 else s for s in sides]
    return [(w, h) for i, h in enumerate(hs) for j, w in enumerate(ws) if abs(i - j) <= max_distort]


def fixed_offsets(width: int, height: int, crop_w: int, crop_h: int, more_fix_crop: bool = True) -> list[tuple[int, int]]:
    """The official fixed ``(x, y)`` offsets on a 4x4 step grid: 4 corners and the center, and with
    ``more_fix_crop`` the 4 edge middles and the 4 quarter points (13 in all, duplicates kept)."""
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    out = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs)]
    if more_fix_crop:
        out += [(0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
                (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)]
    return out


def multiscale_crop_boxes(width: int, height: int, size, scales=PRETRAIN_SCALES, max_distort: int = 1,
                          fix_crop: bool = True, more_fix_crop: bool = True) -> dict[tuple[int, int, int, int], Fraction]:
    """Every crop box ``(x, y, w, h)`` ``sample_multiscale_crop`` can return, with its exact
    probability: a size pair uniformly, then an offset uniformly (fixed grid or any position)."""
    pairs = crop_sizes(width, height, size, scales, max_distort)
    dist: dict[tuple[int, int, int, int], Fraction] = {}
    for w, h in pairs:
        offs = fixed_offsets(width, height, w, h, more_fix_crop) if fix_crop else \
            [(x, y) for x in range(width - w + 1) for y in range(height - h + 1)]
        for x, y in offs:
            key = (x, y, w, h)
            dist[key] = dist.get(key, Fraction(0)) + Fraction(1, len(pairs) * len(offs))
    return dist


def sample_multiscale_crop(width: int, height: int, size, rng: np.random.Generator, scales=PRETRAIN_SCALES,
                           max_distort: int = 1, fix_crop: bool = True, more_fix_crop: bool = True
                           ) -> tuple[int, int, int, int]:
    """One official ``GroupMultiScaleCrop`` draw: ``(x, y, w, h)``."""
    pairs = crop_sizes(width, height, size, scales, max_distort)
    w, h = pairs[int(rng.integers(len(pairs)))]
    if not fix_crop:
        return int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1)), w, h
    offs = fixed_offsets(width, height, w, h, more_fix_crop)
    x, y = offs[int(rng.integers(len(offs)))]
    return x, y, w, h


def random_resized_box(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Fine-tuning crop box: area fraction in ``scale``, log-uniform aspect in ``ratio``, 10 tries,
    then a center square."""
    area = width * height
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= width and 0 < ch <= height:
            return int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1)), cw, ch
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side
