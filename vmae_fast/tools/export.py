"""ONNX export of a classifier (logits) or its encoder (features), for deployment runtimes
(onnxruntime, TensorRT's ONNX parser).

    vmae-export --checkpoint FILE --out model.onnx [--encoder [--no-pool]] [--input uint8|float]

The graph takes ``video`` ``(batch, 3, num_frames, img_size, img_size)`` with a dynamic batch:
``--input uint8`` (default) raw 0..255 frames, the ImageNet normalization inside the graph (as
``model(uint8 clip)``); ``--input float`` clips already normalized. It gives ``logits``
``(batch, classes)``, or with ``--encoder`` ``features`` ``(batch, D)`` (``forward_features``;
``--no-pool``: ``(batch, N, D)`` per token). The views of a video (``vmae_fast.predict``) are
made outside the graph.

The graph is traced by ``torch.onnx.export(dynamo=True)`` (needs ``onnx`` and ``onnxscript``:
the ``export`` extra) from the pure-PyTorch references of the fused ops (their kernels are
custom ops no ONNX runtime knows), in float32. With onnxruntime installed, the file is checked
after writing: its outputs for a random clip against PyTorch's, one line.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import UsageError
from .common import add_model_args, check_output, entry, load_model_from_args, make_parser

INPUTS = ("uint8", "float")


class _Exported(nn.Module):
    """What the graph computes: the classifier's ``forward`` or ``forward_features``."""

    def __init__(self, model: nn.Module, encoder: bool, pool: bool):
        super().__init__()
        self.model, self.encoder, self.pool = model, encoder, pool

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if self.encoder:
            return self.model.forward_features(video, pool=self.pool)
        return self.model(video)


def example_clip(model: nn.Module, batch: int = 2, input: str = "uint8", seed: int = 0) -> torch.Tensor:
    """A random clip of the shape ``model`` takes: uint8, or float normalized-like (``input``)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
    if input == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return torch.randn(shape, generator=g)


def export_onnx(model: nn.Module, out: str | os.PathLike, *, encoder: bool = False, pool: bool = True,
                input: str = "uint8") -> Path:
    """Write ``model`` (a ``VideoMAEv2Classifier``) as ONNX to ``out`` (module docstring) and
    return the path. The file appears whole or not at all (written in a temporary folder beside it,
    then moved; a model over 2 GB has its weights in ``out + ".data"`` beside it)."""
    from .. import ops

    if input not in INPUTS:
        raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {input!r}")
    if not encoder and getattr(model, "num_classes", 0) == 0:
        raise ValueError("the model has no classification head: export its features with encoder=True")
    out = Path(out)
    wrapped = _Exported(model, encoder, pool).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    # batch 2 in the example: an example batch of 1 would be specialized to a constant
    example = example_clip(model, 2, input)
    with ops.use_kernels(False), torch.no_grad():
        program = torch.onnx.export(wrapped, (example,), dynamo=True, input_names=["video"],
                                    output_names=["features" if encoder else "logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        program.save(str(tmp / out.name))
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == out.name):  # the graph last
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_onnx(path: str | os.PathLike, video: torch.Tensor) -> torch.Tensor:
    """The exported graph's output for ``video``, under onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: video.numpy()})[0])


def check_onnx(model: nn.Module, path: str | os.PathLike, *, encoder: bool = False, pool: bool = True,
               input: str = "uint8", batch: int = 3) -> float:
    """Largest absolute difference between the graph under onnxruntime and ``model`` (the same
    references) on a random batch of ``batch`` clips (not the export's batch of 2)."""
    from .. import ops

    video = example_clip(model, batch, input, seed=1)
    with ops.use_kernels(False), torch.no_grad():
        want = _Exported(model, encoder, pool).eval()(video).float()
    got = run_onnx(path, video)
    if got.shape != want.shape:
        raise RuntimeError(f"the ONNX graph gives shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}")
    return float((got - want).abs().max())


# --------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = make_parser("vmae-export", __doc__)
    add_model_args(p, "a fine-tuned classifier (official or Hugging Face), or with --encoder any checkpoint")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--encoder", action="store_true", help="export the features (forward_features), not the logits")
    p.add_argument("--no-pool", dest="pool", action="store_false",
                   help="with --encoder: per-token features (batch, N, D)")
    p.add_argument("--input", default="uint8", choices=INPUTS,
                   help="uint8: raw 0..255 frames, normalized inside the graph; float: ImageNet-normalized clips")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="do not compare the file under onnxruntime with PyTorch after writing")
    p.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.pool and not args.encoder:
        raise UsageError("--no-pool applies to --encoder (per-token features); the logits are pooled")
    if not str(args.out).endswith(".onnx"):
        raise UsageError(f"--out must name a .onnx file, got {args.out!r}")
    check_output("--out", args.out)
    try:
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it, and onnx)
        import onnx  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"ONNX export needs the export extra (pip install 'vmae-fast[export]'): {exc}") from None
    model = load_model_from_args(args, "classifier").eval()
    if not args.encoder and model.num_classes == 0:
        raise UsageError(f"--checkpoint {args.checkpoint} holds no classification head: export its features "
                         "with --encoder")
    cfg = model.cfg
    what = "features" if args.encoder else f"logits ({model.num_classes} classes)"
    print(f"exporting {what} of a {cfg.embed_dim}-wide, {cfg.depth}-block model, "
          f"{args.input} clips (batch, 3, {cfg.num_frames}, {cfg.img_size}, {cfg.img_size})", file=sys.stderr)
    path = export_onnx(model, args.out, encoder=args.encoder, pool=args.pool, input=args.input)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    if args.check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print("onnxruntime is not installed: the file was not checked", file=sys.stderr)
            return 0
        diff = check_onnx(model, path, encoder=args.encoder, pool=args.pool, input=args.input)
        print(f"onnxruntime check, batch 3: max |ONNX - PyTorch| = {diff:.2e}", file=sys.stderr)
    return 0


cli = entry(main, "vmae-export")


if __name__ == "__main__":
    cli()
