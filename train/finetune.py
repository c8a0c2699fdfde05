"""Fine-tuning a VideoMAE V2 classifier from a pretrain file, with multi-view evaluation.

    vmae-finetune --train-list TRAIN --val-list VAL --num-classes 400 \\
        --finetune pretrain.pth --data-root ROOT --output-dir OUT [--resume auto]
    vmae-finetune --eval --finetune classifier.pth --val-list VAL --num-classes 400 --output-dir OUT
    torchrun --nproc_per_node 8 -m train.finetune ...          (python -m train.finetune: the same)

Layer-wise lr decay, RandAugment and random erasing (train/augment.py), mixup/cutmix with label
smoothing (timm), optional EMA (timm ModelEmaV3), top-1/top-5 over test_num_segment x
test_num_crop views per video (softmax averaged). Every default is the official Kinetics-400
recipe of --model (the table below).
"""
from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F

import vmae_fast
from vmae_fast import envs
from vmae_fast.flops import encoder_macs
from vmae_fast.ops import normalize_uint8
from vmae_fast.video.decoders import resolve_decoder as decoder_name

from . import distributed as dist_
from . import loop
from .recipe import official
from .augment import ERASE_MODES, INTERPOLATIONS, EraseSpec, erase_, parse_rand_augment
from .cli import (UsageError, check_common, check_file, check_model_config, make_parser, model_options, parse,
                  read_list_checked, run_command, training_data)
from .data import VideoDataset, collate
from .optim import autocast, resolve_precision


def parse_args(argv=None):
    ap = make_parser("finetune", __doc__)
    a = ap.add_argument
    a("--train-list", default=None, help="lines 'path label', or 'folder total_frames label' (official rawframes "
                                        "lists); not needed with --eval")
    a("--val-list", default=None, help="the same formats, evaluated every --eval-every steps and at the end; a video "
                                      "that fails to load is skipped (val_skipped), not replaced")
    a("--num-classes", type=int, required=True)
    a("--finetune", default="", help="weights to start from: a pretrain file, or a classifier (its head is kept "
                                     "when --num-classes matches)")
    a("--eval", action="store_true", help="only evaluate the weights of --resume or --finetune on --val-list")
    a("--layer-decay", type=float, default=None, help="layer-wise lr decay (default: official recipe of --model)")
    a("--mixup", type=float, default=None, help=f"mixup alpha, 0 = off {official('finetune', 'mixup')}")
    a("--cutmix", type=float, default=None, help=f"cutmix alpha, 0 = off {official('finetune', 'cutmix')}")
    a("--mixup-prob", type=float, default=1.0)
    a("--mixup-switch-prob", type=float, default=0.5)
    a("--smoothing", type=float, default=None, help=f"label smoothing {official('finetune', 'smoothing')}")
    a("--min-scale", type=float, default=0.08, help="random resized crop: smallest area fraction")
    a("--aa", default=None, metavar="SPEC",
      help="RandAugment of each training clip, the official --aa spec rand-m<magnitude>-n<ops>[-mstd<std>]"
           "[-inc<0|1>][-w0]; one draw of ops and magnitudes per clip; 'none' or '' = off "
           + official("finetune", "aa"))
    a("--train-interpolation", default=None, choices=INTERPOLATIONS,
      help="resampling of RandAugment's rotate/shear/translate " + official("finetune", "train_interpolation"))
    a("--reprob", type=float, default=None,
      help="random erasing probability per clip, 0 = off; one box for every frame, on the normalized clip "
           + official("finetune", "reprob"))
    a("--remode", default=None, choices=ERASE_MODES,
      help="random erasing fill: pixel (per-pixel N(0,1) noise), rand (one N(0,1) color per channel), "
           "const (0) " + official("finetune", "remode"))
    a("--recount", type=int, default=None,
      help="random erasing: up to this many boxes per clip, area split between them "
           + official("finetune", "recount"))
    a("--head-drop", type=float, default=None, help="dropout before the head (default: official recipe of --model)")
    a("--model-ema", action="store_true")
    a("--model-ema-decay", type=float, default=0.9999)
    a("--test-num-segment", type=int, default=None,
      help=f"clips per video at evaluation {official('finetune', 'test_num_segment')}")
    a("--test-num-crop", type=int, default=None,
      help=f"crops per clip at evaluation {official('finetune', 'test_num_crop')}")
    a("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    a("--eval-batch-size", type=int, default=None, help="videos per GPU at evaluation (default: --batch-size)")
    return parse(ap, argv, "finetune", validate)


def _model_options(args) -> dict:
    return model_options(args, num_frames=args.num_frames, img_size=args.img_size, drop_path_rate=args.drop_path,
                         head_drop_rate=args.head_drop)


def validate(args) -> vmae_fast.VideoMAEConfig:
    """Every check that needs no device and no data."""
    check_common(args)
    if args.num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.eval:
        if not args.val_list:
            raise UsageError("--eval needs --val-list")
        if not (args.resume or args.finetune):
            raise UsageError("--eval needs the weights to evaluate: --resume CHECKPOINT or --finetune FILE")
    elif bool(args.train_list) == bool(args.shards):
        raise UsageError("give the training data as --train-list LIST or --shards SPEC, one of them "
                         "(or --eval to evaluate only)")
    for flag, path in (("--train-list", args.train_list), ("--val-list", args.val_list),
                       ("--finetune", args.finetune)):
        check_file(flag, path)
    for flag, v in (("--test-num-segment", args.test_num_segment), ("--test-num-crop", args.test_num_crop),
                    ("--eval-batch-size", args.eval_batch_size)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    try:
        parse_rand_augment(args.aa)
        erase_spec(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    mixing = args.mixup > 0 or args.cutmix > 0
    if mixing and not args.eval and (args.batch_size * args.num_sample) % 2:
        raise UsageError(f"mixup/cutmix pair clips: --batch-size x --num-sample must be even, got "
                         f"{args.batch_size} x {args.num_sample} (or --mixup 0 --cutmix 0)")
    if args.model_ema and args.dist == "fsdp" and envs.WORLD_SIZE > 1:
        raise UsageError("--model-ema is not supported with --dist fsdp (the EMA copy would be unsharded)")
    return check_model_config(args, **_model_options(args))


# ----------------------------------------------------------------------------- pieces
def erase_spec(args) -> EraseSpec | None:
    """Random erasing of the options (None when ``--reprob 0``); ``ValueError`` on a bad value."""
    spec = EraseSpec(probability=args.reprob, mode=args.remode, max_count=args.recount)
    return spec if spec.probability > 0 else None


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


def _key_groups(keys, n: int = 4) -> str:
    """``['decoder.blocks.0.x', 'decoder.norm.w', 'mask_token']`` -> ``'decoder.*, mask_token'``."""
    heads = sorted({k.split(".")[0] + (".*" if "." in k else "") for k in keys})
    return ", ".join(heads[:n]) + (", ..." if len(heads) > n else "")


def summarize_load(report) -> str:
    """A ``LoadReport`` in one line: counts, and the key groups rather than every key."""
    parts = [f"{len(report.loaded)} tensors loaded ({report.format} file)"]
    for what in ("missing", "unexpected", "skipped"):
        keys = getattr(report, what)
        if keys:
            parts.append(f"{len(keys)} {what} ({_key_groups(keys)})")
    return "; ".join(parts)


def load_start_weights(model, args, d: dist_.Dist) -> None:
    """``--finetune FILE`` into the classifier: its head is kept when it has ``--num-classes``
    outputs, else left fresh (with ``--eval`` that is an error: there would be nothing to test)."""
    try:
        sd = vmae_fast.unwrap_state_dict(vmae_fast.load_checkpoint_file(args.finetune))
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--finetune {args.finetune}: {exc}") from None
    head = sd.get("head.weight")
    keep_head = head is not None and head.shape[0] == args.num_classes
    if args.eval and not keep_head:
        has = "no classifier head" if head is None else f"a {head.shape[0]}-class head"
        raise UsageError(f"--eval --finetune {args.finetune}: the file has {has}, --num-classes is {args.num_classes}")
    try:
        report = model.load_official_state_dict(sd, exclude=() if keep_head else ("head.",))
    except ValueError as exc:
        raise UsageError(f"--finetune {args.finetune}: {exc}") from None
    if d.main:
        print(f"loaded {args.finetune}: {summarize_load(report)}"
              + ("" if keep_head else "; head left fresh"), flush=True)


def make_evaluate(args, d: dist_.Dist, precision: str, ema=None):
    """``evaluate(model) -> {acc1, acc5, videos, val_skipped}``: top-1/top-5 (%) of the softmax
    averaged over every view of each video, over the ``videos`` that were read; a video that fails
    to load is not replaced by another (that would count one twice, with its label) but counted in
    ``val_skipped``. Every rank takes part (FSDP needs equal batch counts: the last rank pads with
    repeats that are not counted; a batch with no video read runs a dummy one)."""
    entries = read_list_checked(args, "--val-list", "finetune", args.num_classes)
    ds = VideoDataset(entries, "test", args.num_frames, args.sampling_rate, args.img_size,
                      num_segments=args.test_num_segment, num_crops=args.test_num_crop, decoder=args.decoder,
                      substitute=False)
    per_rank = math.ceil(len(ds) / d.world)
    keys = [(0, min(d.rank + k * d.world, len(ds) - 1)) for k in range(per_rank)]
    valid = torch.tensor([d.rank + k * d.world < len(ds) for k in range(per_rank)])
    bs = args.eval_batch_size or args.batch_size
    views = args.test_num_segment * args.test_num_crop

    @torch.no_grad()
    def run_once(model) -> dict:
        # Own generator: a loader's iterator draws worker seeds, never from the global stream.
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=keys, num_workers=args.num_workers,
                                             collate_fn=collate, pin_memory=d.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(0))
        was_training = model.training
        model.eval()
        # top1, top5, videos read, videos skipped: on the device, read once at the end (no sync per batch)
        counts = torch.zeros(4, dtype=torch.float64, device=d.device)
        for b, batch in enumerate(loader):
            loaded = batch["loaded"]
            ok_all = valid[b * bs:b * bs + len(loaded)]
            counts[3] += (ok_all & ~loaded).sum()
            if batch["video"] is None:  # nothing read: a dummy forward (FSDP: every rank gathers alike)
                with autocast(precision, d.device):
                    model(torch.zeros(views, 3, args.num_frames, args.img_size, args.img_size, dtype=torch.uint8,
                                      device=d.device))
                continue
            with autocast(precision, d.device):  # the classifier normalizes the uint8 clip itself
                logits = model(batch["video"].to(d.device, non_blocking=True))
            prob = logits.float().softmax(-1).view(-1, views, logits.shape[-1]).mean(1)
            label = batch["label"].view(-1, views)[:, 0].to(d.device, non_blocking=True)
            top = prob.topk(min(5, prob.shape[-1]), dim=-1).indices
            ok = ok_all[loaded].to(d.device, non_blocking=True)
            counts[0] += ((top[:, 0] == label) & ok).sum()
            counts[1] += ((top == label[:, None]).any(-1) & ok).sum()
            counts[2] += ok.sum()
        if d.enabled:
            torch.distributed.all_reduce(counts)
        counts = counts.cpu()
        model.train(was_training)
        n = counts[2].item()
        if not n:
            warnings.warn(f"evaluation: none of the {int(counts[3].item())} videos of {args.val_list} could be read",
                          stacklevel=2)
        return {"acc1": 100 * counts[0].item() / n if n else math.nan,
                "acc5": 100 * counts[1].item() / n if n else math.nan,
                "videos": int(n), "val_skipped": int(counts[3].item())}

    def evaluate(model) -> dict:
        res = run_once(model)
        if ema is not None:
            res.update({f"ema_{k}": v for k, v in run_once(ema.module).items() if k not in ("videos", "val_skipped")})
        return res

    return evaluate


class EmaState:
    """The EMA weights as the task's piece of the run's state set."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return {"ema": self.ema.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ema.module.load_state_dict(state["ema"])


def build(args, d: dist_.Dist) -> loop.Task:
    dist_.seed_all(args.seed)  # the same initial weights on every rank (FSDP shards one model)
    model = vmae_fast.create_model(args.model, args.num_classes, **_model_options(args))
    if args.finetune:
        load_start_weights(model, args, d)
    model.to(d.device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    cfg = model.cfg
    precision = resolve_precision(args.precision, d.device)
    ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.model_ema_decay)
    evaluate = make_evaluate(args, d, precision, ema) if args.val_list else None
    config = dict(cfg.to_dict(), num_classes=args.num_classes, head_drop_rate=args.head_drop)
    if args.eval:
        return loop.Task(name="finetune", model=model, model_config=config, loss=None, dataset=None,
                         evaluate=evaluate, state=EmaState(ema) if ema is not None else None)
    entries = read_list_checked(args, "--train-list", "finetune", args.num_classes) if args.train_list else []
    dataset = VideoDataset(entries, "finetune", args.num_frames, args.sampling_rate, args.img_size,
                           num_sample=args.num_sample, seed=args.seed, min_scale=args.min_scale,
                           decoder=args.decoder, auto_augment=args.aa, train_interpolation=args.train_interpolation,
                           erase=erase_spec(args))
    mixup = make_mixup(args)

    def loss(model, batch) -> torch.Tensor:
        video = normalize_uint8(batch["video"].to(d.device, non_blocking=True))
        if "erase" in batch:  # boxes drawn in the workers, filled here: the transfer stays uint8
            erase_(video, batch["erase"], args.remode)
        label = batch["label"].to(d.device, non_blocking=True)
        if mixup is not None:
            video, label = apply_mixup(mixup, video, label)  # soft targets, smoothing included
        return F.cross_entropy(model(video).float(), label, label_smoothing=0.0 if mixup is not None else args.smoothing)

    return loop.Task(
        name="finetune", model=model, model_config=config, loss=loss, dataset=training_data(args, dataset),
        flops_per_clip=3 * 2 * (encoder_macs(cfg) + cfg.embed_dim * args.num_classes),
        layer_decay=args.layer_decay, evaluate=evaluate, eval_every=args.eval_every,
        after_step=(lambda m, step: ema.update(dist_.unwrap(m), step=step)) if ema is not None else None,
        state=EmaState(ema) if ema is not None else None,
        summary=f", {args.num_classes} classes, layer decay {args.layer_decay}, drop path {args.drop_path}"
                + (f", mixup {args.mixup} / cutmix {args.cutmix}" if mixup is not None else "")
                + f", RandAugment {args.aa if dataset.rand_augment else 'off'}"
                + f", erasing {f'{args.reprob} {args.remode} x{args.recount}' if dataset.erase else 'off'}"
                + f", decoder {decoder_name(args.decoder)}")


def main(argv=None, on_step=None) -> dict:
    """Runs the fine-tuning (or, with ``--eval``, the evaluation); returns a summary dict (see ``cli.run_command``)."""
    return run_command(parse_args, build, argv, on_step)


def cli() -> None:
    """The ``vmae-finetune`` console script."""
    from .cli import run_cli

    sys.exit(run_cli(main, "vmae-finetune"))


if __name__ == "__main__":
    cli()
