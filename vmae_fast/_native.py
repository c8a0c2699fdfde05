"""Loader of the optional native CPU extension ``vmae_fast._C``.

``_C<EXT_SUFFIX>`` is a plain shared library built from ``kernels/`` by ``setup.py`` (CMake).
Loading it with ``torch.ops.load_library`` registers, in the ``vmae_fast`` namespace::

    gather_cubes_cpu(video, idx, tubelet, patch, thwc) -> Tensor
    decoder_input_fwd_cpu(z, pos, mask_token, visible_idx, decoder_idx) -> Tensor
    decoder_input_bwd_cpu(grad_out, visible_idx, decoder_idx, num_tokens, need_pos) -> (Tensor, Tensor, Tensor)
    masked_mse_fwd_cpu(pred, video, decoder_idx, weight, tubelet, patch, normalize, eps) -> Tensor
    masked_mse_bwd_cpu(grad_loss, pred, video, decoder_idx, weight, tubelet, patch, normalize, eps) -> Tensor
    native_torch_version() -> str   (the torch it was built against; another torch is refused)

with the semantics of the ``*_ref`` functions of ``vmae_fast.ops`` (CPU tensors only; bad
input raises ``ValueError``; rows of zero weight are skipped by the loss, so a NaN ``pred`` there
does not propagate as it would in the reference). The library is loaded lazily on the first call and the result is
cached; ``VMAE_FAST_NO_EXT=1`` disables it at runtime.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import warnings
from pathlib import Path

import torch

BUILD_COMMAND = "pip install torch && pip install --no-build-isolation -e ."
OP_NAMES = ("native_torch_version", "gather_cubes_cpu", "decoder_input_fwd_cpu", "decoder_input_bwd_cpu",
            "masked_mse_fwd_cpu", "masked_mse_bwd_cpu")


def library_path() -> Path:
    """Where ``setup.py`` puts the extension: ``vmae_fast/_C<EXT_SUFFIX>``."""
    return Path(__file__).with_name("_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def _registered() -> bool:
    return all(hasattr(torch.ops.vmae_fast, name) for name in OP_NAMES)


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str | None]:
    """``(torch.ops.vmae_fast, None)`` once loaded, else ``(None, reason)``; silent."""
    if os.environ.get("VMAE_FAST_NO_EXT", "0") not in ("", "0"):
        return None, "VMAE_FAST_NO_EXT is set"
    path = library_path()
    if not _registered():
        if not path.is_file():
            return None, f"{path.name} is not built (build skipped or failed at install)"
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:  # e.g. built against another torch
            return None, f"loading {path.name} failed ({exc})"
        if not _registered():
            return None, f"{path.name} loaded but did not register torch.ops.vmae_fast.{{{','.join(OP_NAMES)}}}"
    built_for = torch.ops.vmae_fast.native_torch_version()
    if built_for != torch.__version__:
        return None, f"{path.name} was built against torch {built_for}, running torch {torch.__version__}"
    return torch.ops.vmae_fast, None


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    warnings.warn(f"vmae_fast._C native CPU ops are unavailable: {reason}. CPU ops fall back to "
                  f"Triton/PyTorch. To build the extension: {BUILD_COMMAND}", RuntimeWarning, stacklevel=3)


def native_ops():
    """``torch.ops.vmae_fast`` with the ``*_cpu`` ops when the extension is loaded, else ``None``
    (with one warning that names the reason and the build command)."""
    ops, reason = _load()
    if ops is None:
        _warn_once(reason)
    return ops


def native_available() -> bool:
    """Whether the native CPU ops can be used (loads the extension; never warns)."""
    return _load()[0] is not None


def unavailable_reason() -> str | None:
    """Why ``native_ops()`` returns ``None``, or ``None`` when it does not."""
    return _load()[1]


def cache_clear() -> None:
    """Forget the cached load result and warning (tests, or after changing ``VMAE_FAST_NO_EXT``)."""
    _load.cache_clear()
    _warn_once.cache_clear()
