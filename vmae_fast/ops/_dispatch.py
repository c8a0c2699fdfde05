"""Backend choice of the fused ops, in one place.

Every fused op is one ``torch.library`` op (``vmae_fast::<name>``) whose single implementation
asks :func:`backend` which code computes it:

- CUDA tensors: the Triton kernels (the reference when Triton is not installed);
- CPU tensors: the native C++ op ``vmae_fast::<name>_cpu`` when ``vmae_fast._C`` is built,
  else the Triton kernels through the Triton interpreter when ``TRITON_INTERPRET=1`` was set
  before Triton was imported (the interpreter tests' own process), else the pure-PyTorch
  reference;
- ``VMAE_FAST_KERNELS=0``: the reference everywhere (the public functions then skip the op).

The environment is read at call time, never at import; nothing here queries CUDA.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, NamedTuple

import torch

from .. import _native
from ._common import kernels_enabled

try:  # Triton is optional: CPU-only installs run the references or the native ops.
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None
    InterpretedFunction = None

HAS_TRITON = triton is not None

if HAS_TRITON:
    @triton.jit
    def _probe():
        pass

    # Triton decides compile-vs-interpret when a function is decorated, from TRITON_INTERPRET
    # as it is at that moment: our kernels were decorated in the same mode as this probe.
    INTERPRETED = isinstance(_probe, InterpretedFunction)

    @triton.jit
    def div_rn(x, y):
        # fp32 `/` compiles to an approximate division on NVIDIA GPUs (div.full.f32, up to 2 ulp);
        # the references and the native ops round exactly, so the kernels do too.
        return tl.math.div_rn(x, y)
else:  # pragma: no cover
    INTERPRETED = False
    div_rn = None

Backend = str  # "triton" | "native" | "ref"


def debug_enabled() -> bool:
    """``VMAE_FAST_DEBUG=1``: bound-check indices on GPU too (costs a device sync)."""
    return os.environ.get("VMAE_FAST_DEBUG", "0") == "1"


def native_op(name: str) -> Callable[..., Any] | None:
    """``torch.ops.vmae_fast.<name>`` from the native extension, or None when it is not built
    (or is built without that op)."""
    ops = _native.native_ops()
    if ops is None or not hasattr(ops, name):
        return None
    return getattr(ops, name)


def backend(device: torch.device, native_name: str | None = None) -> Backend:
    """Which code runs an op on tensors living on ``device`` (see the module docstring)."""
    if not kernels_enabled():
        return "ref"
    if device.type == "cuda":
        return "triton" if HAS_TRITON and not INTERPRETED else "ref"
    if device.type == "cpu":
        if native_name is not None and native_op(native_name) is not None:
            return "native"
        if INTERPRETED:
            return "triton"
    return "ref"


# Set by ``capture_launches`` (ahead-of-time compilation): launches are recorded, not run.
_capture: list | None = None


class Launch(NamedTuple):
    """One kernel launch as a launcher made it: what ahead-of-time compilation needs."""
    kernel: Any
    grid: tuple
    args: tuple
    meta: dict


@contextlib.contextmanager
def capture_launches():
    """Record the launches the launchers would make instead of running them (tensors may be on
    the ``meta`` device). Not thread-safe by design: it is a tool for ``bench.kernels``."""
    global _capture
    saved, _capture = _capture, []
    try:
        yield _capture
    finally:
        _capture = saved


def launch(kernel: Any, grid: tuple, *args: Any, **meta: Any) -> None:
    """Launch ``kernel[grid](*args, **meta)`` on the device of its tensor arguments.

    Triton launches on the *current* CUDA device, not the tensors', so CUDA launches run under
    a device guard (tensors on ``cuda:1`` while ``cuda:0`` is current must still work). CPU
    tensors need the kernels decorated under ``TRITON_INTERPRET=1`` (set before Triton is
    imported); a compiled kernel is refused with that advice rather than crashing inside Triton.
    """
    if _capture is not None:
        _capture.append(Launch(kernel, tuple(grid), args, meta))
        return
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    elif isinstance(kernel, InterpretedFunction):
        kernel[grid](*args, **meta)
    else:
        raise ValueError(f"a Triton kernel on {device} tensors runs only through the Triton "
                         f"interpreter: set TRITON_INTERPRET=1 before anything imports Triton")


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the first input)")


def check_kernel_device(device: torch.device) -> None:
    # ``meta`` tensors while ``capture_launches`` records: real training shapes, no memory.
    if device.type == "meta" and _capture is not None:
        if not HAS_TRITON:
            raise ValueError("the Triton kernels need the 'triton' package, which is not installed")
        return
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU tensors through the "
                         f"Triton interpreter), got tensors on {device}")
    if not HAS_TRITON:
        raise ValueError("the Triton kernels need the 'triton' package, which is not installed")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()
