"""VideoMAE V2 pretraining with dual masking.

    python -m train.pretrain --data-list LIST --data-root ROOT --output-dir OUT [--resume auto]
    torchrun --nproc_per_node 8 -m train.pretrain ... [--dist fsdp]

Defaults follow the official ViT-B recipe (docs/semantics.md §9) except the batch geometry, which
you set: --batch-size videos per GPU, --num-sample clips per video, --accum-steps.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

import vmae_fast
from vmae_fast.flops import count_macs

from . import common as C
from .data import VideoDataset, decoder_name, read_list


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-list", required=True, help="lines 'path start_idx total_frames'")
    ap.add_argument("--encoder-ratio", type=float, default=0.9, help="tube mask ratio")
    ap.add_argument("--decoder-ratio", type=float, default=0.5, help="running-cell ratio, 0 = encoder-only")
    ap.add_argument("--encoder-mask-type", choices=("tube", "random"), default="tube")
    ap.add_argument("--decoder-depth", type=int, default=4)
    C.add_common_args(ap, base_lr=1e-3, epochs=800, warmup_epochs=20, batch_size=32)  # docs/semantics.md §9: ViT-B
    return ap.parse_args(argv)


def slice_masks(m: vmae_fast.DualMask, lo: int, hi: int) -> vmae_fast.DualMask:
    return vmae_fast.DualMask(m.encoder_masked[lo:hi], m.decoder_masked[lo:hi], m.visible_idx[lo:hi],
                              m.decoder_idx[lo:hi])


def main(argv=None, on_step=None) -> dict:
    """Runs the training; returns a summary dict. ``on_step(step, loss)`` is called after each
    optimizer step (tests use it to simulate a crash)."""
    args = parse_args(argv)
    d = C.setup(args)
    C.seed_all(args.seed)
    fsdp = d.enabled and args.dist == "fsdp"
    precision = C.resolve_precision(args, d)

    options = dict(num_frames=args.num_frames, img_size=args.img_size, decoder_depth=args.decoder_depth,
                   drop_path_rate=args.drop_path)
    model = vmae_fast.create_pretrain_model(
        args.model, **{**options, **C.parse_overrides(args.model_overrides)}).to(d.device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    cfg = model.cfg

    dataset = VideoDataset(read_list(args.data_list, args.data_root, "pretrain"), "pretrain", args.num_frames,
                           args.sampling_rate, args.img_size, num_sample=args.num_sample, seed=args.seed)
    clips_micro, global_clips, lr, total, warmup = C.batch_plan(args, d, len(dataset))

    model = C.wrap(model, args, d)
    opt = C.make_optimizer(model, args, d)
    scaler = C.make_scaler(precision, d)
    mask_gen = torch.Generator(device=d.device).manual_seed(args.seed)
    ck = C.Checkpointer(args.output_dir, d, fsdp)
    start, skipped_total = 0, 0
    path = C.resume_path(args, ck)
    if path is not None:
        extra = C.restore(ck, path, model, opt, scaler, d, mask_gen)
        start, skipped_total = extra["step"], extra.get("skipped_total", 0)

    sampler, loader = C.make_loader(dataset, args, d, start, total)
    log = C.Logger(args.output_dir, d, total, start, progress=not args.no_progress)
    macs = count_macs(cfg, args.encoder_ratio, args.decoder_ratio, "vmae_fast", args.encoder_mask_type)["total"]
    step_flops = 3 * 2 * macs * global_clips  # forward + backward (2x) MACs, 2 FLOPs per MAC
    peak = C.peak_flops(d.device)
    if d.main:
        log.write(f"pretrain {cfg.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
                  f"{len(dataset)} videos, {global_clips} clips/step, lr {lr:.3g}, steps {start}->{total} "
                  f"(warmup {warmup}), {precision}, world {d.world} ({args.dist if d.enabled else 'single'}), "
                  f"decoder {decoder_name()}")

    model.train()
    it = iter(loader)
    loss_sum = torch.zeros((), device=d.device)
    n_logged, t0, skipped_local = 0, time.perf_counter(), 0
    last_saved = path
    for step in range(start, total):
        cur_lr = C.cosine_lr(step, lr, args.min_lr, total, warmup, args.warmup_lr)
        C.set_lr(opt, cur_lr)
        for micro in range(args.accum_steps):
            batch = next(it)
            if batch["skipped"]:
                skipped_local += len(batch["skipped"])
                log.write(f"rank {d.rank}: skipped unreadable video(s): {', '.join(batch['skipped'])}")
            video = batch["video"].to(d.device, non_blocking=True)  # uint8, normalized in the model
            # Masks for the whole global micro-batch, from one generator on every rank: each rank
            # keeps its slice, so any world size sees the masks of a single-process run.
            masks = vmae_fast.DualMask.sample(clips_micro * d.world, cfg.grid, args.encoder_ratio,
                                              args.decoder_ratio, encoder_mask_type=args.encoder_mask_type,
                                              device=d.device, generator=mask_gen)
            masks = slice_masks(masks, d.rank * clips_micro, (d.rank + 1) * clips_micro)
            sync = d.enabled and not fsdp and micro < args.accum_steps - 1
            with (model.no_sync() if sync else contextlib.nullcontext()), C.autocast(precision, d):
                loss = model(video, masks).loss
            scaler.scale(loss / args.accum_steps).backward()
            loss_sum += loss.detach().float() / args.accum_steps
        C.optimizer_step(model, opt, scaler, args.clip_grad)
        n_logged += 1
        done = step + 1
        log.tick()
        if on_step is not None:
            on_step(done, loss.detach())
        save_now = done % args.save_every == 0 or done == total
        if done % args.log_every == 0 or save_now:
            mean_loss = C.all_mean(loss_sum, d).item() / n_logged
            skipped = skipped_total + C.all_sum_int(skipped_local, d)
            C.check_finite(mean_loss, done - n_logged + 1, done, last_saved, log)
            clips_s, mfu = C.throughput(global_clips, n_logged, time.perf_counter() - t0, step_flops, peak,
                                        d.world)
            log.log(done, {"loss": mean_loss, "lr": cur_lr, "clips_per_s": clips_s, "mfu": mfu,
                           "skipped_videos": skipped, "epoch": sampler.position(step)[0]})
            loss_sum.zero_()
            n_logged, t0 = 0, time.perf_counter()
        if save_now:
            last_saved = ck.save(model, opt, {
                "step": done, "skipped_total": skipped, "scaler": scaler.state_dict(),
                "rng": C.gather_rng(mask_gen, d), "args": vars(args), "config": cfg.to_dict(),
                "data": {"epoch": sampler.position(done)[0], "micro_in_epoch": sampler.position(done)[1],
                         "seed": args.seed}})
    # export the weights in the official key names, loadable by the official code
    skipped_total += C.all_sum_int(skipped_local, d)
    export = C.export_official(model, d, fsdp, f"{args.output_dir}/pretrain_official.pth")
    if d.main:
        log.write(f"done: {total} steps, {skipped_total} videos skipped; weights in {export}")
    log.close()
    C.teardown(d)
    return {"step": total, "export": export, "skipped": skipped_total}


if __name__ == "__main__":
    main()
