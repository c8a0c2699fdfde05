"""Jobs over worker processes, results in order, for tools that must outlive a crash in C code
(``vmae-shards``: FFmpeg decoding and encoding a million videos).

``ordered_results(fn, jobs, workers, died)`` yields ``fn(job)`` for each job, in the jobs' order.
What ``concurrent.futures`` and ``multiprocessing.Pool`` do not give:

* **A crash is one job's, exactly.** Each worker has a pipe of its own and runs one job at a
  time, so a worker that dies (a segfault, the OOM killer) names its job. That job runs once more
  in another worker (a transient failure passes), and if it kills that one too its result is
  ``died(job)``; the other jobs go on. (A ``Pool`` waits for ever for a dead worker's result; a
  ``ProcessPoolExecutor`` fails every job in flight and every later submit.)
* **Stopping never hangs.** No helper thread reads results (one caught reading a half-sent
  result of a killed worker would wait for ever): the caller's thread waits on the pipes and the
  processes together. When the caller stops early (an error, Ctrl-C, the generator closed), the
  workers are killed at once, wherever they are.
* **Ctrl-C is the caller's.** Workers ignore SIGINT, and start with it blocked (a signal mask
  survives exec) so that one still importing stays quiet too; the caller's ``KeyboardInterrupt``
  stops them.
* **Spawned, not forked.** A forked child inherits whatever lock another thread of the parent
  held (tqdm's monitor, OpenMP's pool, FFmpeg's): a ``Pool`` forked inside a test process hung
  CI once. A spawned worker pays its imports once: for ``vmae-shards``, 2.0-2.5 s wall
  (``python -c "import train.write_shards"``, 5 runs, idle 2-core AMD EPYC, torch 2.14.1).

At most ``2 * workers`` jobs are taken ahead of the result the caller waits for, so memory holds
a bounded number of results.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import signal
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

_SIGMASK = hasattr(signal, "pthread_sigmask")  # POSIX; elsewhere a worker ignores SIGINT once it runs


@contextlib.contextmanager
def _sigint_blocked():
    if not _SIGMASK:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker(conn, fn: Callable) -> None:
    """A worker's life: a job in, its result out, until the caller's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a SIGINT pending since the start is dropped too
    if _SIGMASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(fn(job))


class _Worker:
    def __init__(self, fn: Callable):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        with _sigint_blocked():
            self.proc = ctx.Process(target=_worker, args=(child, fn), daemon=True)
            self.proc.start()
        child.close()  # only the worker holds its end: its death is end-of-file here

    def stop(self, kill: bool) -> None:
        self.conn.close()  # a worker waiting for a job sees end-of-file and leaves
        if kill:
            self.proc.kill()
        self.proc.join(timeout=None if kill else 30)
        if self.proc.is_alive():  # pragma: no cover - a worker stuck after its last job
            self.proc.kill()
            self.proc.join()


def ordered_results(fn: Callable[[Any], Any], jobs: Iterable, workers: int,
                    died: Callable[[Any], Any]) -> Iterator:
    """``fn(job)`` for each of ``jobs``, in order, computed by ``workers`` spawned processes;
    ``died(job)`` (called here) for a job that killed its worker twice. ``fn`` must be importable
    (a module-level function: the workers are spawned) and should catch its own errors (one it
    raises ends its worker, as a crash)."""
    jobs = iter(jobs)
    idle: list[_Worker] = []
    busy: dict[_Worker, tuple[int, Any, int]] = {}  # worker -> (sequence, job, tries)
    again: collections.deque = collections.deque()  # (sequence, job, tries) to run once more
    results: dict[int, Any] = {}
    taken = given = 0  # jobs taken from ``jobs``; results handed to the caller
    ok = False
    try:
        while True:
            while len(busy) < workers and (again or (jobs is not None and taken - given < 2 * workers)):
                if again:
                    seq, job, tries = again.popleft()
                else:
                    job = next(jobs, _END)
                    if job is _END:
                        jobs = None
                        break
                    seq, tries, taken = taken, 0, taken + 1
                w = idle.pop() if idle else _Worker(fn)
                try:
                    w.conn.send(job)
                except OSError:  # it died idle: not this job's doing
                    w.stop(kill=True)
                    again.appendleft((seq, job, tries))
                    continue
                busy[w] = (seq, job, tries)
            if given in results:
                yield results.pop(given)
                given += 1
                continue
            if not busy:
                ok = True
                return
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy]))
            for w in [w for w in busy if w.conn in ready or w.proc.sentinel in ready]:
                seq, job, tries = busy.pop(w)
                try:
                    if not w.conn.poll():
                        raise EOFError
                    results[seq] = w.conn.recv()
                    idle.append(w)
                except (EOFError, OSError):  # the worker died with this job (mid-send included)
                    w.stop(kill=True)
                    if tries == 0:
                        again.append((seq, job, 1))
                    else:
                        results[seq] = died(job)
    finally:
        for w in [*idle, *busy]:
            w.stop(kill=not ok)


_END = object()
