"""Jobs for ``train.process_pool.ordered_results`` that do what they are told: return, kill their
worker process (as a segfault in FFmpeg would), raise, or sleep. Its own module, free of torch, so
that the spawned workers that import it start fast."""
import os
import signal
import time


def run(job):
    """``job``: ``(index, action, log)``: a line ``index pid`` is appended to the file ``log``
    (which process ran it), then ``action``: ``"ok"``, ``"crash"`` (SIGSEGV), ``"raise"`` or
    ``"sleep"`` (60 s)."""
    index, action, log = job
    with open(log, "a") as f:
        f.write(f"{index} {os.getpid()}\n")
    if action == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "raise":
        raise RuntimeError("a bug in the job")
    if action == "sleep":
        time.sleep(60)
    return index, action


def died(job):
    return job[0], "died"
