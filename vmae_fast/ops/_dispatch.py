"""Backend choice of the fused ops, in one place.

Every fused op is one ``torch.library`` op (``vmae_fast::<name>``) whose single implementation
asks :func:`backend` which code computes it:

- CUDA tensors: the Triton kernels (the reference when Triton is not installed);
- CPU tensors: the native C++ op ``vmae_fast::<name>_cpu`` when ``vmae_fast._C`` is built,
  else the Triton kernels through the Triton interpreter when ``TRITON_INTERPRET=1``,
  else the pure-PyTorch reference;
- ``VMAE_FAST_KERNELS=0``: the reference everywhere (the public functions then skip the op).

The environment is read at call time, never at import; nothing here queries CUDA.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from ._common import kernels_enabled

try:  # Triton is optional: CPU-only installs run the references or the native ops.
    import triton  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    InterpretedFunction = None

HAS_TRITON = triton is not None

Backend = str  # "triton" | "native" | "ref"


def debug_enabled() -> bool:
    """``VMAE_FAST_DEBUG=1``: bound-check indices on GPU too (costs a device sync)."""
    return os.environ.get("VMAE_FAST_DEBUG", "0") == "1"


def interpret_requested() -> bool:
    """``TRITON_INTERPRET=1``: run the Triton kernels on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_op(name: str) -> Callable[..., Any] | None:
    """``torch.ops.vmae_fast.<name>`` from the native extension, or None when it is not built
    (or is built without that op)."""
    try:
        from .. import _native  # written beside this package; absent in early checkouts
    except ImportError:
        return None
    ops = _native.native_ops()
    if ops is None or not hasattr(ops, name):
        return None
    return getattr(ops, name)


def backend(device: torch.device, native_name: str | None = None) -> Backend:
    """Which code runs an op on tensors living on ``device`` (see the module docstring)."""
    if not kernels_enabled():
        return "ref"
    if device.type == "cuda":
        return "triton" if HAS_TRITON else "ref"
    if device.type == "cpu":
        if native_name is not None and native_op(native_name) is not None:
            return "native"
        if HAS_TRITON and interpret_requested():
            return "triton"
    return "ref"


_interpreted: dict[Any, Any] = {}


class _Interpreted:
    """A ``@triton.jit`` kernel run through the Triton interpreter although Triton was imported
    in compile mode. Triton fixes JIT-vs-interpreter when a function is decorated, including its
    own ``@jit`` library functions (``tl.sum``, ``tl.zeros``, ...); for the length of a launch
    those are swapped for interpreter copies, so interpreting on CPU tensors does not depend on
    ``TRITON_INTERPRET`` having been set before the first import of Triton."""

    _lib_swaps: list[tuple[Any, str, Any]] | None = None

    def __init__(self, kernel: Any):
        self.run = InterpretedFunction(kernel.fn)

    @classmethod
    def _swaps(cls) -> list[tuple[Any, str, Any]]:
        if cls._lib_swaps is None:
            import triton.language as tl
            from triton.runtime.jit import JITFunction
            try:  # imported lazily by the launcher; it must see the compile-mode library
                import triton.experimental.gluon  # noqa: F401
            except ImportError:  # pragma: no cover - older Triton
                pass

            copies: dict[int, Any] = {}
            swaps = []
            for mod in (tl, tl.standard, tl.math, tl.core):
                for name, value in list(vars(mod).items()):
                    if isinstance(value, JITFunction):
                        copy = copies.setdefault(id(value), InterpretedFunction(value.fn))
                        swaps.append((mod, name, copy))
            cls._lib_swaps = swaps
        return cls._lib_swaps

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            swaps = self._swaps()
            saved = [(mod, name, getattr(mod, name)) for mod, name, _ in swaps]
            try:
                for mod, name, copy in swaps:
                    setattr(mod, name, copy)
                return self.run[grid](*args, **kwargs)
            finally:
                for mod, name, value in saved:
                    setattr(mod, name, value)
        return launch


def launchable(kernel: Any, device: torch.device) -> Any:
    """``kernel`` ready to launch on ``device`` (``launchable(k, dev)[grid](*args)``): CPU
    tensors get an interpreter copy of the ``@triton.jit`` function (see ``_Interpreted``)."""
    if device.type != "cpu" or isinstance(kernel, InterpretedFunction):
        return kernel
    run = _interpreted.get(kernel)
    if run is None:
        run = _interpreted[kernel] = _Interpreted(kernel)
    return run


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the first input)")


def check_kernel_device(device: torch.device) -> None:
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU tensors through the "
                         f"Triton interpreter), got tensors on {device}")
    if not HAS_TRITON:
        raise ValueError("the Triton kernels need the 'triton' package, which is not installed")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()
