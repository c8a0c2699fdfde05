"""Training from WebDataset shards (``--shards``): the same samples as from the list's files.

A shard sample (``vmae_fast/video/shards.py``) is decoded from its bytes in memory by the decoder
``--decoder`` names and goes through ``VideoDataset``'s own loading (clip indices, crops, flips,
RandAugment, erase boxes), with the random generator of list line ``index``: the frames are bit
for bit those of ``VideoDataset(...)[(epoch, index)]`` on the file (tests/test_shards.py).

``ShardStream`` is the ``IterableDataset``: each (rank, worker) reads its part of every epoch
(``vmae_fast.shards.EpochLayout``), epoch after epoch without end; each batch comes from one worker
and carries that worker's position after it. ``ShardPosition`` keeps, in the main process, the
position of every worker up to the last batch taken: that is the state a checkpoint holds, and a
resume restarts each worker there, so a stopped and resumed run visits exactly the samples the
epoch had left. A sample that does not decode, or that a truncated shard does not deliver, is
skipped (counted in ``batch["skipped"]``, named once in a warning) and the next one taken.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Iterator

import numpy as np
import torch

from vmae_fast.video import shards as fmt
from vmae_fast.video.decoders import failure_reason
from vmae_fast.video.lists import Entry

from .data import Collate, VideoDataset
from .metrics import truncate_jsonl


def load_sample(ds: VideoDataset, sample: dict, epoch: int) -> dict:
    """``ds[(epoch, index)]`` for a shard sample (``index`` from its JSON); raises on a sample
    that does not decode (no substitution: the stream takes its next sample instead)."""
    meta = fmt.meta_of(sample)
    index = int(meta["index"])
    entry = Entry(meta["path"], int(meta.get("start_idx", 0)), int(meta.get("total_frames", -1)),
                  int(meta.get("label", -1)))
    rng = np.random.default_rng([ds.seed, epoch, index, 0])  # VideoDataset's draw for attempt 0
    src = fmt.SampleSource(sample, meta, ds.decoder, ds.threads)
    views, erase = ds._load(entry, rng, src)
    out = {"video": views, "label": entry.label, "index": index, "skipped": [], "key": sample["__key__"],
           "epoch": epoch}
    if erase is not None:
        out["erase"] = erase
    return out


# ----------------------------------------------------------------------------- the stream
def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's samples of every epoch from ``start`` (``ShardPosition.start_for``) on, without
    end. ``dataset``: the ``VideoDataset`` whose options (mode, sizes, augmentation, decoder,
    seed) load each sample; its entries are not used."""

    def __init__(self, shards: fmt.ShardSet, dataset: VideoDataset, world: int, rank: int, workers: int,
                 seed: int, buffer: int = 64, start: dict | None = None, shuffle: bool = True):
        self.shards, self.dataset, self.world, self.rank = shards, dataset, world, rank
        self.workers, self.seed, self.buffer, self.shuffle = max(1, workers), seed, buffer, shuffle
        self.start = start or {"first": 0, "roles": {}}

    def layout(self, epoch: int) -> fmt.EpochLayout:
        return fmt.EpochLayout(self.shards.counts, self.world, self.seed, epoch, self.shuffle)

    def per_rank(self) -> int:
        return self.layout(0).per_rank

    def __iter__(self) -> Iterator[dict]:
        wid, n = _worker()
        if n != self.workers:
            raise RuntimeError(f"ShardStream was made for {self.workers} workers, the loader has {n}")
        # The worker that gives the loader's next batch plays the role whose turn it was when the
        # position was taken, so batches come in the order of an uninterrupted run.
        role = (wid + self.start["first"]) % self.workers
        epoch, at = self.start["roles"].get(role, (0, 0))
        while True:
            part = fmt.PartStream(self.shards, self.layout(epoch), self.rank, role, self.workers, self.buffer)
            for pos, sample in part.iter_from(at):
                out = self._decode(sample, epoch)
                if out is None:  # named by its key (or shard#index): counted once over epochs
                    yield {"skip": sample.get("__lost__") or sample.get("__key__"), "role": role, "epoch": epoch,
                           "pos": pos}
                    continue
                out.update(role=role, pos=pos)
                yield out
            epoch, at = epoch + 1, 0

    def _decode(self, sample: dict, epoch: int) -> dict | None:
        if "__lost__" in sample:  # the shard did not deliver it (already warned, by shard)
            return None
        try:
            return load_sample(self.dataset, sample, epoch)
        except Exception as exc:  # corrupt member: skip, say which, go on
            warnings.warn(f"skipping shard sample {sample.get('__key__')} of {sample.get('__url__')}: "
                          f"{failure_reason(exc)}", stacklevel=2)
            return None


class SkipAware(torch.utils.data.IterableDataset):
    """Groups a ``ShardStream``'s samples into batches of ``batch_size`` inside the worker: a
    skipped sample takes no slot, but is counted (``skipped``) and moves the position."""

    def __init__(self, stream: ShardStream, batch_size: int, collate: Collate):
        self.stream, self.batch_size, self.collate = stream, batch_size, collate

    def __iter__(self):
        batch, skipped = [], []
        for s in self.stream:
            if s.get("skip"):
                skipped.append(s["skip"])
                continue
            batch.append(s)
            if len(batch) == self.batch_size:
                out = self.collate(batch)
                last = batch[-1]
                out.update(keys=[b["key"] for b in batch], epochs=[b["epoch"] for b in batch],
                           position=(last["role"], last["epoch"], last["pos"]))
                out["skipped"] = out["skipped"] + skipped
                yield out
                batch, skipped = [], []


class ShardPosition:
    """Every worker role's ``(epoch, position)`` after the last batch this process took, and
    whose batch comes next. ``state_dict``/``load_state_dict``: what a checkpoint keeps."""

    def __init__(self, world: int, workers: int, seed: int, start: dict | None = None):
        self.world, self.workers, self.seed = world, max(1, workers), seed
        start = start or {"first": 0, "roles": {}}
        self.roles = {int(k): tuple(v) for k, v in start["roles"].items()}
        self.first = start["first"]
        self.next = self.first
        self.epoch = min((e for e, _ in self.roles.values()), default=0)

    def take(self, batch: dict) -> None:
        role, epoch, pos = batch["position"]
        self.roles[role] = (epoch, pos)
        self.next = (role + 1) % self.workers
        self.epoch = epoch

    def start_for_stream(self) -> dict:
        return {"first": self.next, "roles": dict(self.roles)}

    def state_dict(self) -> dict:
        return {"world": self.world, "workers": self.workers, "seed": self.seed, "first": self.next,
                "roles": {str(k): list(v) for k, v in self.roles.items()}}


def resume_start(states: list[dict] | None, rank: int, world: int, workers: int, seed: int) -> tuple[dict, str]:
    """The stream start of rank ``rank`` from every rank's saved ``ShardPosition.state_dict()``
    (None: a fresh run), and a line to say when the layout changed."""
    fresh = {"first": 0, "roles": {}}
    if not states:
        return fresh, ""
    s0 = states[0]
    if len(states) == world and s0["world"] == world and s0["workers"] == max(1, workers) and s0["seed"] == seed:
        s = states[rank]
        return {"first": s["first"], "roles": {int(k): tuple(v) for k, v in s["roles"].items()}}, ""
    # Another world size, worker count or seed splits the epoch otherwise: restart the earliest
    # epoch still in progress from its start (its samples already seen are seen again).
    epoch = min((int(v[0]) for s in states for v in s["roles"].values()), default=0)
    roles = {r: (epoch, 0) for r in range(max(1, workers))}
    return {"first": 0, "roles": roles}, (
        f"the data position was saved with world {s0['world']} x {s0['workers']} workers (seed {s0['seed']}), "
        f"this run has {world} x {max(1, workers)} (seed {seed}): epoch {epoch} restarts from its start")


def make_loader(stream: ShardStream, batch_size: int, collate: Collate, num_workers: int, pin: bool,
                seed: int) -> torch.utils.data.DataLoader:
    """Batches of ``stream``, in the workers (``batch_size=None``: the loader passes them as made)."""
    from .signals import ignore_in_worker

    return torch.utils.data.DataLoader(SkipAware(stream, batch_size, collate), batch_size=None,
                                       num_workers=num_workers, pin_memory=pin,
                                       prefetch_factor=4 if num_workers else None,
                                       worker_init_fn=ignore_in_worker if num_workers else None,
                                       generator=torch.Generator().manual_seed(seed))


class SampleLog:
    """``--log-samples``: ``{"step", "epoch", "keys"}`` lines to ``samples-rank{r}.jsonl``, one per
    micro-batch taken (``step`` counts optimizer steps from 1, as ``metrics.jsonl``). Lines of
    steps after ``keep_until`` (a resume redoes them) are dropped first."""

    def __init__(self, folder: str | os.PathLike, rank: int, keep_until: int = 0):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"samples-rank{rank}.jsonl")
        truncate_jsonl(path, keep_until)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        self.f.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
