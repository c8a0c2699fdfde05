"""Every environment variable vmae_fast reads, declared once with its type and default.

    VMAE_FAST_KERNELS=0   fused ops run their pure-PyTorch references (default 1: fused kernels)
    VMAE_FAST_DEBUG=1     bound-check token indices on the GPU too (costs a device sync), and
                          print the traceback of a command-line error
    VMAE_FAST_NO_EXT=1    do not load the native CPU extension vmae_fast._C (no warning either);
                          like TRITON_INTERPRET, it steers the ops when set before they are imported
    VMAE_FAST_ATTN=NAME   force an attention backend (sdpa, math, flash_attn, xformers, auto)
    TRITON_INTERPRET=1    Triton's own switch: kernels decorated after it is set run through the
                          interpreter on CPU tensors (it must be set before Triton is imported)
    RANK, WORLD_SIZE, LOCAL_RANK   torchrun's process numbering (default 0, 1, 0)
    TORCHELASTIC_RESTART_COUNT     torchrun's count of worker-group restarts (default 0); above
                          0 the training loops resume from their output folder by themselves

A switch is on for ``1``, ``true``, ``yes``, ``on`` and off for ``0``, ``false``, ``no``, ``off``
(any case; empty or unset: its default). Any other value is a ``UsageError`` naming the variable
and the accepted words: a user who typed ``VMAE_FAST_KERNELS=of`` is told, not guessed at.

Read at access (``envs.VMAE_FAST_KERNELS``), so a test's ``monkeypatch.setenv`` takes effect;
the two import-time switches above decide which kernels the ops register, once.
Library code steers itself with explicit contexts (``vmae_fast.ops.use_kernels(False)``), never
by writing ``os.environ``. setup.py loads this file on its own (no package), so it imports
nothing of vmae_fast at the top.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

try:
    from .errors import UsageError as _Error
except ImportError:  # loaded on its own by setup.py: no package, no relative import
    _Error = ValueError

ON_WORDS = ("1", "true", "yes", "on")
OFF_WORDS = ("0", "false", "no", "off")


def parse_flag(name: str, text: str) -> bool:
    """``text`` of variable ``name`` as a switch (module docstring)."""
    word = text.strip().lower()
    if word in ON_WORDS:
        return True
    if word in OFF_WORDS:
        return False
    raise _Error(f"environment variable {name}={text!r} is not a switch value: use one of "
                 f"{'/'.join(ON_WORDS)} (on) or {'/'.join(OFF_WORDS)} (off), any case")


def _parse_count(name: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise _Error(f"environment variable {name}={text!r} must be a whole number >= 0")
    return value


class Switch(NamedTuple):  # (not a dataclass: those need the module in sys.modules, setup.py's load has not)
    """One variable: ``parse(name, text)`` for a set, non-empty value, else ``default``."""

    parse: Callable[[str, str], Any]
    default: Any
    doc: str


def _text(name: str, text: str) -> str:
    return text.strip()


SWITCHES: dict[str, Switch] = {
    "VMAE_FAST_KERNELS": Switch(parse_flag, True, "fused kernels (off: the pure-PyTorch references)"),
    "VMAE_FAST_DEBUG": Switch(parse_flag, False, "GPU index bound checks; tracebacks of command-line errors"),
    "VMAE_FAST_NO_EXT": Switch(parse_flag, False, "do not build / load the native extension vmae_fast._C"),
    "VMAE_FAST_ATTN": Switch(_text, None, "force an attention backend by name"),
    "TRITON_INTERPRET": Switch(parse_flag, False, "Triton's interpreter (set before Triton is imported)"),
    "RANK": Switch(_parse_count, 0, "torchrun: this process's global rank"),
    "WORLD_SIZE": Switch(_parse_count, 1, "torchrun: number of processes"),
    "LOCAL_RANK": Switch(_parse_count, 0, "torchrun: this process's rank on its machine"),
    "TORCHELASTIC_RESTART_COUNT": Switch(_parse_count, 0, "torchrun: restarts of the worker group so far "
                                         "(> 0: the training loops resume from their output folder)"),
}


def read(name: str) -> Any:
    """The value of declared variable ``name`` now."""
    switch = SWITCHES[name]
    text = os.environ.get(name, "")
    return switch.default if text.strip() == "" else switch.parse(name, text)


def __getattr__(name: str) -> Any:
    if name in SWITCHES:
        return read(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(SWITCHES)


def snapshot() -> dict[str, Any]:
    """Every variable's value now (for result files and bug reports); a bad value is recorded as
    its text, since a report of the environment should not fail on it."""
    out: dict[str, Any] = {}
    for name in SWITCHES:
        try:
            out[name] = read(name)
        except ValueError:
            out[name] = os.environ.get(name)
    return out
