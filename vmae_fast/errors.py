"""The errors every command line of the project shares, and its exit statuses.

A command (predict, extract-features, visualize, export, pretrain, finetune, bench, shards)
raises ``UsageError`` for a mistake in what the user passed, phrased in that command's own flag
names, before any work or output is made. ``vmae_fast.cli.run_cli`` turns it into one line on
stderr and exit status 2. This module is a leaf (it imports nothing of vmae_fast), so that
``envs`` can raise ``UsageError`` and ``cli`` can read ``envs`` without an import circle.

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

import os
import tempfile
from pathlib import Path
from typing import Mapping

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_NONFINITE = 0, 1, 2, 3
EXIT_STOPPED_BY_SIGNAL, EXIT_CHECKPOINT_FAILED = 4, 5


class UsageError(ValueError):
    """A mistake in the command line or in a file it names: printed as one line, exit status 2."""


class OptionError(ValueError):
    """A keyword option of the library that is missing, or whose value cannot work. ``str()`` is
    the library's message (it names the keyword: ``pass num_heads=``); the fields let a command
    line say the same in its own flag words without reading the message:

    ``option``: the keyword (``num_heads``); ``missing``: it must be given (the weights do not
    tell), else the value given, or its default, is the trouble; ``reason``: what is wrong, in
    words that do not tell the reader to pass the keyword (the whole message when not missing)."""

    def __init__(self, message: str, *, option: str, reason: str | None = None, missing: bool = False):
        super().__init__(message)
        self.option, self.reason, self.missing = option, reason or message, missing


class ShapeMismatch(ValueError):
    """Weights whose tensors have other shapes than the model's (another width, depth, frame
    count or crop size): ``mismatched`` holds ``"key: file (...) vs model (...)"`` for each, so a
    command line can say it in its own words (the message suggests the library's ``exclude=``)."""

    def __init__(self, message: str, mismatched: list[str]):
        super().__init__(message)
        self.mismatched = list(mismatched)


def flag_of(name: str) -> str:
    """The command-line flag of an option or config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_at_least(options: object, minimums: Mapping[str, float]) -> None:
    """``UsageError`` for the first attribute of ``options`` (a parsed command line, a config
    dataclass) below its minimum, in the flag's own name: ``--batch-size must be >= 1, got -1``;
    ``None`` (not given) passes. The one such check of every command (tools, training, bench)."""
    for name, low in minimums.items():
        value = getattr(options, name, None)
        if value is not None and value < low:
            raise UsageError(f"{flag_of(name)} must be >= {low}, got {value}")


def check_within(options: object, intervals: Mapping[str, str]) -> None:
    """``UsageError`` for the first attribute of ``options`` outside its interval of [0, 1]
    (``"[0, 1]"``, ``"[0, 1)"`` or ``"(0, 1]"``, as the message writes it), in the flag's own
    name: ``--mixup-prob must be in [0, 1], got 2.0``."""
    for name, interval in intervals.items():
        value = getattr(options, name)
        low_ok = value >= 0 if interval[0] == "[" else value > 0
        high_ok = value <= 1 if interval[-1] == "]" else value < 1
        if not (low_ok and high_ok):
            raise UsageError(f"{flag_of(name)} must be in {interval}, got {value}")


def check_output(flag: str, path: str | os.PathLike, *, folder: bool = False) -> None:
    """``UsageError``, before any work, for an output that cannot be written: ``path`` (a folder
    with ``folder``, else a file; the folders on the way are made later) where a folder is named
    as the file, a file is in the way, or the nearest existing folder takes no new file (a probe
    file is made and removed: permission bits alone say nothing for root or read-only mounts)."""
    out = Path(path)
    if not folder and out.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, expected a file name")
    p = Path(os.path.abspath(out if folder else out.parent))
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: {p} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in {p} ({exc.strerror or exc})") from None


__all__ = ["UsageError", "OptionError", "ShapeMismatch", "flag_of", "check_at_least", "check_within", "check_output", "EXIT_OK", "EXIT_SOME_FAILED", "EXIT_USAGE", "EXIT_NONFINITE",
           "EXIT_STOPPED_BY_SIGNAL", "EXIT_CHECKPOINT_FAILED"]
