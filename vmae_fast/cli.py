"""What every command line of the project shares: the one-line argument parser and the runner
that turns ``vmae_fast.errors.UsageError`` (and the stops a command names) into one line on stderr
and the documented exit status (``vmae_fast.errors``). A traceback is shown only with ``--debug``
on the command line or ``VMAE_FAST_DEBUG=1``."""
from __future__ import annotations

import argparse
import signal
import sys
import traceback
from typing import Callable, Mapping, Sequence

from . import envs
from .errors import EXIT_OK, EXIT_USAGE, UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a ``UsageError``: one line through ``run_cli``
    (``prog: error: ... (see prog --help)``), not the usage block argparse prints above its
    message. ``--help`` still prints and exits 0."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def debug_requested(argv: Sequence[str] | None) -> bool:
    """``--debug`` anywhere on the command line, or ``VMAE_FAST_DEBUG`` set to an on word."""
    args = sys.argv[1:] if argv is None else argv
    if "--debug" in args:
        return True
    try:
        return bool(envs.VMAE_FAST_DEBUG)
    except UsageError:  # a bad VMAE_FAST_DEBUG is itself the error being reported
        return False


EXIT_INTERRUPTED = 128 + signal.SIGINT  # the shell's status for a command Ctrl-C ended


def run_cli(main: Callable[[Sequence[str] | None], object], prog: str,
            argv: Sequence[str] | None = None,
            exit_codes: Mapping[type[BaseException], int] | None = None, kept: str = "") -> int:
    """Run ``main(argv)`` and return the exit status.

    ``UsageError`` -> one line ``prog: error: ...`` and 2; an exception type in ``exit_codes`` ->
    one line ``prog: stopped: ...`` and its code; Ctrl-C -> one line ``prog: stopped: interrupted
    (SIGINT)``, followed by ``kept`` (what the command had finished, and how to go on), and 130.
    With ``--debug`` (or ``VMAE_FAST_DEBUG=1``) the traceback is printed too. ``main`` may return
    an int exit status (``EXIT_SOME_FAILED``)."""
    codes = dict(exit_codes or {})
    try:
        result = main(argv)
    except UsageError as exc:
        return _report(prog, "error", exc, EXIT_USAGE, argv)
    except tuple(codes) as exc:
        code = next(c for t, c in codes.items() if isinstance(exc, t))
        return _report(prog, "stopped", exc, code, argv)
    except KeyboardInterrupt:
        return _report(prog, "stopped", "interrupted (SIGINT)" + (f"; {kept}" if kept else ""), EXIT_INTERRUPTED,
                       argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK


def _report(prog: str, kind: str, exc: BaseException | str, code: int, argv) -> int:
    if debug_requested(argv):
        traceback.print_exc()
    print(f"{prog}: {kind}: {exc}", file=sys.stderr, flush=True)
    return code


__all__ = ["ArgumentParser", "run_cli", "debug_requested", "EXIT_INTERRUPTED"]
