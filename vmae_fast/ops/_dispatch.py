"""Which code computes each fused op on each device, decided once, at import.

Every fused op is one ``torch.library`` custom op (``vmae_fast::<name>``) whose own body is the
pure-PyTorch reference: the default on any device. :func:`register_kernels` registers the
faster implementations as the op's per-device kernels, so torch's dispatcher (not a branch in
our code) picks one from the tensors' device, and ``torch.compile`` traces the op as one node:

- ``cuda``: the Triton kernels (unless Triton is missing, or this process interprets them);
- ``cpu``: the native C++ op ``vmae_fast::<name>_cpu`` when ``vmae_fast._C`` loads, or the
  Triton kernels through the interpreter in a process started with ``TRITON_INTERPRET=1``
  (the interpreter tests' own process).

:func:`kernel_paths` says which implementation serves each op on each device and why not the
others, as ``attention.resolve`` does for attention. ``VMAE_FAST_KERNELS=0`` /
``use_kernels(False)`` is applied by the public functions, which then call the reference
directly. Nothing here queries CUDA.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import torch

from .. import _native, envs
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

    @triton.jit
    def cube_origin(idx_ptr, row, n, Hp, Wp, s_ib, s_in, s_vb, s_vt, s_vh, s_vw,
                    TUB: tl.constexpr, PATCH: tl.constexpr):
        # Program ``row`` of a per-cube kernel serves clip ``b = row // n``, entry ``i``: returns
        # (b, i) as int64 and the clip offset of the first pixel of the cube its token names
        # (tokens in (t, h, w) order over the (T / TUB, Hp, Wp) grid).
        b = row // n
        i = row - b * n
        b64 = b.to(tl.int64)
        i64 = i.to(tl.int64)
        tok = tl.load(idx_ptr + b64 * s_ib + i64 * s_in).to(tl.int64)
        hw = Hp * Wp
        ti = tok // hw
        rem = tok - ti * hw
        hi = rem // Wp
        wi = rem - hi * Wp
        return b64, i64, b64 * s_vb + ti * (TUB * s_vt) + hi * (PATCH * s_vh) + wi * (PATCH * s_vw)
else:  # pragma: no cover
    INTERPRETED = False
    div_rn = cube_origin = None


def revalidate(checked: bool, device: torch.device) -> bool:
    """Whether a Triton launcher validates its inputs. Called as a registered kernel
    (``checked=True``), the public wrapper has validated them already, so once is enough, except
    where a compiled graph skipped the wrapper's index-value check (it is data-dependent while
    tracing) and that check is free (CPU: the interpreter) or asked for (``VMAE_FAST_DEBUG``)."""
    return not checked or device.type == "cpu" or envs.VMAE_FAST_DEBUG


def native_op(name: str) -> Callable[..., Any] | None:
    """``torch.ops.vmae_fast.<name>`` from the native extension, or None when it is not loaded
    (or is built without that op)."""
    ops = _native.native_ops()
    if ops is None or not hasattr(ops, name):
        return None
    return getattr(ops, name)


# op -> device type -> the implementation serving it, then why not the faster ones.
_PATHS: dict[str, dict[str, str]] = {}


def register_kernels(op: Any, name: str, *, triton_impl: Callable[..., Any] | None,
                     native_name: str,
                     native_impl: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None) -> None:
    """Register ``op``'s per-device kernels: ``triton_impl`` for ``cuda`` (and for ``cpu`` in an
    interpreting process), the extension's ``native_name`` for ``cpu`` when it has that op
    (wrapped by ``native_impl`` when given). Devices left without a kernel keep the op's body,
    the reference."""
    paths = _PATHS[name] = {}
    if INTERPRETED and triton_impl is not None:
        op.register_kernel("cpu")(triton_impl)
        paths["cpu"] = "triton (interpreter)"
    else:
        native = native_op(native_name)
        if native is not None:
            op.register_kernel("cpu")(native if native_impl is None else native_impl(native))
            paths["cpu"] = "native"
        else:
            why = _native.unavailable_reason() or f"the native library has no op {native_name}"
            paths["cpu"] = f"reference (native: {why})"
    if not HAS_TRITON or triton_impl is None:
        paths["cuda"] = "reference (triton is not installed)"
    elif INTERPRETED:
        paths["cuda"] = "reference (this process interprets the Triton kernels: TRITON_INTERPRET=1)"
    else:
        op.register_kernel("cuda")(triton_impl)
        paths["cuda"] = "triton"


def kernel_paths() -> dict[str, dict[str, str]]:
    """``{op: {device type: implementation (and why not a faster one)}}``, as calls made now
    would run (the public functions honour ``VMAE_FAST_KERNELS``/``use_kernels``)."""
    if not kernels_enabled():
        return {op: {dev: "reference (kernels disabled: VMAE_FAST_KERNELS=0 or use_kernels(False))"
                     for dev in paths} for op, paths in _PATHS.items()}
    return {op: dict(paths) for op, paths in _PATHS.items()}


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
