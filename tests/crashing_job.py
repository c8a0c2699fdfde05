"""A job for ``train.write_shards.ordered_samples`` that kills its worker process on the indices
it is told to (as a segfault in FFmpeg would). Its own module, free of torch, so that the spawned
workers that import it start fast."""
import os
import signal


def run(job):
    """``job``: ``(index, crash, log)``: a line ``index pid`` is appended to the file ``log``
    (which process ran it), then the process dies if ``crash``."""
    index, crash, log = job
    with open(log, "a") as f:
        f.write(f"{index} {os.getpid()}\n")
    if crash:
        os.kill(os.getpid(), signal.SIGSEGV)
    return index, {"index": index}, ""
