"""Every environment switch of vmae_fast, read in one place.

    VMAE_FAST_KERNELS=0   fused ops run their pure-PyTorch references (default 1: fused kernels)
    VMAE_FAST_DEBUG=1     bound-check token indices on the GPU too (costs a device sync)
    VMAE_FAST_NO_EXT=1    do not load the native CPU extension vmae_fast._C (no warning either);
                          like TRITON_INTERPRET, it steers the ops when set before they are imported
    VMAE_FAST_ATTN=NAME   force an attention backend (sdpa, math, flash_attn, xformers, auto)
    TRITON_INTERPRET=1    Triton's own switch: kernels decorated after it is set run through the
                          interpreter on CPU tensors (it must be set before Triton is imported)

Read at access (``envs.VMAE_FAST_KERNELS``), so a test's ``monkeypatch.setenv`` takes effect;
the two import-time switches above decide which kernels the ops register, once.
Library code steers itself with explicit contexts (``vmae_fast.ops.use_kernels(False)``), never
by writing ``os.environ``.
"""
from __future__ import annotations

import os
from typing import Any, Callable


def _flag(name: str, default: bool) -> Callable[[], bool]:
    def read() -> bool:
        value = os.environ.get(name, "").strip()
        if value == "":
            return default
        return value not in ("0", "false", "False", "no", "off")
    return read


_SWITCHES: dict[str, Callable[[], Any]] = {
    "VMAE_FAST_KERNELS": _flag("VMAE_FAST_KERNELS", True),
    "VMAE_FAST_DEBUG": _flag("VMAE_FAST_DEBUG", False),
    "VMAE_FAST_NO_EXT": _flag("VMAE_FAST_NO_EXT", False),
    "VMAE_FAST_ATTN": lambda: os.environ.get("VMAE_FAST_ATTN", "").strip() or None,
    "TRITON_INTERPRET": _flag("TRITON_INTERPRET", False),
}


def __getattr__(name: str) -> Any:
    if name in _SWITCHES:
        return _SWITCHES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_SWITCHES)


def snapshot() -> dict[str, Any]:
    """Every switch's value now (for result files and bug reports)."""
    return {name: read() for name, read in _SWITCHES.items()}
