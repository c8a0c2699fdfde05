"""Fine-tuning a VideoMAE V2 classifier from a pretrain file, with multi-view evaluation.

    python -m train.finetune --train-list TRAIN --val-list VAL --num-classes 400 \
        --finetune pretrain.pth --data-root ROOT --output-dir OUT [--resume auto]
    torchrun --nproc_per_node 8 -m train.finetune ...

Layer-wise lr decay, mixup/cutmix with label smoothing (timm), optional EMA (timm ModelEmaV3),
top-1/top-5 over ``test_num_segment x test_num_crop`` views per video (softmax averaged).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
import torch.nn.functional as F

import vmae_fast
from vmae_fast.flops import encoder_macs
from vmae_fast.ops._common import imagenet_stats

from . import common as C
from .data import VideoDataset, collate, read_list


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--train-list", required=True, help="lines 'path label'")
    a("--val-list", default=None, help="lines 'path label' (evaluated every --eval-every steps and at the end)")
    a("--num-classes", type=int, required=True)
    a("--finetune", default="", help="pretrain (or classifier) checkpoint to start from")
    a("--layer-decay", type=float, default=0.75)
    a("--mixup", type=float, default=0.8, help="mixup alpha (0 = off)")
    a("--cutmix", type=float, default=1.0, help="cutmix alpha (0 = off)")
    a("--mixup-prob", type=float, default=1.0)
    a("--mixup-switch-prob", type=float, default=0.5)
    a("--smoothing", type=float, default=0.1)
    a("--min-scale", type=float, default=0.08, help="random resized crop: smallest area fraction")
    a("--head-drop", type=float, default=0.0)
    a("--model-ema", action="store_true")
    a("--model-ema-decay", type=float, default=0.9999)
    a("--test-num-segment", type=int, default=2)
    a("--test-num-crop", type=int, default=3)
    a("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    a("--eval-batch-size", type=int, default=None)
    C.add_common_args(ap, base_lr=1e-3, epochs=90, warmup_epochs=5, batch_size=8)
    ap.set_defaults(betas=(0.9, 0.999), min_lr=1e-6, drop_path=0.1)
    return ap.parse_args(argv)


def normalize(video: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, T, H, W)`` -> float32 ImageNet-normalized (on the clip's device)."""
    mean, std = imagenet_stats(video.device)
    return (video.float() / 255 - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)


def make_mixup(args):
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                 switch_prob=args.mixup_switch_prob, mode="batch", label_smoothing=args.smoothing,
                 num_classes=args.num_classes)


def apply_mixup(mixup, video: torch.Tensor, label: torch.Tensor):
    """timm's Mixup on a clip batch: frames folded into channels, so a cutmix box covers the
    same ``(h, w)`` area in every frame."""
    B, Cc, T, H, W = video.shape
    x, y = mixup(video.reshape(B, Cc * T, H, W), label)
    return x.view(B, Cc, T, H, W), y


@torch.no_grad()
def evaluate(model: torch.nn.Module, args, d: C.Dist, precision: str) -> dict:
    """Top-1/top-5 (%) of softmax averaged over every view of each video; all ranks take part."""
    entries = read_list(args.val_list, args.data_root, "finetune")
    ds = VideoDataset(entries, "test", args.num_frames, args.sampling_rate, args.img_size,
                      num_segments=args.test_num_segment, num_crops=args.test_num_crop)
    per_rank = math.ceil(len(ds) / d.world)  # equal counts on every rank (FSDP needs it); pads are ignored
    keys = [(0, min(d.rank + k * d.world, len(ds) - 1)) for k in range(per_rank)]
    valid = torch.tensor([d.rank + k * d.world < len(ds) for k in range(per_rank)])
    bs = args.eval_batch_size or args.batch_size
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=keys, num_workers=args.num_workers,
                                         collate_fn=collate)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # top1, top5, videos
    views = args.test_num_segment * args.test_num_crop
    for b, batch in enumerate(loader):
        video = batch["video"].to(d.device, non_blocking=True)
        with C.autocast(precision, d):
            logits = model(normalize(video))
        prob = logits.float().softmax(-1).view(-1, views, logits.shape[-1]).mean(1).cpu()
        label = batch["label"].view(-1, views)[:, 0]
        top = prob.topk(min(5, prob.shape[-1]), dim=-1).indices
        ok = valid[b * bs:b * bs + len(label)]
        counts[0] += ((top[:, 0] == label) & ok).sum()
        counts[1] += ((top == label[:, None]).any(-1) & ok).sum()
        counts[2] += ok.sum()
    if d.enabled:
        counts = counts.to(d.device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    model.train(was_training)
    return {"acc1": 100 * counts[0].item() / counts[2].item(), "acc5": 100 * counts[1].item() / counts[2].item(),
            "videos": int(counts[2].item())}


def main(argv=None, on_step=None) -> dict:
    args = parse_args(argv)
    d = C.setup(args)
    C.seed_all(args.seed)
    fsdp = d.enabled and args.dist == "fsdp"
    if fsdp and args.model_ema:
        raise ValueError("--model-ema is not supported with --dist fsdp (the EMA copy would be unsharded)")
    precision = C.resolve_precision(args, d)

    options = dict(num_frames=args.num_frames, img_size=args.img_size, drop_path_rate=args.drop_path,
                   head_drop_rate=args.head_drop)
    model = vmae_fast.create_model(args.model, args.num_classes,
                                   **{**options, **C.parse_overrides(args.model_overrides)})
    log = C.Logger(args.output_dir, d, 0, 0, progress=False)  # messages before the bar exists
    if args.finetune:
        report = model.load_official_state_dict(vmae_fast.load_checkpoint_file(args.finetune), exclude=("head.",))
        log.write(f"loaded {args.finetune}: {report}")
    model.to(d.device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    cfg = model.cfg

    dataset = VideoDataset(read_list(args.train_list, args.data_root, "finetune"), "finetune", args.num_frames,
                           args.sampling_rate, args.img_size, num_sample=args.num_sample, seed=args.seed,
                           min_scale=args.min_scale)
    _, global_clips, lr, total, warmup = C.batch_plan(args, d, len(dataset))

    model = C.wrap(model, args, d)
    opt = C.make_optimizer(model, args, d, layer_decay=args.layer_decay)
    scaler = C.make_scaler(precision, d)
    ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(C.unwrap(model), decay=args.model_ema_decay)
    mixup = make_mixup(args)
    ck = C.Checkpointer(args.output_dir, d, fsdp)
    start, skipped_total, best = 0, 0, None
    path = C.resume_path(args, ck)
    if path is not None:
        extra = C.restore(ck, path, model, opt, scaler, d)
        start, skipped_total = extra["step"], extra.get("skipped_total", 0)
        if ema is not None and extra.get("ema") is not None:
            ema.module.load_state_dict(extra["ema"])

    sampler, loader = C.make_loader(dataset, args, d, start, total)
    log.close()
    log = C.Logger(args.output_dir, d, total, start, progress=not args.no_progress)
    step_flops = 3 * 2 * (encoder_macs(cfg) + cfg.embed_dim * args.num_classes) * global_clips
    peak = C.peak_flops(d.device)
    log.write(f"finetune {cfg.arch}: {len(dataset)} videos, {args.num_classes} classes, {global_clips} clips/step, "
              f"lr {lr:.3g}, steps {start}->{total} (warmup {warmup}), {precision}, world {d.world}")

    model.train()
    it = iter(loader)
    loss_sum = torch.zeros((), device=d.device)
    n_logged, t0, skipped_local, last_saved = 0, time.perf_counter(), 0, path
    for step in range(start, total):
        cur_lr = C.cosine_lr(step, lr, args.min_lr, total, warmup, args.warmup_lr)
        C.set_lr(opt, cur_lr)
        for micro in range(args.accum_steps):
            batch = next(it)
            if batch["skipped"]:
                skipped_local += len(batch["skipped"])
                log.write(f"rank {d.rank}: skipped unreadable video(s): {', '.join(batch['skipped'])}")
            video = normalize(batch["video"].to(d.device, non_blocking=True))
            label = batch["label"].to(d.device, non_blocking=True)
            if mixup is not None:
                video, label = apply_mixup(mixup, video, label)  # soft targets
            sync = d.enabled and not fsdp and micro < args.accum_steps - 1
            with (model.no_sync() if sync else contextlib.nullcontext()), C.autocast(precision, d):
                logits = model(video)
            if mixup is not None:
                loss = torch.sum(-label * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits.float(), label, label_smoothing=args.smoothing)
            scaler.scale(loss / args.accum_steps).backward()
            loss_sum += loss.detach() / args.accum_steps
        C.optimizer_step(model, opt, scaler, args.clip_grad)
        if ema is not None:
            ema.update(C.unwrap(model), step=step)
        n_logged += 1
        done = step + 1
        log.tick()
        if on_step is not None:
            on_step(done, loss.detach())
        save_now = done % args.save_every == 0 or done == total
        if done % args.log_every == 0 or save_now:
            mean_loss = C.all_mean(loss_sum, d).item() / n_logged
            C.check_finite(mean_loss, done - n_logged + 1, done, last_saved, log)
            clips_s, mfu = C.throughput(global_clips, n_logged, time.perf_counter() - t0, step_flops, peak,
                                        d.world)
            skipped = skipped_total + C.all_sum_int(skipped_local, d)
            log.log(done, {"loss": mean_loss, "lr": cur_lr, "clips_per_s": clips_s, "mfu": mfu,
                           "skipped_videos": skipped})
            loss_sum.zero_()
            n_logged, t0 = 0, time.perf_counter()
        if args.val_list and ((args.eval_every and done % args.eval_every == 0) or done == total):
            res = evaluate(model, args, d, precision)
            if ema is not None:
                res.update({f"ema_{k}": v for k, v in evaluate(ema.module, args, d, precision).items()})
            log.log(done, res)
            log.write(f"step {done}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
            best = res
        if save_now:
            last_saved = ck.save(model, opt, {
                "step": done, "skipped_total": skipped, "scaler": scaler.state_dict(),
                "rng": C.gather_rng(None, d), "args": vars(args), "config": cfg.to_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "data": {"epoch": sampler.position(done)[0], "micro_in_epoch": sampler.position(done)[1]}})
    export = C.export_official(model, d, fsdp, f"{args.output_dir}/finetune_official.pth")
    if d.main:
        log.write(f"done: {total} steps; weights in {export}")
    log.close()
    C.teardown(d)
    return {"step": total, "export": export, "eval": best}


if __name__ == "__main__":
    main()
