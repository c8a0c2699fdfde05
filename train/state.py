"""The pieces of a run's state besides the weights and the optimizer, each a ``state_dict`` /
``load_state_dict`` pair. The trainer names them in one dict; a checkpoint saves that set under
``"state"`` and a resume restores it (``RngState`` last: restoring anything else must not draw).
A new kind of state (a shard position, say) is one more piece, not more keys.

``state_dict`` may be collective (every rank calls it, in the same order): ``RngState`` gathers
every rank's streams and ``SkipCount`` every rank's skipped files.
"""
from __future__ import annotations

import math
import warnings
from typing import Protocol

import torch

from . import distributed as dist_
from .checkpointing import rng_state, set_rng_state


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LossWatch:
    """Per-step losses stay on the device until a log row or a checkpoint decision needs them
    (one host sync there, none per step). Keeps the lowest finite step loss of the run, and the
    losses (and gradient norms) since the last log row, so that a run stopped between two rows
    logs, once resumed, the row an unbroken run logs."""

    def __init__(self, d: dist_.Dist, factor: float, lowest: float = math.inf):
        self.d, self.factor, self.lowest = d, factor, lowest
        self.unsynced: list[tuple[int, torch.Tensor]] = []
        self.window: list[float] = []  # synced losses since the last log row
        self.norms: list[torch.Tensor] = []  # gradient norms since the last log row (device)
        self._last = math.nan  # the last loss of the last window taken

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.unsynced.append((step, loss))

    def sync(self) -> tuple[int, float] | None:
        """Bring the unsynced losses (mean over ranks) to the host; returns ``(step, loss)`` of
        the first non-finite one, else None."""
        if not self.unsynced:
            return None
        steps = [s for s, _ in self.unsynced]
        values = dist_.all_mean(torch.stack([v for _, v in self.unsynced]), self.d).tolist()
        self.unsynced = []
        self.window += values
        for s, v in zip(steps, values):
            if not math.isfinite(v):
                return s, v
            self.lowest = min(self.lowest, v)
        return None

    @property
    def last(self) -> float:
        """The last synced step loss (NaN before the first)."""
        return self.window[-1] if self.window else self._last

    def too_high(self, value: float) -> str | None:
        """Why weights with this loss must not be kept, or None."""
        if self.factor and value > self.factor * self.lowest:
            return f"loss {value:.4g} > {self.factor:g} x the run's lowest step loss {self.lowest:.4g}"
        return None

    def take_window(self) -> list[float]:
        w, self.window = self.window, []
        if w:
            self._last = w[-1]
        return w

    def take_norms(self) -> torch.Tensor | None:
        n, self.norms = self.norms, []
        return torch.stack(n).float() if n else None

    def state_dict(self) -> dict:
        """Call after ``sync`` (the loop saves right after one): nothing is left unsynced."""
        return {"lowest": self.lowest, "window": list(self.window),
                "norms": torch.stack(self.norms).cpu() if self.norms else None}

    def load_state_dict(self, state: dict) -> None:
        self.lowest = state["lowest"]
        self.window = list(state.get("window", ()))
        norms = state.get("norms")
        self.norms = [] if norms is None else list(norms.to(self.d.device).unbind())


class SkipCount:
    """Skipped videos count files, each once (every rank's, and before a resume): a file that
    fails again in a later epoch, or on another rank or worker, is not counted again."""

    def __init__(self, d: dist_.Dist):
        self.d = d
        self.files: set[str] = set()
        self.base = 0  # checkpoints older than the file list held a count
        self.new: set[str] = set()

    def add(self, names) -> None:
        self.new.update(names)

    def sync(self) -> int:
        """Every rank's newly skipped files into ``files`` (collective); the count."""
        for new in dist_.gather_objects(sorted(self.new - self.files), self.d):
            self.files.update(new)
        self.new = set()
        return self.total

    @property
    def total(self) -> int:
        return self.base + len(self.files)

    def state_dict(self) -> dict:
        self.sync()
        return {"files": sorted(self.files), "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.files = set(state["files"])
        self.base = state["total"] - len(self.files)


class BestEval:
    """The best evaluation so far (highest acc1, and the step that gave it)."""

    def __init__(self):
        self.best: dict | None = None
        self.last: dict | None = None

    def update(self, res: dict, step: int) -> dict:
        self.last = res
        if self.best is None or res["acc1"] > self.best["acc1"] or (  # a NaN acc1: nothing was read
                math.isnan(self.best["acc1"]) and not math.isnan(res["acc1"])):
            self.best = dict(res, step=step)
        return self.best

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]


class DataPosition:
    """Where the data stream is: the optimizer step whose micro-batches come next, with the epoch
    and micro-batch in epoch it falls on (the ``StepSampler`` derives the batches from these and
    the seed, so a loader made at this position replays an unbroken run)."""

    def __init__(self, seed: int):
        self.seed, self.step = seed, 0
        self.sampler = None  # set by the trainer once the loader exists

    def state_dict(self) -> dict:
        epoch, micro = self.sampler.position(self.step) if self.sampler is not None else (0, 0)
        return {"step": self.step, "epoch": epoch, "micro_in_epoch": micro, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            warnings.warn(f"the checkpoint's data order was drawn with --seed {state['seed']}, this run has "
                          f"--seed {self.seed}: the videos come in another order from here on", stacklevel=3)
        self.step = state["step"]


class RngState:
    """Every random stream of every rank: saved as the list of all ranks' states (rank 0 writes
    it), each rank restoring its own. A world of another size reseeds each rank instead."""

    def __init__(self, generators: dict[str, torch.Generator], d: dist_.Dist, seed: int):
        self.generators, self.d, self.seed = generators, d, seed
        self.step = 0  # the resumed step, for the reseed of another world size

    def state_dict(self) -> dict:
        return {"ranks": dist_.gather_objects(rng_state(self.generators), self.d)}

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        if len(ranks) == self.d.world:
            set_rng_state(ranks[self.d.rank], self.generators)
            return
        warnings.warn(f"the checkpoint holds the RNG states of {len(ranks)} ranks, this run has {self.d.world}: "
                      "each rank's streams are reseeded (drop path and mixup draws differ from an uninterrupted "
                      "run)", stacklevel=3)
        dist_.seed_all(self.seed + self.d.rank + self.step)
        for k, g in self.generators.items():  # the same on every rank
            if k in ranks[0]["generators"]:
                g.set_state(ranks[0]["generators"][k])


def upgrade_legacy(extra: dict) -> dict:
    """A checkpoint written before the state set (main at 66b4fa7: one key per piece at the top
    level) in today's layout, so that it resumes like a new one."""
    if "state" in extra:
        return extra
    state = {"data": dict(extra.get("data", {}), step=extra["step"]),
             "scaler": extra.get("scaler", {}),
             "loss_watch": {"lowest": extra.get("lowest_loss", math.inf)},
             "skips": {"files": list(extra.get("skipped_files", ())), "total": extra.get("skipped_total", 0)},
             "best_eval": {"best": extra.get("best")}}
    if extra.get("task_state") is not None:
        state["task"] = extra["task_state"]
    if "rng" in extra:
        state["rng"] = {"ranks": extra["rng"]}
    return dict(extra, state=state)
