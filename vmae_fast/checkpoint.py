"""Checkpoint files, format level only (docs/semantics.md §7): reading ``.pth``/``.pt``/``.bin``
(``torch.load(weights_only=True)``) and ``.safetensors``, unwrapping ``model``/``module``/
``state_dict`` wrappers and ``module.``/``_orig_mod.``/``backbone.`` prefixes, telling which kind
of file a state dict looks like, and writing files atomically.

This module knows no model: mapping a file's keys onto a model is each model's own
``checkpoint_filter_fn`` (beside the model, as timm's ``vision_transformer.checkpoint_filter_fn``),
and ``official_state_dict()`` / ``load_official_state_dict()`` are methods of every model
(``vmae_fast.models.common.OfficialCheckpointMixin``). It must not import ``vmae_fast.models``
(tests/test_import_structure.py), so that the models can import it.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, Union

import torch

from .errors import OptionError

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "module", "state_dict")
PREFIXES = ("module.", "_orig_mod.", "backbone.")

# Globals allowed on top of torch's weights_only set. The official trainer saves
# {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}; a Namespace is plain data
# (its __dict__ is restored by the weights_only unpickler, which still refuses anything it holds
# that is not itself allowed).
ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def _global_name(g: Any) -> str:
    return f"{g.__module__}.{g.__qualname__}"


# --------------------------------------------------------------------------- reading files

def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU: ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)`` plus the narrow allowlist ``ALLOWED_GLOBALS``
    (``argparse.Namespace``, for the official trainer's ``args``). Never a general unpickler.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and the
    reason for one that cannot be read (empty, truncated, not a checkpoint, or pickling an object
    that is not weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"cannot read checkpoint {path}: file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, size)
    return _torch_load(path, size)


def _load_safetensors(path: Path, size: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, without the path
        raise ValueError(f"cannot read checkpoint {path} ({size} bytes) as safetensors: {exc} "
                         f"(truncated or not a safetensors file?)") from exc


@contextlib.contextmanager
def _allowlisted():
    """``torch.serialization.safe_globals`` for the ``ALLOWED_GLOBALS`` not already allowed (the
    context manager removes what it added on exit: a global the caller allowed for the whole
    process must stay allowed)."""
    already = set(torch.serialization.get_safe_globals())
    extra = [g for g in ALLOWED_GLOBALS if g not in already]
    if not extra:
        yield
        return
    with torch.serialization.safe_globals(extra):
        yield


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\n|Please use|$)", re.S)


def _refusal(path: Path, exc: Exception) -> str:
    """Our message for a file the weights_only unpickler refused: which global or operation was
    refused, and no advice to load with ``weights_only=False``."""
    msg = str(exc)
    allowed = ("tensors and plain data, plus the allowlist vmae_fast.checkpoint.ALLOWED_GLOBALS: "
               + ", ".join(_global_name(g) for g in ALLOWED_GLOBALS))
    m = _REFUSED_GLOBAL.search(msg)
    if m:
        return (f"cannot read checkpoint {path}: it pickles {m.group(1)}, a global that "
                f"torch.load(weights_only=True) refused. vmae_fast only loads weights ({allowed}) and "
                f"never unpickles arbitrary objects: save the state dict alone where the file was made "
                f"(e.g. torch.save({{'model': model.state_dict()}}, path))")
    m = _UNPICKLER_REASON.search(msg)
    if m and m.group(1).strip():
        reason = m.group(1).strip().rstrip(".")
    elif "weights_only" in msg or "Weights only" in msg:  # torch's advice, without a reason we can pick out
        reason = "refused by the weights_only unpickler"
    else:
        reason = (msg.splitlines() or [""])[0] or type(exc).__name__
    return (f"cannot read checkpoint {path} with torch.load(weights_only=True): {reason} "
            f"(not a PyTorch checkpoint, or one that pickles more than weights; vmae_fast only loads weights: "
            f"{allowed})")


def check_torch_file(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` when it cannot be a ``torch.save`` file: those are a
    zip archive (``PK``) or, from torch < 1.6, a pickle (protocol byte ``0x80``). Read before
    ``torch.load``, whose own errors for such a file are an opcode number ("101") or a remark about
    mmap and ``_use_new_zipfile_serialization``."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return
    if not head:
        raise ValueError(f"cannot read checkpoint {path}: file is empty (0 bytes)")
    try:
        text = head.decode("utf-8")
        found = f"text starting {text.splitlines()[0][:40]!r}" if text.strip() else "blank text"
    except UnicodeDecodeError:
        found = f"bytes starting {head[:8].hex(' ')}"
    raise ValueError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (expected a torch.save file: "
                     f"a zip archive or a pickle; found {found})")


def _torch_load(path: Path, size: int) -> Any:
    check_torch_file(path)
    try:
        with _allowlisted():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises re-running with weights_only=False: not relayed (nor chained).
        raise ValueError(_refusal(path, exc)) from None
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError):
            reason = f"ends early, truncated? ({reason})"
        raise ValueError(f"cannot read checkpoint {path} ({size} bytes) with torch.load(weights_only=True): "
                         f"{reason}") from exc
    used = sorted({_global_name(type(o)) for o in _walk(obj) if isinstance(o, ALLOWED_GLOBALS)})
    if used:
        log.info("checkpoint %s: loaded with weights_only=True, allowing %s (vmae_fast.checkpoint."
                 "ALLOWED_GLOBALS: e.g. the official trainer's 'args', which loading weights ignores)",
                 path, ", ".join(used))
    return obj


def _walk(obj: Any, depth: int = 3) -> Iterable[Any]:
    """The object and the containers and values under it, ``depth`` levels down (tensors skipped)."""
    yield obj
    if depth == 0 or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, Mapping):
        children = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    else:
        return
    for c in children:
        if not isinstance(c, torch.Tensor):
            yield from _walk(c, depth - 1)


# --------------------------------------------------------------------------- state dicts

def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: the file dict itself or its ``model``/``module``/
    ``state_dict`` entry, with ``module.``, ``_orig_mod.`` and ``backbone.`` prefixes stripped."""
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


# Hugging Face transformers' VideoMAE (VideoMAEModel / ForPreTraining / ForVideoClassification).
HF_VIDEOMAE_PREFIXES = ("videomae.", "embeddings.patch_embeddings.", "encoder.layer.", "decoder.decoder_layers.")
# Top-level keys of an official pretraining file that belong to the decoder side, not the encoder.
DECODER_SIDE = ("decoder.", "encoder_to_decoder.", "mask_token")

FORMATS = {
    "hf-videomae": "a Hugging Face transformers VideoMAE checkpoint (keys 'videomae.embeddings...', "
                   "'...encoder.layer.N.attention.attention...'), converted to the official keys on load "
                   "(vmae_fast.hf.convert_hf_state_dict)",
    "pretrain": "an official pretraining checkpoint (encoder.*, decoder.*, encoder_to_decoder, mask_token)",
    "encoder-only": "an encoder-only checkpoint (patch_embed.*, blocks.*, with or without 'encoder.')",
    "classifier": "an official fine-tuning classifier checkpoint (patch_embed.*, blocks.*, fc_norm/norm, head)",
    "unknown": "no VideoMAE checkpoint format we know",
}


def guess_format(keys: Iterable[str]) -> str:
    """Which kind of file a state dict's (unwrapped, prefix-stripped) keys look like: a key of
    ``FORMATS`` (``hf-videomae``, ``pretrain``, ``encoder-only``, ``classifier`` or ``unknown``)."""
    keys = list(keys)
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    if has(*HF_VIDEOMAE_PREFIXES) or any(".attention.attention." in k for k in keys):
        return "hf-videomae"
    if has("encoder.blocks.", "encoder.patch_embed."):
        return "pretrain" if has(*DECODER_SIDE) else "encoder-only"
    if has("blocks.", "patch_embed."):
        return "classifier" if has("head.", "fc_norm.") else "encoder-only"
    return "unknown"


def describe_keys(keys: Iterable[str], n: int = 4) -> str:
    """``"3 keys: 'a', 'b', ..."``, for error messages."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"{len(keys)} key{'' if len(keys) == 1 else 's'}: {shown}{', ...' if len(keys) > n else ''}"


# --------------------------------------------------------------------------- atomic writes

# ------------------------------------------------------------- an architecture read off its weights
def count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    """How many blocks ``<prefix><i>.`` the state dict holds; they must be numbered 0..n-1."""
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    if ids and ids != set(range(len(ids))):
        raise ValueError(f"blocks {sorted(ids)} under {prefix!r} are not numbered 0..{len(ids) - 1}")
    return len(ids)


def mlp_ratio_of(dim: int, hidden: int) -> float:
    """A ratio with ``int(dim * ratio) == hidden`` (the config stores the ratio, as official)."""
    for ratio in (hidden / dim, (hidden + 0.5) / dim):
        if int(dim * ratio) == hidden:
            return ratio
    raise ValueError(f"no MLP ratio gives width {hidden} at {dim}")  # pragma: no cover


def heads_of_width(dim: int, which: str, given: int | None = None) -> int:
    """``given``, else the head count of the named arch of width ``dim`` (``which``: ``encoder``
    or ``decoder``); a width of no named arch raises, naming the option to pass."""
    from .config import ARCHS

    if given:
        return int(given)
    table = {a.embed_dim: a.num_heads for a in ARCHS.values()} if which == "encoder" else \
        {a.decoder_embed_dim: a.decoder_num_heads for a in ARCHS.values()}
    if dim in table:
        return table[dim]
    option = "num_heads" if which == "encoder" else "decoder_num_heads"
    reason = f"cannot tell the {which}'s number of attention heads from the weights (width {dim} is none of the named archs')"
    raise OptionError(f"{reason}: pass {option}= (or, for a transformers checkpoint, its config)", option=option,
                      reason=reason, missing=True)


def write_atomic(path: str | os.PathLike, data: Union[bytes, str, Callable[[IO[bytes]], Any]]) -> Path:
    """Write ``path`` so that a reader never sees half a file and a writer killed at any moment
    leaves the old file intact: write a temporary file of a unique name in the same folder,
    fsync, ``os.replace`` it over ``path`` (then fsync the folder, where possible).

    ``data``: bytes, a str (written as UTF-8), or a function writing to a binary file object
    (``lambda f: torch.save(obj, f)``). The file gets the mode of a plain ``open(path, 'w')``,
    ``0o666`` less the umask (created so by the kernel: the process umask is never touched).
    Concurrent writers to the same path don't collide: the last rename wins, whole. On any
    failure (KeyboardInterrupt included) the temporary file is removed and the error re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"could not create a unique temporary file beside {path}")
    try:
        f = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); skipped where folders can't be opened (Windows)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (``write_atomic``)."""
    write_atomic(path, lambda f: torch.save(obj, f))
