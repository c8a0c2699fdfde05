"""Video lists, decoding, augmentation and a resumable sampler (docs/semantics.md §9).

Lists, paths relative to ``--data-root``:
    pretraining  ``path start_idx total_frames``  (``total_frames`` -1 for a video file)
    fine-tuning  ``path label``
A path is a video file (decord, or PyAV when decord is missing) or a folder of frames named
``img_{:05}.jpg`` (frame ``i`` is ``pattern.format(start_idx + i)``).

Workers return uint8 clips; normalization happens on the device (the model takes uint8).
Every random choice of a sample comes from a generator seeded by ``(seed, epoch, index)``,
so a sample is the same whatever the worker count, rank or resume point.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PRETRAIN_SCALES = (1.0, 0.875, 0.75, 0.66)
FRAME_PATTERN = "img_{:05}.jpg"
MAX_RETRIES = 10

try:  # decord is the official decoder; PyAV is the fallback
    import decord as _decord

    _decord.bridge.set_bridge("native")
except Exception:  # pragma: no cover - depends on the install
    _decord = None


# ----------------------------------------------------------------------------- list files
@dataclass(frozen=True)
class Entry:
    path: str            # absolute path (data root joined)
    start_idx: int = 0
    total_frames: int = -1  # -1: count from the file
    label: int = -1


def _fail(list_path, lineno, expected, line, why=""):
    raise ValueError(f"{list_path}:{lineno}: expected '{expected}'{', ' + why if why else ''}; "
                     f"got {line.rstrip()!r}")


def read_list(list_path: str | os.PathLike, data_root: str | os.PathLike = "", kind: str = "pretrain") -> list[Entry]:
    """Parse a dataset list; any bad line raises ``ValueError`` naming the file and line number.

    ``kind="pretrain"``: ``path start_idx total_frames``; ``kind="finetune"``: ``path label``.
    Paths may contain spaces (the numbers are split off the right).
    """
    if kind not in ("pretrain", "finetune"):
        raise ValueError(f"list kind must be 'pretrain' or 'finetune', got {kind!r}")
    list_path = Path(list_path)
    if not list_path.is_file():
        raise FileNotFoundError(f"dataset list not found: {list_path}")
    expected = "<path> <start_idx> <total_frames>" if kind == "pretrain" else "<path> <label>"
    nfields = 3 if kind == "pretrain" else 2
    out = []
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(maxsplit=nfields - 1)
            if len(parts) != nfields:
                _fail(list_path, lineno, expected, line, f"{nfields} fields")
            try:
                nums = [int(p) for p in parts[1:]]
            except ValueError:
                _fail(list_path, lineno, expected, line, "integer fields")
            path = os.path.join(data_root, parts[0]) if data_root else parts[0]
            if kind == "pretrain":
                start, total = nums
                if start < 0 or total < -1 or total == 0:
                    _fail(list_path, lineno, expected, line, "start_idx >= 0 and total_frames > 0 or -1")
                out.append(Entry(path, start, total))
            else:
                if nums[0] < 0:
                    _fail(list_path, lineno, expected, line, "a label >= 0")
                out.append(Entry(path, label=nums[0]))
    if not out:
        raise ValueError(f"{list_path}: the dataset list is empty")
    return out


# ----------------------------------------------------------------------------- decoding
_warned_pyav = False


def decoder_name() -> str:
    return "decord" if _decord is not None else "pyav"


def _warn_pyav_once():
    global _warned_pyav
    if not _warned_pyav:
        _warned_pyav = True
        warnings.warn("decord is not installed; decoding with PyAV (slower). "
                      "`pip install decord` for the official decoder.", stacklevel=3)


class VideoSource:
    """Random access to the frames of one entry: ``len(src)`` and ``src.get(indices)`` ->
    ``(len(indices), H, W, 3)`` uint8 numpy."""

    def __init__(self, entry: Entry):
        self.entry = entry
        p = entry.path
        if os.path.isdir(p):
            self.kind = "frames"
            n = entry.total_frames if entry.total_frames > 0 else len(
                [f for f in os.listdir(p) if f.lower().endswith((".jpg", ".jpeg", ".png"))])
            self.n = n
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"no such video or frame folder: {p}")
        elif _decord is not None:
            self.kind = "decord"
            self.vr = _decord.VideoReader(p, num_threads=1, ctx=_decord.cpu(0))
            self.n = len(self.vr)
        else:
            _warn_pyav_once()
            self.kind = "pyav"
            self.n, self._frames = None, None
            import av

            with av.open(p) as c:  # PyAV: decode the whole (short) clip once
                self._frames = [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]
            self.n = len(self._frames)
        if self.kind != "frames" and entry.total_frames > 0:
            self.n = min(self.n, entry.start_idx + entry.total_frames)

    def __len__(self) -> int:
        return self.n

    def get(self, indices: Sequence[int]) -> np.ndarray:
        idx = [int(i) for i in indices]
        if self.kind == "decord":
            return self.vr.get_batch(idx).asnumpy()
        if self.kind == "pyav":
            return np.stack([self._frames[i] for i in idx])
        from PIL import Image

        frames = []
        for i in idx:
            with Image.open(os.path.join(self.entry.path, FRAME_PATTERN.format(self.entry.start_idx + i))) as im:
                frames.append(np.asarray(im.convert("RGB")))
        return np.stack(frames)


def sample_indices(n: int, num_frames: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """``num_frames`` indices ``rate`` apart from a random start; past the end the last frame
    repeats (as the official loader does for short videos)."""
    span = num_frames * rate
    start = int(rng.integers(0, n - span + 1)) if n >= span else 0
    return np.minimum(start + np.arange(num_frames) * rate, n - 1)


def segment_indices(n: int, num_frames: int, rate: int, num_segments: int) -> list[np.ndarray]:
    """Evenly spaced clips for multi-view testing (official ``test_num_segment``)."""
    span = num_frames * rate
    room = max(n - span, 0)
    starts = [int(round(room * (k + 0.5) / num_segments)) if num_segments > 1 else room // 2
              for k in range(num_segments)]
    return [np.minimum(s + np.arange(num_frames) * rate, n - 1) for s in starts]


# ----------------------------------------------------------------------------- augmentation
def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(T, 3, h, w)`` uint8 -> ``(T, 3, *size)`` uint8, bilinear with antialias (as PIL)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def multi_scale_crop(x: torch.Tensor, size: int, rng: np.random.Generator,
                     scales: Sequence[float] = PRETRAIN_SCALES, max_distort: int = 1) -> torch.Tensor:
    """Official pretraining crop (GroupMultiScaleCrop, fix_crop, more_fix_crop): a crop of
    ``base * scale`` per side (sides within ``max_distort`` scale steps), at one of 13 fixed
    offsets, resized to ``size x size``. ``x``: ``(T, 3, H, W)``."""
    H, W = x.shape[-2:]
    base = min(H, W)
    sides = [int(base * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    cw, ch = pairs[int(rng.integers(len(pairs)))]
    ws, hs = (W - cw) // 4, (H - ch) // 4
    offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),
               (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
               (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)]
    ox, oy = offsets[int(rng.integers(len(offsets)))]
    return _resize(x[..., oy:oy + ch, ox:ox + cw], (size, size))


def random_resized_crop(x: torch.Tensor, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Fine-tuning crop: area fraction in ``scale``, log-uniform aspect in ``ratio`` (10 tries,
    then a center crop), resized to ``size``, horizontal flip with p=0.5. ``x``: ``(T, 3, H, W)``."""
    H, W = x.shape[-2:]
    area = H * W
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= W and 0 < ch <= H:
            oy, ox = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
            break
    else:
        ch = cw = min(H, W)
        oy, ox = (H - ch) // 2, (W - cw) // 2
    out = _resize(x[..., oy:oy + ch, ox:ox + cw], (size, size))
    if flip and rng.random() < 0.5:
        out = out.flip(-1)
    return out


def test_crops(x: torch.Tensor, size: int, num_crops: int) -> list[torch.Tensor]:
    """Short side to ``size``, then ``num_crops`` crops spread along the long side (1: center)."""
    H, W = x.shape[-2:]
    s = size / min(H, W)
    x = _resize(x, (max(size, round(H * s)), max(size, round(W * s))))
    H, W = x.shape[-2:]
    out = []
    for k in range(num_crops):
        f = 0.5 if num_crops == 1 else k / (num_crops - 1)
        oy, ox = (int(round((H - size) * f)), (W - size) // 2) if H > W else ((H - size) // 2, int(round((W - size) * f)))
        out.append(x[..., oy:oy + size, ox:ox + size])
    return out


# ----------------------------------------------------------------------------- dataset
class VideoDataset(torch.utils.data.Dataset):
    """``mode``: ``"pretrain"`` (multi-scale crop, no flip), ``"finetune"`` (random resized crop +
    flip) or ``"test"`` (``num_segments x num_crops`` views).

    ``dataset[(epoch, i)]`` -> dict ``video`` uint8 ``(V, 3, T, S, S)`` (``V = num_sample`` views,
    or all test views), ``label``, ``index``, ``skipped`` (files that failed and were replaced).
    """

    def __init__(self, entries: list[Entry], mode: str, num_frames: int, sampling_rate: int, img_size: int,
                 num_sample: int = 1, seed: int = 0, scales: Sequence[float] = PRETRAIN_SCALES,
                 min_scale: float = 0.08, num_segments: int = 1, num_crops: int = 1):
        if mode not in ("pretrain", "finetune", "test"):
            raise ValueError(f"mode must be pretrain, finetune or test, got {mode!r}")
        if num_sample < 1 or num_frames < 1 or sampling_rate < 1:
            raise ValueError("num_sample, num_frames and sampling_rate must be >= 1")
        self.entries, self.mode = entries, mode
        self.num_frames, self.rate, self.size = num_frames, sampling_rate, img_size
        self.num_sample, self.seed, self.scales, self.min_scale = num_sample, seed, tuple(scales), min_scale
        self.num_segments, self.num_crops = num_segments, num_crops

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, entry: Entry, rng: np.random.Generator) -> torch.Tensor:
        src = VideoSource(entry)
        if len(src) < self.num_frames:
            raise ValueError(f"too short: {len(src)} frames, need at least {self.num_frames}")
        off = entry.start_idx if src.kind != "frames" else 0
        if self.mode == "test":
            views = []
            for idx in segment_indices(len(src) - off, self.num_frames, self.rate, self.num_segments):
                x = torch.from_numpy(src.get(idx + off)).permute(0, 3, 1, 2)  # (T, 3, H, W)
                views += test_crops(x, self.size, self.num_crops)
        else:
            idx = sample_indices(len(src) - off, self.num_frames, self.rate, rng)
            x = torch.from_numpy(src.get(idx + off)).permute(0, 3, 1, 2)
            crop = (lambda v: multi_scale_crop(v, self.size, rng, self.scales)) if self.mode == "pretrain" \
                else (lambda v: random_resized_crop(v, self.size, rng, (self.min_scale, 1.0)))
            views = [crop(x) for _ in range(self.num_sample)]  # decode once, several clips
        return torch.stack(views).permute(0, 2, 1, 3, 4).contiguous()  # (V, 3, T, S, S)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        skipped = []
        for attempt in range(MAX_RETRIES):
            j = (i + attempt) % len(self.entries)
            entry = self.entries[j]
            rng = np.random.default_rng([self.seed, epoch, j, attempt])
            try:
                video = self._load(entry, rng)
            except Exception as exc:  # corrupt, missing or too short: skip, say which, go on
                warnings.warn(f"skipping video {entry.path}: {type(exc).__name__}: {exc}", stacklevel=2)
                skipped.append(entry.path)
                continue
            return {"video": video, "label": entry.label, "index": j, "skipped": skipped}
        raise RuntimeError(f"{MAX_RETRIES} videos in a row failed to load, starting at {self.entries[i].path}; "
                           "check --data-root and the list")


def collate(samples: list[dict]) -> dict:
    """Views are flattened into the batch: ``video`` ``(B*V, 3, T, S, S)`` uint8, ``label`` ``(B*V,)``."""
    videos = torch.stack([s["video"] for s in samples])
    v = videos.shape[1]
    return {"video": videos.flatten(0, 1),
            "label": torch.tensor([s["label"] for s in samples]).repeat_interleave(v),
            "index": torch.tensor([s["index"] for s in samples]),
            "skipped": [p for s in samples for p in s["skipped"]]}


# ----------------------------------------------------------------------------- sampling
class StepSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` for this rank, ``per_rank`` items per micro-batch, from optimizer
    step ``start_step`` on. Epoch ``e`` is a permutation seeded by ``seed + e`` cut into global
    micro-batches of ``per_rank * world`` items; rank ``r`` takes slice ``r`` of each. So the
    union over ranks equals a single process's batch of the same global size, and resuming at a
    step replays exactly the batches an uninterrupted run would have seen."""

    def __init__(self, n: int, per_rank: int, accum: int, world: int, rank: int, seed: int,
                 start_step: int, total_steps: int, shuffle: bool = True):
        self.n, self.per_rank, self.accum, self.world, self.rank = n, per_rank, accum, world, rank
        self.seed, self.start, self.total, self.shuffle = seed, start_step, total_steps, shuffle
        self.global_micro = per_rank * world
        self.micro_per_epoch = n // self.global_micro
        if self.micro_per_epoch < accum:
            raise ValueError(f"the dataset has {n} videos, fewer than one optimizer step needs "
                             f"({self.global_micro * accum} = batch x world x accumulation)")
        self.steps_per_epoch = self.micro_per_epoch // accum

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batch in epoch) of optimizer step ``step``'s first micro-batch."""
        return divmod(step, self.steps_per_epoch)[0], (step % self.steps_per_epoch) * self.accum

    def __len__(self) -> int:
        return max(self.total - self.start, 0) * self.accum * self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start
        while step < self.total:
            epoch, micro = self.position(step)
            if self.shuffle:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            else:
                perm = list(range(self.n))
            for m in range(micro, self.steps_per_epoch * self.accum):
                lo = m * self.global_micro + self.rank * self.per_rank
                for i in perm[lo:lo + self.per_rank]:
                    yield epoch, i
                if (m + 1) % self.accum == 0:
                    step += 1
                    if step >= self.total:
                        return
