"""Official checkpoint interop (docs/semantics.md §7) and atomic saving.

Our modules are named as the official ones, so ``state_dict()`` already uses the official keys;
this module handles what files in the wild add: wrapper dicts (``model``/``module``), prefixes
(``module.``, ``_orig_mod.``, ``backbone.``), encoder-only files, pretrain files loaded into the
classifier, and safetensors.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

WRAPPER_KEYS = ("model", "module", "state_dict")
PREFIXES = ("module.", "_orig_mod.", "backbone.")
# Top-level keys of a pretrain file that belong to the decoder side, not the encoder.
DECODER_SIDE = ("decoder.", "encoder_to_decoder.", "mask_token")


@dataclass
class LoadReport:
    """What a load did. ``missing``: model keys the file lacked (left as initialized);
    ``unexpected``: file keys the model has no place for (ignored); ``loaded``: keys copied."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"LoadReport(loaded={len(self.loaded)}, missing={self.missing}, "
                f"unexpected={self.unexpected}, skipped={self.skipped})")


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint: ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)`` on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {exc}") from exc


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: the file dict itself or its ``model``/``module``
    entry, with ``module.``, ``_orig_mod.`` and ``backbone.`` prefixes stripped."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            continue  # non-tensor entries (epoch, args, ...) of a flat file
        stripped = True
        while stripped:
            stripped = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p):], True
        out[k] = v
    if not out:
        raise ValueError("the checkpoint holds no tensors (expected a state dict, or a dict with "
                         f"one of {WRAPPER_KEYS})")
    return out


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names (detached, same device)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def _adapt_keys(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map file keys onto the model's layout; returns the adapted dict and keys dropped."""
    from .models import VideoMAEv2Classifier, VideoMAEv2Pretrain

    dropped = []
    if isinstance(model, VideoMAEv2Pretrain):
        if not any(k.startswith("encoder.") for k in sd) and any(k.startswith("blocks.") for k in sd):
            # encoder-only file stored without the "encoder." prefix
            sd = {(k if k.startswith(DECODER_SIDE) else "encoder." + k): v for k, v in sd.items()}
        return sd, dropped
    if isinstance(model, VideoMAEv2Classifier):
        if not any(k.startswith("encoder.") for k in sd):
            return sd, dropped  # a classifier file, or an encoder-only file without prefix
        out = {}
        for k, v in sd.items():  # a pretrain file: its encoder, "encoder." dropped
            if k.startswith("encoder."):
                out[k[len("encoder."):]] = v
            else:
                dropped.append(k)
        return out, dropped
    return sd, dropped


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = False,
                             exclude: Sequence[str] = ()) -> LoadReport:
    """Load official weights (a file's dict or its ``model``/``module`` entry) into ``model``.

    Keys starting with any prefix in ``exclude`` are skipped (e.g. ``("head.",)`` to keep a
    fresh head of another class count). A shape mismatch raises ``ValueError`` naming every
    offending key; ``strict=True`` also raises on missing or unexpected keys.
    """
    sd = unwrap_state_dict(state_dict)
    sd, dropped = _adapt_keys(model, sd)
    own = model.state_dict()
    report = LoadReport(skipped=sorted(dropped))
    to_load, mismatched = {}, []
    for k, v in sd.items():
        if any(k.startswith(e) for e in exclude):
            report.skipped.append(k)
        elif k not in own:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            mismatched.append(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            to_load[k] = v
    if mismatched:
        raise ValueError("checkpoint shapes do not match the model (wrong arch, num_frames, img_size "
                         "or num_classes? pass exclude=('head.',) to keep a fresh head): "
                         + "; ".join(mismatched))
    report.missing = sorted(k for k in own if k not in to_load and not any(k.startswith(e) for e in exclude))
    report.unexpected.sort()
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"strict load failed: missing {report.missing}, unexpected {report.unexpected}")
    with torch.no_grad():
        for k, v in to_load.items():
            own[k].copy_(v)
    report.loaded = sorted(to_load)
    return report


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a reader never sees a half-written file and a killed writer leaves the old one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
