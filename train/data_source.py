"""Where the training loop's batches come from: a dataset list (``ListSource``: one file per
sample, ``StepSampler``) or WebDataset shards (``ShardSource``: ``--shards``, streamed). The
trainer sees only this interface:

    source.steps_per_epoch(cfg, d)    optimizer steps an epoch (the lr schedule's unit); a
                                      ``ValueError`` when the data is less than one step
    source.position                   the state set's "data" piece (state_dict/load_state_dict;
                                      loaded, on a resume, before ``batches``)
    source.batches(cfg, d, start, total)   micro-batches from optimizer step ``start``
    source.took(batch, step)          the trainer took ``batch`` for optimizer step ``step`` (0-based)
    source.epoch(done)                the epoch of the last step done (metrics)
    source.close()
"""
from __future__ import annotations

import math
import warnings
from typing import Iterator

import torch

from vmae_fast.video.shards import sample_key

from . import distributed as dist_
from .data import Collate, StepSampler, collate
from .signals import ignore_in_worker
from .state import DataPosition


class _LoggedSource:
    """The ``--log-samples`` log of a source (``log_dir``; none when ``None``): opened by
    ``batches`` as they start (lines of steps after ``start`` dropped: a resume redoes them),
    written by ``took``, closed by ``close``. The one place both sources keep it."""

    log_dir: str | None = None
    log = None

    def _open_log(self, d, start: int) -> None:
        self.close()  # batches() again: the previous log first
        if self.log_dir:
            from .shard_data import SampleLog

            self.log = SampleLog(self.log_dir, d.rank, keep_until=start)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class ListSource(_LoggedSource):
    """One sample a file, from ``VideoDataset``: the ``StepSampler`` replays exactly the batches
    of an uninterrupted run from any step (the position is the step, ``state.DataPosition``)."""

    def __init__(self, dataset, seed: int, log_dir: str | None = None):
        self.dataset, self.log_dir = dataset, log_dir
        self.position = DataPosition(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def _sampler(self, cfg, d, start: int, total: int) -> StepSampler:
        return StepSampler(len(self.dataset), cfg.batch_size, cfg.accum_steps, d.world, d.rank, cfg.seed, start, total)

    def steps_per_epoch(self, cfg, d) -> int:
        return self._sampler(cfg, d, 0, 1).steps_per_epoch

    def batches(self, cfg, d, start: int, total: int) -> Iterator[dict]:
        # The loader has its own generator: making an iterator draws worker seeds from it, and
        # drawing them from the global stream would shift drop path after a resume.
        sampler = self._sampler(cfg, d, start, total)
        self.position.sampler, self.position.step = sampler, start
        self._open_log(d, start)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=sampler,
                                             drop_last=True, num_workers=cfg.num_workers, collate_fn=collate,
                                             pin_memory=d.device.type == "cuda",
                                             prefetch_factor=4 if cfg.num_workers else None,
                                             worker_init_fn=ignore_in_worker if cfg.num_workers else None,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        return iter(loader)

    def took(self, batch: dict, step: int) -> None:
        if self.log is not None:  # a list sample's key is its line's, as in the shards
            epoch = self.position.sampler.position(step)[0]
            self.log.write(step + 1, epoch, [sample_key(int(i)) for i in batch["index"]])

    def epoch(self, done: int) -> int:
        return self.position.sampler.position(done - 1)[0]


class ShardPiece:
    """The "data" piece of a run on shards: every rank's ``ShardPosition`` (gathered: rank 0
    writes the checkpoint), and, after a load, what each rank resumes from."""

    def __init__(self, seed: int):
        self.seed, self.step = seed, 0
        self.current = None   # ShardPosition, once the loader exists
        self.d = None
        self.saved: list[dict] | None = None

    def state_dict(self) -> dict:
        # "step": what a list run resumed from this checkpoint reads (state.DataPosition)
        return {"shards": dist_.gather_objects(self.current.state_dict(), self.d), "seed": self.seed,
                "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.saved = state.get("shards")
        if self.saved is None:
            warnings.warn("the checkpoint was written by a run reading a list, not shards: the shards start at "
                          "epoch 0", stacklevel=3)


class ShardSource(_LoggedSource):
    """Streamed from WebDataset shards (``train/shard_data.py``). ``dataset``: the
    ``VideoDataset`` whose options load each sample; ``log_dir``: ``--log-samples``' folder."""

    def __init__(self, shards, dataset, seed: int, buffer: int, log_dir: str | None = None):
        self.shards, self.dataset, self.buffer, self.log_dir = shards, dataset, buffer, log_dir
        self.position = ShardPiece(seed)

    def __len__(self) -> int:
        return self.shards.total

    def steps_per_epoch(self, cfg, d) -> int:
        per_rank = math.ceil(self.shards.total / d.world)
        steps = per_rank // (cfg.batch_size * cfg.accum_steps)
        if steps < 1:
            raise ValueError(f"--shards: {self.shards.total} samples over {d.world} rank(s) give {per_rank} a rank, "
                             f"fewer than one optimizer step needs ({cfg.batch_size} x {cfg.accum_steps} "
                             "accumulation)")
        return steps

    def batches(self, cfg, d, start: int, total: int) -> Iterator[dict]:
        from .shard_data import ShardPosition, ShardStream, make_loader, resume_start

        piece = self.position
        begin, why = resume_start(piece.saved, d.rank, d.world, cfg.num_workers, cfg.seed)
        if why and d.main:
            warnings.warn(why, stacklevel=2)
        piece.d, piece.current = d, ShardPosition(d.world, cfg.num_workers, cfg.seed, begin)
        stream = ShardStream(self.shards, self.dataset, d.world, d.rank, cfg.num_workers, cfg.seed,
                             self.buffer, begin)
        self._open_log(d, start)
        return iter(make_loader(stream, cfg.batch_size, Collate(), cfg.num_workers, d.device.type == "cuda",
                                cfg.seed))

    def took(self, batch: dict, step: int) -> None:
        self.position.current.take(batch)
        if self.log is not None:  # a worker's batch may end one epoch and begin the next: a line each
            for epoch in sorted(set(batch["epochs"])):
                self.log.write(step + 1, epoch, [k for k, e in zip(batch["keys"], batch["epochs"]) if e == epoch])

    def epoch(self, done: int) -> int:
        return self.position.current.epoch


def source_of(dataset, seed: int) -> ListSource | ShardSource:
    return dataset if isinstance(dataset, (ListSource, ShardSource)) else ListSource(dataset, seed)
