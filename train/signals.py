"""Stop requests: what a cluster sends before it takes the machines away.

SIGTERM (SLURM and Kubernetes before a preemption), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
``--signal=USR1@N``) set a flag; the loop reads it at the next step boundary, writes and commits
a checkpoint and stops (``StoppedBySignal``, exit status 4). A second signal stops at once
(exit 128 + its number): the last committed checkpoint stays, two-phase commit keeps it whole.
A signal within ``REPEAT_S`` of the first counts as the same one: SLURM signals every process
of a job step, and torchrun forwards what it gets to its workers, so a worker may receive one
request twice within milliseconds.

Under torchrun one rank's signal is enough. At every step boundary the ranks agree on
``(signal, save now)`` with one all-reduce (MAX) of two integers on the CPU, over gloo (the
default group on CPU; a gloo group of its own beside NCCL on GPUs, so the check never waits for
the device). Measured with gloo, world 2 on one 2-core CPU host under load 10: 0.35-0.5 ms a
step (``torchrun --nproc_per_node 2 -m train.signals``), against steps of 0.1 s (tiny CPU test
models) to seconds (a ViT on GPUs): under 0.5 %, so it runs every step rather than every K, and a
signal is honoured within one step.
``save now`` carries rank 0's clock for ``--save-every-minutes``: every rank saves at the
same step even though their clocks differ.

DataLoader workers ignore these signals (``ignore_in_worker``): SLURM signals every process of
the job and Ctrl-C the terminal's whole process group, and a worker killed by them would end the
run with a DataLoader error instead of a checkpoint. Workers exit with the main process.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from .distributed import Dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_S = 1.0  # a second signal sooner than this after the first is the same request delivered twice


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the main process handles the stop signals."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopRequests:
    """The run's stop signals and save-by-the-clock, agreed by every rank at step boundaries.
    A context manager: the handlers are installed inside it (main thread only) and the previous
    ones restored after."""

    def __init__(self, d: Dist, prog: str, save_every_minutes: float = 0.0):
        self.d, self.prog, self.interval = d, prog, save_every_minutes * 60.0
        self.received: int | None = None
        self.received_at = 0.0
        self.last_save = time.monotonic()
        self._saved: dict[int, object] = {}
        self._group = None
        if d.enabled:
            # the flags travel on the CPU: a gloo group of their own beside NCCL
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h)
        self._saved = {}

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self.received_at = signum, now
            return
        if now - self.received_at < REPEAT_S:
            return
        # os.write: a handler may run in the middle of a print of the main thread
        os.write(2, f"{self.prog}: stopped: a second {signal.Signals(signum).name}: stopping now, without a "
                    "checkpoint; the last committed one is kept\n".encode())
        self.__exit__()
        raise SystemExit(128 + signum)

    def saved(self) -> None:
        """A checkpoint was just written: the clock of ``--save-every-minutes`` starts again."""
        self.last_save = time.monotonic()

    def check(self) -> tuple[int, bool]:
        """``(signal number or 0, save now)``, the same on every rank (collective)."""
        due = bool(self.interval) and self.d.main and time.monotonic() - self.last_save >= self.interval
        flags = torch.tensor([self.received or 0, int(due)], dtype=torch.int64)
        if self.d.enabled:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        signum, due = flags.tolist()
        # Another rank's signal does not count as this rank's first: when every rank gets one, a
        # little apart, the later ones must not read as a second and stop without a checkpoint.
        return signum, bool(due)


def _measure(n: int = 2000) -> None:  # pragma: no cover - the measurement in the module doc
    """Time ``check()`` under ``torchrun --nproc_per_node 2 -m train.signals`` (gloo, CPU)."""
    from . import distributed as dist_

    dist.init_process_group("gloo")
    d = Dist(dist.get_rank(), dist.get_world_size())
    req = StopRequests(d, "measure")
    for _ in range(100):
        req.check()
    t = time.perf_counter()
    for _ in range(n):
        req.check()
    per = (time.perf_counter() - t) / n
    if d.main:
        print(f"StopRequests.check(): {per * 1e3:.3f} ms a step (gloo, world {d.world})")
    dist_.teardown(d)


if __name__ == "__main__":  # pragma: no cover
    _measure()
