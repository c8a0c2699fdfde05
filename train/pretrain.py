"""VideoMAE V2 pretraining with dual masking (tube encoder mask, running-cell decoder mask).

    vmae-pretrain --data-list LIST --data-root ROOT --output-dir OUT [--resume auto]
    python -m train.pretrain ...                               (the same)
    torchrun --nproc_per_node 8 -m train.pretrain ... [--dist fsdp]

Every default is the official recipe of --model (the table below); the lr is scaled by the
global batch as the official code does (see --lr-scaling).
"""
from __future__ import annotations


import torch

import vmae_fast
from vmae_fast.flops import count_macs
from vmae_fast.video.decoders import resolve_decoder as decoder_name

from . import distributed as dist_
from . import loop
from .recipe import official
from .cli import check_common, check_file, make_parser, parse, read_list_checked, run_command, training_data
from .config import PretrainConfig
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
    return parse(ap, argv, "pretrain", PretrainConfig, validate)


def validate(cfg: PretrainConfig) -> None:
    """The checks of files (the values were checked when ``cfg`` was built)."""
    check_common(cfg.run)
    check_file("--data-list", cfg.data_list)


def slice_masks(m: vmae_fast.DualMask, lo: int, hi: int) -> vmae_fast.DualMask:
    return vmae_fast.DualMask(m.encoder_masked[lo:hi], m.decoder_masked[lo:hi], m.visible_idx[lo:hi],
                              m.decoder_idx[lo:hi])


def build(cfg: PretrainConfig, d: dist_.Dist) -> loop.Task:
    run = cfg.run
    dist_.seed_all(run.seed)  # the same initial weights on every rank (FSDP shards one model)
    model = vmae_fast.create_pretrain_model(cfg.model, **cfg.model_options()).to(d.device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model_cfg = model.cfg
    entries = read_list_checked(cfg, "--data-list", "pretrain") if cfg.data_list else []
    dataset = VideoDataset(entries, "pretrain", cfg.num_frames, cfg.sampling_rate, cfg.img_size,
                           num_sample=run.num_sample, seed=run.seed, decoder=cfg.decoder)
    mask_gen = torch.Generator(device=d.device).manual_seed(run.seed)
    clips_micro = run.batch_size * run.num_sample

    def loss(model, batch) -> torch.Tensor:
        video = batch["video"].to(d.device, non_blocking=True)  # uint8, normalized in the model
        # Masks for the whole global micro-batch, from one generator on every rank: each rank
        # keeps its slice, so any world size sees the masks of a single-process run.
        masks = vmae_fast.DualMask.sample(clips_micro * d.world, model_cfg.grid, cfg.encoder_ratio,
                                          cfg.decoder_ratio, encoder_mask_type=cfg.encoder_mask_type,
                                          device=d.device, generator=mask_gen)
        masks = slice_masks(masks, d.rank * clips_micro, (d.rank + 1) * clips_micro)
        return model(video, masks).loss

    macs = count_macs(model_cfg, cfg.encoder_ratio, cfg.decoder_ratio, "vmae_fast", cfg.encoder_mask_type)["total"]
    return loop.Task(name="pretrain", model=model, model_config=model_cfg.to_dict(), loss=loss,
                     dataset=training_data(cfg, dataset),
                     flops_per_clip=3 * 2 * macs,  # forward + backward (2x) MACs, 2 FLOPs per MAC
                     generators={"mask": mask_gen},
                     summary=f", masks {cfg.encoder_mask_type} {cfg.encoder_ratio} / running cell "
                             f"{cfg.decoder_ratio}, decoder {decoder_name(cfg.decoder)}")


def main(argv=None, on_step=None) -> dict:
    """Runs the training; returns a summary dict (see ``cli.run_command``)."""
    return run_command(parse_args, build, argv, on_step)


def cli() -> None:
    """The ``vmae-pretrain`` console script."""
    from .cli import exit_process, run_cli

    exit_process(run_cli(main, "vmae-pretrain"))


if __name__ == "__main__":
    cli()
