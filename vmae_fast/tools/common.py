"""The skeleton the user tools share: options, model loading, per-video errors, output files.

A tool is ``main(argv) -> exit status`` (raising ``UsageError`` for a mistake in what the user
passed, in the tool's own flag words) and ``cli = entry(main, "vmae-<tool>")``, its console
script. Exit statuses are ``vmae_fast.errors``': 0 done, 1 some videos failed (each named in
one line on stderr, the others complete), 2 usage error; ``--debug`` adds the tracebacks.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..checkpoint import write_atomic
from ..device import DTYPES
from ..errors import EXIT_OK, EXIT_SOME_FAILED, OptionError, UsageError, check_at_least, check_output, flag_of
from ..cli import ArgumentParser, run_cli
from ..video.decoders import add_decoder_arg, failure_reason


# ----------------------------------------------------------------------------- options
def make_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of tool ``prog``, described by the first paragraph of its module ``doc``; every
    option's default is shown in ``--help``."""
    return ArgumentParser(prog=prog, description=doc.split("\n\n")[0], formatter_class=_HelpFormatter)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring's layout kept, and ``(default: X)`` after every option that has one."""


def add_model_args(p: argparse.ArgumentParser, checkpoint_help: str, *, decoder_heads: bool = False) -> None:
    """``--checkpoint`` and what the weights do not say about the architecture: ``--num-frames``,
    ``--img-size``, ``--num-heads`` (and ``--decoder-num-heads`` for a pretraining model)."""
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--num-frames", type=int, default=None, help="frames per clip (default 16, or the HF config's)")
    p.add_argument("--img-size", type=int, default=None, help="crop size (default 224, or the HF config's)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (default: those of the named arch of the checkpoint's width)")
    if decoder_heads:
        p.add_argument("--decoder-num-heads", type=int, default=None,
                       help="decoder attention heads (default: as --num-heads)")


def add_run_args(p: argparse.ArgumentParser, *, device: str = "auto", dtype: str = "auto") -> None:
    """``--device``, ``--dtype``, ``--decoder`` and ``--debug``."""
    p.add_argument("--device", default=device, help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=dtype, choices=("auto", *DTYPES),
                   help="autocast dtype; auto: bf16 on CUDA and on CPUs with native bf16 matrix units "
                        "(amx_bf16, avx512_bf16), else fp32")
    add_decoder_arg(p)
    p.add_argument("--debug", action="store_true", help="print the traceback of every error")


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype | None, str]:
    """``--device`` and ``--dtype`` -> ``(device, autocast dtype or None, line)`` by
    ``vmae_fast.device.inference_device_and_dtype``; ``line`` says which device and dtype and why
    (a tool prints it first once its model is ready, so a usage error stays the only line). A bad
    value is a ``UsageError``, before any model is loaded."""
    from ..device import inference_device_and_dtype

    try:
        return inference_device_and_dtype(device, dtype)  # a cuda:N device becomes the current one
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def inference_attention(model: torch.nn.Module, device: torch.device, amp: torch.dtype | None) -> None:
    """bf16 inference on a CPU runs attention as ``cpu_bf16`` (``vmae_fast.attention``: bf16
    matmuls instead of SDPA's CPU flash kernel, where bf16 matmuls are native; the measurement is
    there); elsewhere the model keeps its backend. ``$VMAE_FAST_ATTN`` overrides both."""
    if device.type == "cpu" and amp == torch.bfloat16:
        from ..layers import set_attention_backend

        set_attention_backend(model, "cpu_bf16")


def say(line: str) -> None:
    """One line of a tool's progress on stderr (stdout stays the tool's results)."""
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the model
def read_hf_config(checkpoint: str) -> dict | None:
    """The Hugging Face VideoMAE ``config.json`` beside (or in) ``checkpoint``, else ``None``."""
    path = os.path.join(checkpoint, "config.json") if os.path.isdir(checkpoint) else \
        os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (ValueError, OSError) as exc:  # (a JSONDecodeError or UnicodeDecodeError is a ValueError)
            raise UsageError(f"--checkpoint {checkpoint}: {path} is not readable JSON ({exc})") from None
        if isinstance(cfg, dict) and cfg.get("model_type") == "videomae":
            return cfg
    return None


# the architecture options of ``add_model_args``: the library's keyword of each is its flag's name
_MODEL_FLAGS = ("num_frames", "img_size", "num_heads", "decoder_num_heads")


def load_model_from_args(args: argparse.Namespace, kind: str, **kw: Any) -> torch.nn.Module:
    """``vmae_fast.load_model`` of ``--checkpoint`` with the architecture options of
    ``add_model_args``; a missing or unreadable checkpoint is a ``UsageError``."""
    from ..models.load import load_model

    check_at_least(args, dict.fromkeys(_MODEL_FLAGS, 1))
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file or folder")
    extra = {k: getattr(args, k) for k in ("num_heads", "decoder_num_heads") if getattr(args, k, None)}
    try:
        return load_model(args.checkpoint, kind, num_frames=args.num_frames, img_size=args.img_size, **extra, **kw)
    except OptionError as exc:  # a keyword of the library that is one of our flags: say the flag
        if exc.option in _MODEL_FLAGS:
            flag, value = flag_of(exc.option), getattr(args, exc.option, None)
            if exc.missing:
                raise UsageError(f"--checkpoint {args.checkpoint}: {exc.reason}: pass {flag}") from None
            if value is not None:
                raise UsageError(f"{flag} {value}: {exc.reason}") from None
        raise UsageError(f"--checkpoint {args.checkpoint}: {exc}") from None
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        # (a RuntimeError here is a strict load's key / shape report: its first line says what; an
        # OSError a folder without weights, or a file that cannot be read)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--checkpoint: {first}" if str(args.checkpoint) in first
                         else f"--checkpoint {args.checkpoint}: {first}") from None


# ----------------------------------------------------------------------------- per-video errors
class VideoErrors:
    """Per-video errors of a tool: ``attempt(video, fn, ...)`` returns ``(True, fn(...))``, or,
    when ``fn`` raises, says so in one line on stderr (``prog: skipping VIDEO: Type: message``,
    the traceback too with ``debug``) and returns ``(False, None)``, so the other videos go on.
    ``exit_status``: ``EXIT_SOME_FAILED`` when any failed, else ``EXIT_OK``."""

    def __init__(self, prog: str, debug: bool = False):
        self.prog, self.debug = prog, debug
        self.failed: list[str] = []

    def attempt(self, video: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[bool, Any]:
        try:
            return True, fn(*args, **kw)
        except Exception as exc:  # a bad video (unreadable, too short, ...): say which, go on
            self.failed.append(video)
            if self.debug:
                traceback.print_exc()
            print(f"{self.prog}: skipping {video}: {failure_reason(exc)}", file=sys.stderr, flush=True)
            return False, None

    @property
    def exit_status(self) -> int:
        return EXIT_SOME_FAILED if self.failed else EXIT_OK


# ----------------------------------------------------------------------------- outputs
def write_npy(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """``arr`` as a ``.npy`` file, written atomically (a reader never sees half a file)."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return write_atomic(path, buf.getvalue())


def write_png(path: str | os.PathLike, img: np.ndarray) -> Path:
    """A ``(H, W, 3)`` uint8 image as a PNG file, written atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return write_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------- entry
def entry(main: Callable[[Sequence[str] | None], int], prog: str, kept: str = "") -> Callable[[], None]:
    """The console script of a tool: ``main`` through ``run_cli`` (one line per usage error,
    exit status 2; Ctrl-C one line, ``kept`` saying what stays; ``--debug`` for the traceback),
    exiting with its status."""
    def cli(argv: Sequence[str] | None = None) -> None:
        sys.exit(run_cli(main, prog, argv, kept=kept))
    cli.__doc__ = f"``{prog}``: ``{main.__module__}.main`` as a console script."
    return cli
