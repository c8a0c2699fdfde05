"""Loader of the optional native CPU extension ``vmae_fast._C``.

``_C-torch<torch version><EXT_SUFFIX>`` is a plain shared library built from ``kernels/`` by
``setup.py`` (CMake) against one torch; the torch version is in its file name, so builds for
several torch versions (one per virtualenv sharing this source tree) sit side by side and each
torch loads its own. Loading it with ``torch.ops.load_library`` registers, in the ``vmae_fast``
namespace::

    gather_cubes_cpu(video, idx, tubelet, patch, thwc) -> Tensor
    decoder_input_fwd_cpu(z, pos, mask_token, visible_idx, decoder_idx) -> Tensor
    decoder_input_bwd_cpu(grad_out, visible_idx, decoder_idx, num_tokens, need_pos) -> (Tensor, Tensor)
    masked_mse_fwd_cpu(pred, video, decoder_idx, weight, tubelet, patch, normalize, eps) -> Tensor
    masked_mse_bwd_cpu(grad_loss, pred, video, decoder_idx, weight, tubelet, patch, normalize, eps) -> Tensor
    native_torch_version() -> str   (the torch it was built against; another torch is refused)

with the semantics of the ``*_ref`` functions of ``vmae_fast.ops`` (CPU tensors only; bad
input raises ``ValueError``; rows of zero weight are skipped by the loss, so a NaN ``pred`` there
does not propagate as it would in the reference). The library is loaded lazily on the first call and the result is
cached; ``VMAE_FAST_NO_EXT=1`` set before ``vmae_fast.ops`` is imported disables it (the ops
register their CPU kernels at that import).

:func:`status` tells three situations apart: ``"loaded"``; ``"disabled"`` / ``"not_built"``
(nothing to load: the ops fall back, the native tests skip); ``"broken"``: a library is built but
cannot serve this torch (built for another torch only, or it fails to load), which the native
tests report as a failure, with the load error and both torch versions.
"""
from __future__ import annotations

import functools
import re
import sysconfig
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

# Dependencies first (torch among them), the extension last and without dependencies, so that
# no resolver can move torch under the built library afterwards.
BUILD_COMMAND = "pip install -e . && pip install --no-build-isolation --no-deps -e ."
OP_NAMES = ("native_torch_version", "gather_cubes_cpu", "decoder_input_fwd_cpu", "decoder_input_bwd_cpu",
            "masked_mse_fwd_cpu", "masked_mse_bwd_cpu")
LIB_PREFIX = "_C-torch"
LIB_DIR = Path(__file__).resolve().parent  # where setup.py puts the library (tests point it elsewhere)


class Status(NamedTuple):
    state: str  # "loaded" | "disabled" | "not_built" | "broken"
    reason: str | None  # None when loaded


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def library_name(torch_version: str) -> str:
    """The file name of the library built against ``torch_version`` (``setup.py`` uses this too)."""
    return LIB_PREFIX + re.sub(r"[^A-Za-z0-9.+_-]", "_", torch_version) + ext_suffix()


def library_path(torch_version: str | None = None) -> Path:
    """Where ``setup.py`` puts the library built against ``torch_version`` (default: the running torch)."""
    return LIB_DIR / library_name(torch.__version__ if torch_version is None else torch_version)


def built_libraries() -> dict[str, Path]:
    """Every build present, keyed by the torch version it was built against (from its file name)."""
    suffix = ext_suffix()
    found = {}
    for p in sorted(LIB_DIR.glob(LIB_PREFIX + "*" + suffix)):
        found[p.name[len(LIB_PREFIX):len(p.name) - len(suffix)]] = p
    return found


def _registered() -> bool:
    return all(hasattr(torch.ops.vmae_fast, name) for name in OP_NAMES)


def _rebuild_hint() -> str:
    return f"rebuild it against this torch: {BUILD_COMMAND}"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, Status]:
    """``(torch.ops.vmae_fast, Status("loaded", None))`` once loaded, else ``(None, why)``; silent."""
    from . import envs  # here, not at the top: setup.py loads this file on its own for library_name()

    if envs.VMAE_FAST_NO_EXT:
        return None, Status("disabled", "VMAE_FAST_NO_EXT is set")
    running = torch.__version__
    path = library_path()
    if not _registered():  # (a library loaded earlier in this process cannot be unloaded)
        if not path.is_file():
            others = built_libraries()
            if not others:
                return None, Status("not_built", f"vmae_fast._C is not built (no {LIB_PREFIX}*{ext_suffix()} in "
                                                 f"{LIB_DIR}: the build was skipped or failed at install)")
            builds = ", ".join(f"torch {v} ({p.name})" for v, p in others.items())
            return None, Status("broken", f"vmae_fast._C is built for {builds}, but the running torch is {running} "
                                          f"(torch changed after the build); {_rebuild_hint()}")
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:
            return None, Status("broken", f"{path.name}, built for torch {running} (the running torch), does not "
                                          f"load: {exc}; {_rebuild_hint()}")
        if not _registered():
            return None, Status("broken", f"{path.name} (built for torch {running}) loaded but did not register "
                                          f"torch.ops.vmae_fast.{{{','.join(OP_NAMES)}}}; {_rebuild_hint()}")
    built_for = torch.ops.vmae_fast.native_torch_version()
    if built_for != running:
        return None, Status("broken", f"the loaded vmae_fast._C was built against torch {built_for}, the running "
                                      f"torch is {running}; {_rebuild_hint()}")
    return torch.ops.vmae_fast, Status("loaded", None)


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    warnings.warn(f"vmae_fast._C native CPU ops are unavailable: {reason}. CPU ops fall back to "
                  f"Triton/PyTorch. To build the extension: {BUILD_COMMAND}", RuntimeWarning, stacklevel=4)


def _loaded_or_warn() -> bool:
    # Asked when the fused ops register their per-device kernels (at import), never while
    # torch.compile traces. A user who opted out (VMAE_FAST_NO_EXT=1) gets no warning.
    ops, st = _load()
    if ops is None and st.state != "disabled":
        _warn_once(st.reason)
    return ops is not None


def native_ops():
    """``torch.ops.vmae_fast`` with the ``*_cpu`` ops when the extension is loaded, else ``None``
    (with one warning that names the reason and the build command)."""
    return torch.ops.vmae_fast if _loaded_or_warn() else None


def native_available() -> bool:
    """Whether the native CPU ops can be used (loads the extension; never warns)."""
    return _load()[0] is not None


def status() -> Status:
    """Whether the extension is loaded, disabled, not built, or built but unusable here (and why)."""
    return _load()[1]


def unavailable_reason() -> str | None:
    """Why ``native_ops()`` returns ``None``, or ``None`` when it does not."""
    return _load()[1].reason


def cache_clear() -> None:
    """Forget the cached load result and warning (tests). The ops' registered CPU kernels stay as
    they were registered at import: ``VMAE_FAST_NO_EXT`` steers the ops only when set before it."""
    _load.cache_clear()
    _warn_once.cache_clear()

