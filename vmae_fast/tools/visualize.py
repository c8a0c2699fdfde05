"""Reconstruction picture of a pretraining checkpoint, as the official VideoMAE visualizer shows it.

    vmae-visualize VIDEO --checkpoint FILE [--out recon.png] [--encoder-ratio 0.9]
        [--mask-type tube|random] [--decoder-ratio 0] [--start N] [--sampling-rate 4] [--seed 0]
        [--device cpu] [--dtype fp32] [--decoder auto] [--debug]

A PNG grid, one column per frame of the clip, three rows:

1. the original frames;
2. what the encoder sees: its visible cubes, every masked cube black;
3. the reconstruction: visible cubes as they are, each reconstructed cube the decoder's
   prediction. The model predicts each cube's pixels standardized per channel (with
   ``normalize_target``, the default), so, as the official visualizer does, the prediction is
   un-normalized with the statistics of that cube in the original clip:
   ``pred * (sqrt(unbiased var) + 1e-6) + mean``, then clipped to ``[0, 1]``. Without
   ``normalize_target`` the prediction is the pixels themselves.

The clip: ``num_frames`` frames ``start + i * sampling_rate`` (default start: the middle of the
video), short side resized to ``img_size`` and center-cropped. Masks: the encoder mask at
``--encoder-ratio`` and, by default, encoder-only decoding (every masked cube reconstructed, as
the official visualizer). With ``--decoder-ratio 0.5`` (dual masking) the cubes the decoder does
not reconstruct stay black in row 3.

``--device`` defaults to the CPU and ``--dtype`` to fp32 (one clip is cheap; the picture is then
the same on every machine). A video that cannot be read is said in one line (exit status 1).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import UsageError, check_at_least, check_within
from ..masking import DualMask
from ..models.pretrain import VideoMAEv2Pretrain
from ..ops._common import imagenet_stats
from ..ops.masked_mse import cube_targets_ref
from ..video.resize import resize_frames
from ..video.sources import open_source
from ..video.views import crop_offsets
from .common import (VideoErrors, add_model_args, add_run_args, check_output, device_and_dtype, entry,
                     load_model_from_args, make_parser, say, write_png)

PROG = "vmae-visualize"

GAP = 2  # pixels of white between the tiles


def pixels01(video: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, H, W)`` normalized float or uint8 clip -> float32 pixels in ``[0, 1]``."""
    if video.dtype == torch.uint8:
        return video.float() / 255
    mean, std = imagenet_stats(video.device)
    return video.float() * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)


def _cubes_to_video(cubes: torch.Tensor, shape: tuple[int, ...], tubelet: int, patch: int) -> torch.Tensor:
    """``(B, N, t*p*p*C)`` in target order ``(t, h, w, c)``, all N tokens -> ``(B, C, T, H, W)``."""
    B, C, T, H, W = shape
    Tt, Hp, Wp = T // tubelet, H // patch, W // patch
    x = cubes.view(B, Tt, Hp, Wp, tubelet, patch, patch, C)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, C, T, H, W)


def _to_cubes(pix: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> ``(B, N, t*p*p, C)``."""
    B, C, T, H, W = pix.shape
    x = pix.view(B, C, T // tubelet, tubelet, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, -1, tubelet * patch * patch, C)


def reconstruct(video: torch.Tensor, pred: torch.Tensor, masks: DualMask, *, tubelet: int, patch: int,
                normalize_target: bool = True, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """The three rows as float32 ``(B, C, T, H, W)`` pixels in ``[0, 1]``: ``original``,
    ``masked`` (encoder-masked cubes 0), ``reconstructed`` (module docstring). ``pred``: the
    model's ``(B, n_decoder, C*t*p*p)`` predictions in target order, row ``j`` for token
    ``masks.decoder_idx[:, j]``."""
    pix = pixels01(video)
    B, C, T, H, W = pix.shape
    cubes = _to_cubes(pix, tubelet, patch)  # (B, N, tpp, C)
    N = cubes.shape[1]
    idx = masks.decoder_idx[:, :, None, None].expand(-1, -1, *cubes.shape[2:])
    own = cubes.gather(1, idx)  # the decoder rows' cubes in the original clip
    rec = pred.detach().float().reshape(own.shape)
    if normalize_target:
        mean = own.mean(dim=-2, keepdim=True)
        std = own.var(dim=-2, unbiased=True, keepdim=True).sqrt() + eps
        rec = rec * std + mean
    rec = rec.clamp(0, 1)
    enc_masked = masks.encoder_masked[:, :, None, None]
    out = torch.where(enc_masked, torch.zeros_like(cubes), cubes)  # row 2: masked cubes black
    # row 3: the decoder rows the encoder did not see get the prediction (rows it saw stay)
    use = masks.encoder_masked.gather(1, masks.decoder_idx)[:, :, None, None]
    full = out.scatter(1, idx, torch.where(use, rec, own))
    shape = (B, C, T, H, W)
    flat = lambda c: c.reshape(B, N, -1)  # noqa: E731
    return {"original": pix, "masked": _cubes_to_video(flat(out), shape, tubelet, patch),
            "reconstructed": _cubes_to_video(flat(full), shape, tubelet, patch)}


def grid_image(rows: Sequence[torch.Tensor], frames: Sequence[int] | None = None, gap: int = GAP) -> np.ndarray:
    """Rows of ``(C, T, H, W)`` pixels in ``[0, 1]`` -> one ``(rows*H + gaps, cols*W + gaps, 3)``
    uint8 image, white between tiles; ``frames``: which frames become columns (default all)."""
    C, T, H, W = rows[0].shape
    frames = list(range(T)) if frames is None else list(frames)
    img = np.full((len(rows) * H + (len(rows) - 1) * gap, len(frames) * W + (len(frames) - 1) * gap, 3),
                  255, dtype=np.uint8)
    for r, row in enumerate(rows):
        tiles = (row.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
        for c, f in enumerate(frames):
            y, x = r * (H + gap), c * (W + gap)
            img[y:y + H, x:x + W] = tiles[f]
    return img


ROW_LABELS = ("original", "encoder input\n(masked cubes black)", "reconstruction\n(visible + predicted)")
MIN_TILE = 112  # pixels: a frame tile smaller than this is enlarged (nearest neighbour) in the PNG


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def annotate(grid: np.ndarray, tile: int, title: Sequence[str] = (), rows: Sequence[str] = ROW_LABELS,
             min_tile: int = MIN_TILE, gap: int = GAP) -> np.ndarray:
    """The grid as a picture that explains itself: tiles of ``tile`` pixels enlarged by a whole
    factor to at least ``min_tile`` (nearest neighbour: the cubes stay sharp), each row labelled
    on the left, the ``title`` lines above. Returns an ``(H, W, 3)`` uint8 image."""
    from PIL import Image, ImageDraw

    scale = max(1, -(-min_tile // tile))
    body = grid.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else grid
    font, title_font = _font(13), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = lambda text, f: probe.multiline_textbbox((0, 0), text, font=f)[2:]  # noqa: E731
    pad = 8
    label_w = max(size(r, font)[0] for r in rows) + 2 * pad
    line_h = max((size(t, title_font)[1] for t in title), default=0) + 4
    top = len(title) * line_h + (pad if title else 0)
    width = max([label_w + body.shape[1] + pad] + [size(t, title_font)[0] + 2 * pad for t in title])
    canvas = Image.new("RGB", (width, top + body.shape[0] + pad), "white")
    canvas.paste(Image.fromarray(body), (label_w, top))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(title):
        draw.text((pad, pad // 2 + k * line_h), text, fill="black", font=title_font)
    row_h = (grid.shape[0] - (len(rows) - 1) * gap) // len(rows)
    for r, text in enumerate(rows):
        y = top + (r * (row_h + gap) + row_h // 2) * scale
        draw.multiline_text((label_w - pad, y), text, fill="black", font=font, anchor="rm", align="right")
    return np.asarray(canvas)


@torch.no_grad()
def visualize(model: VideoMAEv2Pretrain, video: torch.Tensor, masks: DualMask,
              out: str | os.PathLike | None = None, frames: Sequence[int] | None = None,
              amp_dtype: torch.dtype | None = None, title: Sequence[str] = ()) -> np.ndarray:
    """Run ``model`` on one clip ``(1, C, T, H, W)`` with ``masks`` (under autocast to
    ``amp_dtype`` when given) and return the grid image (uint8 ``(3*H + 2*gap, T*W + (T-1)*gap,
    3)``). With ``out``, the grid is saved there as a PNG by ``annotate``: row labels, the
    ``title`` lines and this clip's loss above it, tiles enlarged to a readable size."""
    was = model.training
    model.eval()
    try:
        with torch.autocast(video.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            result = model(video, masks)
    finally:
        model.train(was)
    cfg = model.cfg
    rows = reconstruct(video, result.pred, masks, tubelet=cfg.tubelet_size, patch=cfg.patch_size,
                       normalize_target=cfg.normalize_target)
    img = grid_image([rows[k][0] for k in ("original", "masked", "reconstructed")], frames)
    if out is not None:
        loss = f"loss {float(result.loss):.4f} " + ("(MSE of the per-cube normalized pixels, the training loss)"
                                                    if cfg.normalize_target else "(MSE of the pixels)")
        write_png(out, annotate(img, cfg.img_size, [*title, loss]))
    return img


def perfect_prediction(video: torch.Tensor, masks: DualMask, *, tubelet: int, patch: int,
                       normalize_target: bool = True) -> torch.Tensor:
    """The loss's own target at the decoder rows: what a perfect model predicts."""
    return cube_targets_ref(video, masks.decoder_idx, tubelet=tubelet, patch=patch, normalize=normalize_target)


def read_clip(path: str, num_frames: int, img_size: int, sampling_rate: int = 4, start: int | None = None,
              decoder: str = "auto") -> torch.Tensor:
    """``(1, 3, num_frames, img_size, img_size)`` uint8 clip of a video file or frame folder."""
    with open_source(path, decoder) as src:
        n = len(src)
        span = (num_frames - 1) * sampling_rate + 1
        if start is None:
            start = max(n - span, 0) // 2
        elif start >= n:  # (every frame would be the last one repeated)
            raise ValueError(f"--start {start} is past the video's last frame, {n - 1}")
        frames = src.get([min(start + i * sampling_rate, n - 1) for i in range(num_frames)])
    x = resize_frames(frames, img_size)  # (T, 3, h, w)
    (top, left), = crop_offsets(x.shape[-2], x.shape[-1], img_size, 1)
    return x[:, :, top:top + img_size, left:left + img_size].transpose(0, 1).unsqueeze(0).contiguous()


def _parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, __doc__)
    p.add_argument("video")
    add_model_args(p, "pretraining checkpoint (official or Hugging Face)", decoder_heads=True)
    p.add_argument("--out", default=None, help="PNG path (default: <video name>_recon.png here)")
    p.add_argument("--encoder-ratio", type=float, default=0.9)
    p.add_argument("--mask-type", default="tube", choices=("tube", "random"))
    p.add_argument("--decoder-ratio", type=float, default=0.0, help="0: encoder-only (every masked cube)")
    p.add_argument("--sampling-rate", type=int, default=4)
    p.add_argument("--start", type=int, default=None, help="first frame (default: the middle of the video)")
    p.add_argument("--seed", type=int, default=0)
    add_run_args(p, device="cpu", dtype="fp32")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import PIL  # noqa: F401  (write_png and annotate draw with it)
    except ImportError:
        raise UsageError("the PNG is written with Pillow, which is not installed: pip install pillow "
                         "(or the train extra)") from None
    check_at_least(args, {"sampling_rate": 1, "start": 0})
    check_within(args, {"encoder_ratio": "[0, 1)", "decoder_ratio": "[0, 1)"})
    if args.out is not None and not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    out = args.out or f"{Path(args.video).name.split('.')[0]}_recon.png"
    check_output("--out", out)
    device, amp, device_line = device_and_dtype(args.device, args.dtype)
    model = load_model_from_args(args, "pretrain").to(device)
    cfg = model.cfg
    gen = torch.Generator(device=device).manual_seed(args.seed)
    try:
        masks = DualMask.sample(1, model.grid, args.encoder_ratio, args.decoder_ratio,
                                encoder_mask_type=args.mask_type, device=device, generator=gen)
    except ValueError as exc:
        raise UsageError(f"--encoder-ratio / --decoder-ratio / --mask-type: {exc}") from None
    say(device_line)
    errors = VideoErrors(PROG, args.debug)
    ok, clip = errors.attempt(args.video, read_clip, args.video, cfg.num_frames, cfg.img_size, args.sampling_rate,
                              args.start, args.decoder)
    if not ok:
        return errors.exit_status
    decoding = ("decoder: every masked cube (encoder-only)" if args.decoder_ratio == 0
                else f"decoder: {1 - args.decoder_ratio:.0%} of the masked cubes (dual masking "
                     f"{args.decoder_ratio:g})")
    start = "middle" if args.start is None else args.start
    title = [f"{Path(args.checkpoint).name}: {cfg.embed_dim}-wide, {cfg.depth} + {cfg.decoder_depth} blocks | "
             f"{Path(args.video).name}, {cfg.num_frames} frames every {args.sampling_rate} from {start}",
             f"encoder mask: {args.mask_type}, {args.encoder_ratio:.0%} of cubes hidden | {decoding}"]
    img = visualize(model, clip.to(device), masks, out, amp_dtype=amp, title=title)
    print(f"{out}: {cfg.num_frames} frames x 3 rows (original / encoder input / reconstruction), "
          f"grid {img.shape[1]}x{img.shape[0]} px before labels")
    return errors.exit_status


cli = entry(main, PROG)

if __name__ == "__main__":
    cli()
