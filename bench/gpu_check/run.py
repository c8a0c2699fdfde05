"""Running the plan: every part in order, each stopped when its time share is spent, a part that
fails recorded with why, and the rest still run."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Iterable

from ..common.timing import free_memory
from .plan import Part


class ShareSpent(BaseException):
    """Raised in a part when its time share ends. A ``BaseException``, as ``KeyboardInterrupt``:
    the benchmarks catch ``Exception`` per cell to record it and go on, which must not swallow
    the end of the part."""


@contextlib.contextmanager
def time_share(seconds: float):
    """Raise ``ShareSpent`` in this (main) thread after ``seconds`` of wall time (SIGALRM);
    yields whether the share is enforced (not off the main thread, nor without SIGALRM)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield False
        return

    def spent(signum, frame):
        raise ShareSpent

    previous = signal.signal(signal.SIGALRM, spent)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(part: Part, fn: Callable, ctx) -> dict:
    """``{"status", "reason", "seconds", "share_s", "data"}`` of one part. Status: ``ok``,
    ``failed`` (it ran; something it checks did not hold), ``not run`` (with why), ``error``
    (it raised), ``timeout`` (its share ran out)."""
    t0 = time.perf_counter()
    print(f"\n=== gpu-check part {part.name} (share {part.share_s:.0f} s): {part.what}", file=sys.stderr, flush=True)
    status, reason, data, enforced = "ok", None, {}, False
    try:
        with time_share(part.share_s) as enforced:
            data = fn(ctx, part.share_s) or {}
        status, reason = data.pop("status", "ok"), data.pop("reason", None)
    except ShareSpent:
        status, reason = "timeout", f"stopped when its time share of {part.share_s:g} s was spent"
    except Exception as exc:  # a failing part is recorded, the rest of the plan still runs
        status, reason = "error", f"{type(exc).__name__}: {exc}"[:500]
        data = {"traceback": traceback.format_exc()[-3000:]}
    finally:
        free_memory(ctx.device)
    seconds = time.perf_counter() - t0
    print(f"=== gpu-check part {part.name}: {status} in {seconds:.1f} s" + (f" ({reason})" if reason else ""),
          file=sys.stderr, flush=True)
    return {"status": status, "reason": reason, "seconds": seconds, "share_s": part.share_s,
            "share_enforced": enforced, "what": part.what, "data": data}


def run_plan(parts: Iterable[Part], functions: dict[str, Callable], ctx) -> dict[str, dict]:
    return {p.name: run_part(p, functions[p.name], ctx) for p in parts}
