"""The training dataset (sampling, augmentation), collation and a resumable sampler
(docs/semantics.md §9), on the library's video reading (``vmae_fast.video``).

Entries come from a dataset list (``vmae_fast.video.lists.read_list``, paths relative to
``--data-root``). A path is a video file (``vmae_fast.video.decoders``: torchcodec, decord or PyAV,
``decoder="auto"`` picks the fastest that loads) or a folder of frames named by ``fname_tmpl``
(default ``img_{:05}.jpg``; frame ``i`` is ``fname_tmpl.format(start_idx + i)``). Pretraining
follows the official hybrid dataset's rules: folders whose path contains ``SomethingV2`` are
sampled every 2nd frame and named ``img_{:05}.jpg``, ``AVA2.2`` folders ``image_{:06}.jpg``.

Workers return uint8 clips, cropped and resized as uint8 (``train/transforms.py`` picks the
boxes, ``vmae_fast.video.resize`` cuts them); ``collate`` writes each clip once into a
preallocated batch (in a worker: a staging buffer written into shared memory,
``train/worker_batch.py``; pinned memory in a CUDA process); normalization happens on the device
(the model takes uint8). Fine-tuning's RandAugment runs in the workers on the uint8 frames; its
random erasing is drawn there (boxes, ``batch["erase"]``) and filled on the device
(``train/augment.py``).
Every random choice of a sample comes from a generator seeded by ``(seed, epoch, index)``,
so a sample is the same whatever the worker count, rank or resume point.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch

from vmae_fast.video.decoders import failure_reason, resolve_decoder
from vmae_fast.video.frames import FRAME_PATTERN
from vmae_fast.video.lists import Entry
from vmae_fast.video.resize import crop_resize
from vmae_fast.video.sources import VideoSource
from vmae_fast.video.views import make_views

from .augment import ClipRandAugment, EraseSpec, erase_boxes, parse_rand_augment, to_pil
from .transforms import PRETRAIN_SCALES, pretrain_indices, random_resized_box, sample_multiscale_crop
from .worker_batch import shared_batch

MAX_RETRIES = 10
# The official HybridVideoMAE's per-dataset rules for frame folders: (path marker, frame name
# template, sampling rate or None to keep the configured one).
HYBRID_RULES = (("SomethingV2", "img_{:05}.jpg", 2), ("AVA2.2", "image_{:06}.jpg", None))


# ----------------------------------------------------------------------------- dataset
class VideoDataset(torch.utils.data.Dataset):
    """``mode``: ``"pretrain"`` (official multi-scale crop, no flip), ``"finetune"`` (random resized
    crop + flip; RandAugment and random erasing when asked) or ``"test"`` (``num_segments x
    num_crops`` views).

    ``dataset[(epoch, i)]`` -> dict ``video``: a list of ``V`` uint8 ``(3, T, S, S)`` views
    (``V = num_sample``, or all test views; not contiguous: ``collate`` writes each once into the
    batch), ``label``, ``index``, ``skipped`` (files that failed and were replaced, each named
    once: a file that failed is remembered, in memory shared with the loader's workers, and not
    tried again; the replacement is the same as if it had been).

    ``substitute=False`` (evaluation): a file that fails is not replaced; the sample is then
    ``video=None`` with the entry's ``label`` and ``index`` and the file in ``skipped``
    (``collate`` leaves it out of the batch and marks it in ``loaded``).

    Pretraining options (the official ``GroupMultiScaleCrop`` / ``HybridVideoMAE`` ones):
    ``scales``, ``max_distort``, ``fix_crop``, ``more_fix_crop``; ``fname_tmpl`` for frame
    folders; ``hybrid_rules`` (SomethingV2 / AVA2.2 folders, see ``HYBRID_RULES``). A video shorter
    than the clip span (``num_frames * sampling_rate``) is padded as the official pads it (from
    frame 0, the last strided index repeated); ``skip_short=True`` skips it instead.
    ``decoder``: ``auto`` or a name from ``vmae_fast.video.decoders.DECODERS``, resolved here (once).

    Fine-tuning options (the official ``--aa``, ``--train_interpolation``, ``--reprob``,
    ``--remode``, ``--recount``; off by default here, on by default in ``train.finetune``):
    ``auto_augment``, a RandAugment spec (``rand-m7-n4-mstd0.5-inc1``; None/``none``: off), run on
    the decoded frames of each view before its crop, with ``train_interpolation``; ``erase``, an
    ``EraseSpec`` (None or probability 0: off): each sample then also has ``erase``, a
    ``(V, max_count, 5)`` int64 tensor of boxes that ``train.augment.erase_`` fills on the
    normalized batch (``collate`` carries it as ``batch["erase"]``).
    """

    def __init__(self, entries: list[Entry], mode: str, num_frames: int, sampling_rate: int, img_size: int,
                 num_sample: int = 1, seed: int = 0, scales: Sequence[float] = PRETRAIN_SCALES,
                 min_scale: float = 0.08, num_segments: int = 1, num_crops: int = 1, *, decoder: str = "auto",
                 max_distort: int = 1, fix_crop: bool = True, more_fix_crop: bool = True,
                 fname_tmpl: str = FRAME_PATTERN, hybrid_rules: bool = True, skip_short: bool = False,
                 threads: int = 1, substitute: bool = True, auto_augment: str | None = None,
                 train_interpolation: str = "bicubic", erase: EraseSpec | None = None):
        if mode not in ("pretrain", "finetune", "test"):
            raise ValueError(f"mode must be pretrain, finetune or test, got {mode!r}")
        if num_sample < 1 or num_frames < 1 or sampling_rate < 1:
            raise ValueError("num_sample, num_frames and sampling_rate must be >= 1")
        self.entries, self.mode = entries, mode
        self.num_frames, self.rate, self.size = num_frames, sampling_rate, img_size
        self.num_sample, self.seed, self.scales, self.min_scale = num_sample, seed, tuple(scales), min_scale
        self.num_segments, self.num_crops = num_segments, num_crops
        self.max_distort, self.fix_crop, self.more_fix_crop = max_distort, fix_crop, more_fix_crop
        self.fname_tmpl, self.hybrid_rules, self.skip_short = fname_tmpl, hybrid_rules, skip_short
        try:  # resolved once, here: workers get the name, and the fallback line is said once
            self.decoder = resolve_decoder(decoder)
        except RuntimeError:  # no video decoder at all: frame folders still load, files fail (skipped)
            self.decoder = decoder
        self.threads, self.substitute = threads, substitute
        self.rand_augment = self.erase = None
        if mode == "finetune":  # pretraining and the test views are never augmented so
            spec = parse_rand_augment(auto_augment)
            if spec is not None:
                self.rand_augment = ClipRandAugment(spec, img_size, train_interpolation)
            if erase is not None and erase.probability > 0:
                self.erase = erase
        # Files that failed: shared memory, so a loader's workers (fork or spawn) see each other's.
        self.failed = torch.zeros(len(entries), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.entries)

    def _folder_rules(self, path: str) -> tuple[str, int]:
        if self.mode == "pretrain" and self.hybrid_rules:
            for marker, tmpl, rate in HYBRID_RULES:
                if marker in path:
                    return tmpl, rate or self.rate
        return self.fname_tmpl, self.rate

    def _load(self, entry: Entry, rng: np.random.Generator, src=None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(views, erase boxes or None)``. ``src``: the entry's frames already opened (a shard
        sample, ``train.shard_data``); by default the file or folder is opened here."""
        folder = src.kind == "frames" if src is not None else os.path.isdir(entry.path)
        tmpl, rate = self._folder_rules(entry.path) if folder else (self.fname_tmpl, self.rate)
        if src is None:
            src = VideoSource(entry, self.decoder, tmpl, self.threads)
        try:
            n = len(src)
            if n < 1:
                raise ValueError("no frames")
            if self.skip_short and n < self.num_frames * rate:
                raise ValueError(f"too short: {n} frames, the clip spans {self.num_frames * rate} (skip_short)")
            if self.mode == "test":  # the official test views, as vmae-predict takes them
                return make_views(src.get, n, num_frames=self.num_frames, img_size=self.size, sampling_rate=rate,
                                  views=(self.num_segments, self.num_crops), stack=False), None
            if self.mode == "pretrain":
                frames = src.get(pretrain_indices(n, self.num_frames, rate, rng))
            else:
                span = self.num_frames * rate
                start = int(rng.integers(0, n - span + 1)) if n >= span else 0
                frames = src.get(np.minimum(start + np.arange(self.num_frames) * rate, n - 1))
        finally:
            src.close()
        H, W = frames.shape[1:3]
        views, boxes = [], []
        pil = to_pil(frames) if self.rand_augment is not None else None
        for _ in range(self.num_sample):  # decoded once, augmented and cropped num_sample times
            if self.mode == "pretrain":
                box = sample_multiscale_crop(W, H, self.size, rng, self.scales, self.max_distort,
                                             self.fix_crop, self.more_fix_crop)
                v = crop_resize(frames, box, self.size)
            else:
                # Draws: crop, flip, then RandAugment's seed and the erase boxes, so with both off
                # the crops and flips are those of a run without them. Applied in the official
                # order: RandAugment on the whole frames, crop, flip (erasing on the device).
                box = random_resized_box(W, H, rng, (self.min_scale, 1.0))
                flip = rng.random() < 0.5
                clip = frames
                if self.rand_augment is not None:
                    clip = self.rand_augment.apply_uint8(pil, int(rng.integers(2 ** 32)))
                v = crop_resize(clip, box, self.size)
                if flip:
                    v = v.flip(-1)
                if self.erase is not None:
                    boxes.append(erase_boxes(rng, self.size, self.size, self.erase))
            views.append(v.transpose(0, 1))  # (3, T, S, S) view
        return views, (torch.stack(boxes) if boxes else None)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        skipped = []
        for attempt in range(MAX_RETRIES if self.substitute else 1):
            j = (i + attempt) % len(self.entries)
            entry = self.entries[j]
            if not self.failed[j]:  # a file that failed once is not tried again
                rng = np.random.default_rng([self.seed, epoch, j, attempt])
                try:
                    views, erase = self._load(entry, rng)
                    out = {"video": views, "label": entry.label, "index": j, "skipped": skipped}
                    if erase is not None:
                        out["erase"] = erase
                    return out
                except Exception as exc:  # corrupt, missing or too short: skip, say which, go on
                    warnings.warn(f"skipping video {entry.path}: {failure_reason(exc)}", stacklevel=2)
                    self.failed[j] = True
                    skipped.append(entry.path)
            if not self.substitute:
                return {"video": None, "label": entry.label, "index": j, "skipped": skipped}
        raise RuntimeError(f"{MAX_RETRIES} videos in a row failed to load, starting at {self.entries[i].path}; "
                           "check --data-root and the list")


def _batch_buffer(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """Uninitialized uint8 batch in the main process: in pinned memory when asked (the copy to
    the GPU is then asynchronous and DataLoader's ``pin_memory`` finds it pinned already), else
    plain. (A worker's batch goes to shared memory: ``train/worker_batch.py``.)"""
    if pin:
        return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
    return torch.empty(shape, dtype=torch.uint8)


class Collate:
    """Views are flattened into the batch: ``video`` ``(B*V, 3, T, S, S)`` uint8 (contiguous),
    ``label`` ``(B*V,)``. Each view is copied once into its slot of a preallocated batch (no
    stack, permute or contiguous copies); in a DataLoader worker that batch is a staging buffer
    then written into shared memory in one call (``train/worker_batch.py``). ``pin_memory``:
    ``None`` pins in a process with CUDA (the main process's batches only). ``shared``: the batch
    goes to shared memory, as for the main process; ``None``: inside a DataLoader worker.

    Samples with ``video=None`` (not loaded, ``VideoDataset(substitute=False)``) are left out of
    ``video``, ``label`` and ``index``; ``loaded`` ``(B,)`` bool marks the samples kept (``video``
    is ``None`` when none was). Erase boxes (fine-tuning with random erasing) are concatenated
    like the views: ``erase`` ``(B*V, max_count, 5)`` int64, kept on the CPU."""

    def __init__(self, pin_memory: bool | None = None, shared: bool | None = None):
        self.pin_memory, self.shared = pin_memory, shared

    def __call__(self, samples: list[dict]) -> dict:
        loaded = torch.tensor([s["video"] is not None for s in samples], dtype=torch.bool)
        skipped = [p for s in samples for p in s["skipped"]]
        samples = [s for s in samples if s["video"] is not None]
        if not samples:
            return {"video": None, "label": torch.zeros(0, dtype=torch.int64),
                    "index": torch.zeros(0, dtype=torch.int64), "loaded": loaded, "skipped": skipped}
        views = [list(s["video"]) for s in samples]  # a list of views, or a (V, 3, T, S, S) tensor
        v = len(views[0])
        if any(len(x) != v for x in views):
            raise ValueError("every sample of a batch must have the same number of views")
        flat = [x for vs in views for x in vs]
        shared = torch.utils.data.get_worker_info() is not None if self.shared is None else self.shared
        if shared:  # shared memory, for the main process
            out = shared_batch(flat)
        else:
            pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
            out = _batch_buffer((len(flat), *flat[0].shape), pin)
            for k, view in enumerate(flat):
                out[k].copy_(view)
        batch = {"video": out,
                 "label": torch.tensor([s["label"] for s in samples]).repeat_interleave(v),
                 "index": torch.tensor([s["index"] for s in samples]),
                 "loaded": loaded, "skipped": skipped}
        if "erase" in samples[0]:
            batch["erase"] = torch.cat([s["erase"] for s in samples])
        return batch


collate = Collate()


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
