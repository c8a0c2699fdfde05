"""A job for ``train.write_shards.ordered_samples`` that kills its worker process on the indices
it is told to (as a segfault in FFmpeg would). Its own module, free of torch, so that the spawned
workers that import it start fast."""
import os
import signal


def run(job):
    index, crash = job
    if crash:
        os.kill(os.getpid(), signal.SIGSEGV)
    return index, {"index": index}, ""
