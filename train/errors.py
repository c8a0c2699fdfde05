"""How a training run stops short, one exception per reason, each with its exit status
(vmae_fast/errors.py has the table). The loop raises them; ``train.cli.run_cli`` maps them. They
live below both so that neither imports the other for them."""
from __future__ import annotations

from vmae_fast.errors import EXIT_CHECKPOINT_FAILED, EXIT_NONFINITE, EXIT_STOPPED_BY_SIGNAL, UsageError


class NonFiniteLoss(RuntimeError):
    """The loss or the weights became non-finite; the message names the last safe checkpoint."""


class StoppedBySignal(RuntimeError):
    """SIGTERM / SIGINT / SIGUSR1 arrived: the step finished, a checkpoint was committed; the
    message says where and the command that resumes the run."""


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written (no space, an I/O error); the previous one is kept."""


EXIT_CODES = {NonFiniteLoss: EXIT_NONFINITE, StoppedBySignal: EXIT_STOPPED_BY_SIGNAL,
              CheckpointWriteFailed: EXIT_CHECKPOINT_FAILED}

__all__ = ["UsageError", "NonFiniteLoss", "StoppedBySignal", "CheckpointWriteFailed", "EXIT_CODES"]
