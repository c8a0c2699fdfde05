"""The options every benchmark takes, parsed one way: ``--device``, ``--arch`` (vmae_fast's alias
table), ``--out`` / ``--name``, and the step from a parsed command line to a checked plan.

A bad value exits with argparse's usage line and one message (exit 2) before anything is built:
``--arch`` at parse time, everything a benchmark's ``plan`` rejects (``--device cuda`` without
CUDA among them) through ``parse_plan``.
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence, TypeVar

from vmae_fast.config import ARCH_ALIASES, ARCHS, resolve_arch
from vmae_fast.cli import ArgumentParser as OneLineParser
from vmae_fast.errors import check_at_least

from .paths import results_help

DEVICE_CHOICES = "auto | cpu | cuda (the current CUDA device) | cuda:N (made current)"
Plan = TypeVar("Plan")


# Set by ``vmae-bench`` (bench/__main__.py) before it runs a command: that command's usage lines
# and errors then name it as the user typed it (``vmae-bench memory``), not ``python -m bench.memory``.
INVOKED_AS: str | None = None


def make_parser(module: str, doc: str, **kw) -> argparse.ArgumentParser:
    """The parser of ``python -m bench.<module>`` (or of ``vmae-bench <command>``, the way it was
    started), described by the first paragraph of ``doc``."""
    # under vmae-bench (which reports a UsageError in one line) a bad option is one line too
    cls = OneLineParser if INVOKED_AS else argparse.ArgumentParser
    return cls(prog=INVOKED_AS or f"python -m bench.{module}", description=doc.split("\n\n")[0], **kw)


def add_device_arg(p: argparse.ArgumentParser, default: str = "auto", why: str = "") -> None:
    """``--device``; ``vmae_fast.device.select_device`` reads it (in the benchmark's ``plan``)."""
    p.add_argument("--device", default=default, help=f"{DEVICE_CHOICES} (default: {default}{why})")


def _arch_type(only: Sequence[str] = (), extra: Sequence[str] = ()) -> Callable[[str], str]:
    """An argparse ``type``: the full name of an arch or its alias, ``only`` those a benchmark
    measures where it names some, or one of its ``extra`` words (kernels' ``both``)."""
    def arch(text: str) -> str:
        if text in extra:
            return text
        try:
            name = resolve_arch(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if only and name not in only:
            raise argparse.ArgumentTypeError(f"{text!r}: this benchmark measures {' or '.join(only)} only")
        return name
    return arch


def add_arch_arg(p: argparse.ArgumentParser, what: str, default: str | None = None, *, many: str | None = None,
                 only: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
    """``--arch``: one arch, or ``many="append"`` (repeatable) or ``"comma"`` (a comma list);
    parsed to full names, so every benchmark rejects a bad name with the same message."""
    one = _arch_type(only, extra)
    names = list(only or ARCHS)
    aliases = [a for a, full in ARCH_ALIASES.items() if full in names]
    help_ = f"{what}: {' | '.join(aliases + list(extra))} or a full name {names}" \
        + (f" (default: {default})" if default else "")
    if many == "append":
        p.add_argument("--arch", action="append", type=one, help=help_)
    elif many == "comma":
        p.add_argument("--arch", default=default, type=lambda text: [one(t) for t in text.split(",")], help=help_)
    else:
        p.add_argument("--arch", default=default, type=one, help=help_)


def check_timing_counts(ns: argparse.Namespace) -> None:
    """``--warmup`` >= 0 and ``--repeats`` >= 1 (when given), as a ``UsageError`` (a
    ``ValueError``: ``parse_plan`` makes it the one usage line), before anything is measured."""
    check_at_least(ns, {"warmup": 0, "repeats": 1})


def add_output_args(p: argparse.ArgumentParser, stem: str, out_help: str | None = None) -> None:
    """``--out`` (the results folder; unset, ``output.result_path`` takes ``paths.results_dir``)
    and ``--name`` (the file stem)."""
    p.add_argument("--out", help=out_help or f"folder for the results (default: {results_help()})")
    p.add_argument("--name", help=f"file stem (default: {stem})")


def parse_plan(p: argparse.ArgumentParser, argv: Sequence[str] | None,
               plan: Callable[[argparse.Namespace], Plan]) -> tuple[argparse.Namespace, Plan]:
    """``(namespace, plan(namespace))``; a ``ValueError`` of ``plan`` exits as argparse's own
    errors do. ``namespace._argv`` keeps ``argv`` for the command line the result records."""
    ns = p.parse_args(argv)
    ns._argv = argv
    try:
        return ns, plan(ns)
    except ValueError as exc:
        p.error(str(exc))
