"""VideoMAE V2 pretraining with dual masking (tube encoder mask, running-cell decoder mask).

    vmae-pretrain --data-list LIST --data-root ROOT --output-dir OUT [--resume auto]
    python -m train.pretrain ...                               (the same)
    torchrun --nproc_per_node 8 -m train.pretrain ... [--dist fsdp]

Every default is the official recipe of --model (the table below); the lr is scaled by the
global batch as the official code does (see --lr-scaling).
"""
from __future__ import annotations

import sys

import torch

import vmae_fast
from vmae_fast.flops import count_macs
from vmae_fast.masking import num_decoder_tokens
from vmae_fast.video.decoders import resolve_decoder as decoder_name

from . import distributed as dist_
from . import loop
from .recipe import official
from .cli import (UsageError, check_common, check_file, check_model_config, make_parser, model_options, parse,
                  read_list_checked, run_command, training_data)
from .data import VideoDataset


def parse_args(argv=None):
    ap = make_parser("pretrain", __doc__)
    a = ap.add_argument
    a("--data-list", default=None, help="lines 'path start_idx total_frames [label]' (or --shards)")
    a("--encoder-ratio", type=float, default=None, help=f"encoder mask ratio {official('pretrain', 'encoder_ratio')}")
    a("--decoder-ratio", type=float, default=None,
      help="running-cell decoder mask ratio: 0.25, 0.5 (official) or 0.75; 0 = encoder-only masking")
    a("--encoder-mask-type", choices=("tube", "random"), default="tube")
    a("--decoder-depth", type=int, default=None, help=official("pretrain", "decoder_depth"))
    return parse(ap, argv, "pretrain", validate)


def _model_options(args) -> dict:
    return model_options(args, num_frames=args.num_frames, img_size=args.img_size, decoder_depth=args.decoder_depth,
                         drop_path_rate=args.drop_path)


def validate(args) -> vmae_fast.VideoMAEConfig:
    """Every check that needs no device and no data: bad sizes and ratios fail here."""
    check_common(args)
    if bool(args.data_list) == bool(args.shards):
        raise UsageError("give the training data as --data-list LIST or --shards SPEC (one of them)")
    check_file("--data-list", args.data_list)
    cfg = check_model_config(args, **_model_options(args))
    try:
        num_decoder_tokens(cfg.grid, args.decoder_ratio, args.encoder_ratio, args.encoder_mask_type)
    except ValueError as exc:
        t, h, w = cfg.grid
        why = (f" (--img-size {cfg.img_size} / patch {cfg.patch_size} gives {h}x{w} tokens a frame)"
               if "grid" in str(exc) else "")
        raise UsageError(f"masking: {exc}{why}") from None
    return cfg


def slice_masks(m: vmae_fast.DualMask, lo: int, hi: int) -> vmae_fast.DualMask:
    return vmae_fast.DualMask(m.encoder_masked[lo:hi], m.decoder_masked[lo:hi], m.visible_idx[lo:hi],
                              m.decoder_idx[lo:hi])


def build(args, d: dist_.Dist) -> loop.Task:
    dist_.seed_all(args.seed)  # the same initial weights on every rank (FSDP shards one model)
    model = vmae_fast.create_pretrain_model(args.model, **_model_options(args)).to(d.device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    cfg = model.cfg
    entries = read_list_checked(args, "--data-list", "pretrain") if args.data_list else []
    dataset = VideoDataset(entries, "pretrain", args.num_frames, args.sampling_rate, args.img_size,
                           num_sample=args.num_sample, seed=args.seed, decoder=args.decoder)
    mask_gen = torch.Generator(device=d.device).manual_seed(args.seed)
    clips_micro = args.batch_size * args.num_sample

    def loss(model, batch) -> torch.Tensor:
        video = batch["video"].to(d.device, non_blocking=True)  # uint8, normalized in the model
        # Masks for the whole global micro-batch, from one generator on every rank: each rank
        # keeps its slice, so any world size sees the masks of a single-process run.
        masks = vmae_fast.DualMask.sample(clips_micro * d.world, cfg.grid, args.encoder_ratio, args.decoder_ratio,
                                          encoder_mask_type=args.encoder_mask_type, device=d.device,
                                          generator=mask_gen)
        masks = slice_masks(masks, d.rank * clips_micro, (d.rank + 1) * clips_micro)
        return model(video, masks).loss

    macs = count_macs(cfg, args.encoder_ratio, args.decoder_ratio, "vmae_fast", args.encoder_mask_type)["total"]
    return loop.Task(name="pretrain", model=model, model_config=cfg.to_dict(), loss=loss,
                     dataset=training_data(args, dataset),
                     flops_per_clip=3 * 2 * macs,  # forward + backward (2x) MACs, 2 FLOPs per MAC
                     generators={"mask": mask_gen},
                     summary=f", masks {args.encoder_mask_type} {args.encoder_ratio} / running cell "
                             f"{args.decoder_ratio}, decoder {decoder_name(args.decoder)}")


def main(argv=None, on_step=None) -> dict:
    """Runs the training; returns a summary dict (see ``cli.run_command``)."""
    return run_command(parse_args, build, argv, on_step)


def cli() -> None:
    """The ``vmae-pretrain`` console script."""
    from .cli import run_cli

    sys.exit(run_cli(main, "vmae-pretrain"))


if __name__ == "__main__":
    cli()
