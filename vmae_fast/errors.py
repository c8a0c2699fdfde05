"""The errors every command line of the project shares, and the one way they reach a user.

A command (predict, extract-features, visualize, export, pretrain, finetune, bench, shards)
raises ``UsageError`` for a mistake in what the user passed, phrased in that command's own flag
names, before any work or output is made. ``run_cli`` turns it into one line on stderr and exit
status 2; a traceback is shown only with ``--debug`` on the command line or ``VMAE_FAST_DEBUG=1``.

Exit statuses (the same for every command):

    0  done
    1  done, but some inputs failed (each named in one line; the good ones have their output)
    2  usage error: a bad flag, or a file named by a flag that is missing or not what was expected
    3  a training run stopped on a non-finite loss
    4  a training run stopped by SIGTERM, SIGINT or SIGUSR1 after committing a checkpoint (the
       line names it and the command that resumes the run); a second signal, or Ctrl-C outside
       the training steps: 128 + its number
    5  a training run stopped because a checkpoint could not be written (no space, an I/O
       error); the previous checkpoint is kept and the line names it
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Mapping, Sequence

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_NONFINITE = 0, 1, 2, 3
EXIT_STOPPED_BY_SIGNAL, EXIT_CHECKPOINT_FAILED = 4, 5


class UsageError(ValueError):
    """A mistake in the command line or in a file it names: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a ``UsageError``: one line through ``run_cli``
    (``prog: error: ... (see prog --help)``), not the usage block argparse prints above its
    message. ``--help`` still prints and exits 0."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def debug_requested(argv: Sequence[str] | None) -> bool:
    """``--debug`` anywhere on the command line, or ``VMAE_FAST_DEBUG`` set to an on word."""
    from . import envs

    args = sys.argv[1:] if argv is None else argv
    if "--debug" in args:
        return True
    try:
        return bool(envs.VMAE_FAST_DEBUG)
    except UsageError:  # a bad VMAE_FAST_DEBUG is itself the error being reported
        return False


def run_cli(main: Callable[[Sequence[str] | None], object], prog: str,
            argv: Sequence[str] | None = None,
            exit_codes: Mapping[type[BaseException], int] | None = None) -> int:
    """Run ``main(argv)`` and return the exit status.

    ``UsageError`` -> one line ``prog: error: ...`` and 2; an exception type in ``exit_codes`` ->
    one line ``prog: stopped: ...`` and its code. With ``--debug`` (or ``VMAE_FAST_DEBUG=1``) the
    traceback is printed too. ``main`` may return an int exit status (``EXIT_SOME_FAILED``)."""
    codes = dict(exit_codes or {})
    try:
        result = main(argv)
    except UsageError as exc:
        return _report(prog, "error", exc, EXIT_USAGE, argv)
    except tuple(codes) as exc:
        code = next(c for t, c in codes.items() if isinstance(exc, t))
        return _report(prog, "stopped", exc, code, argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK


def _report(prog: str, kind: str, exc: BaseException, code: int, argv) -> int:
    if debug_requested(argv):
        traceback.print_exc()
    print(f"{prog}: {kind}: {exc}", file=sys.stderr, flush=True)
    return code


__all__ = ["UsageError", "ArgumentParser", "run_cli", "debug_requested", "EXIT_OK", "EXIT_SOME_FAILED",
           "EXIT_USAGE", "EXIT_NONFINITE", "EXIT_STOPPED_BY_SIGNAL", "EXIT_CHECKPOINT_FAILED"]
