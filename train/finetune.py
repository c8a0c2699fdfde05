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
import warnings

import torch
import torch.nn.functional as F

import vmae_fast
from vmae_fast import envs
from vmae_fast.errors import ShapeMismatch
from vmae_fast.flops import encoder_macs
from vmae_fast.ops import normalize_uint8
from vmae_fast.video.decoders import resolve_decoder as decoder_name

from . import distributed as dist_
from . import loop
from .recipe import official
from .augment import ERASE_MODES, INTERPOLATIONS, erase_
from .cli import UsageError, check_common, check_file, make_parser, parse, read_list_checked, run_command, training_data
from .config import FinetuneConfig
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
    return parse(ap, argv, "finetune", FinetuneConfig, validate)


def validate(cfg: FinetuneConfig) -> None:
    """The checks of files and of the launch (the values were checked when ``cfg`` was built)."""
    check_common(cfg.run)
    for flag, path in (("--train-list", cfg.train_list), ("--val-list", cfg.val_list),
                       ("--finetune", cfg.run.start_weights)):
        check_file(flag, path)
    if cfg.model_ema and cfg.run.dist == "fsdp" and envs.WORLD_SIZE > 1:
        raise UsageError("--model-ema is not supported with --dist fsdp (the EMA copy would be unsharded)")


# ----------------------------------------------------------------------------- pieces
def make_mixup(cfg: FinetuneConfig):
    if not cfg.mixing:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                 num_classes=cfg.num_classes)


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


def load_start_weights(model, cfg: FinetuneConfig, d: dist_.Dist) -> None:
    """``--finetune FILE`` into the classifier: its head is kept when it has ``--num-classes``
    outputs, else left fresh (with ``--eval`` that is an error: there would be nothing to test)."""
    weights = cfg.run.start_weights
    try:
        sd = vmae_fast.unwrap_state_dict(vmae_fast.load_checkpoint_file(weights))
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--finetune {weights}: {exc}") from None
    head = sd.get("head.weight")
    keep_head = head is not None and head.shape[0] == cfg.num_classes
    if cfg.run.eval_only and not keep_head:
        has = "no classifier head" if head is None else f"a {head.shape[0]}-class head"
        raise UsageError(f"--eval --finetune {weights}: the file has {has}, --num-classes is {cfg.num_classes}")
    try:
        report = model.load_official_state_dict(sd, exclude=() if keep_head else ("head.",))
    except ShapeMismatch as exc:  # (a head of another class count is left out above: the backbone differs)
        more = f" and {len(exc.mismatched) - 3} more" if len(exc.mismatched) > 3 else ""
        raise UsageError(f"--finetune {weights}: its tensors do not fit this model (another --model, "
                         f"--model-overrides, --num-frames or --img-size?): {'; '.join(exc.mismatched[:3])}{more}"
                         ) from None
    except ValueError as exc:
        raise UsageError(f"--finetune {weights}: {exc}") from None
    if d.main:
        print(f"loaded {weights}: {summarize_load(report)}"
              + ("" if keep_head else "; head left fresh"), flush=True)


def make_evaluate(cfg: FinetuneConfig, d: dist_.Dist, precision: str, ema=None):
    """``evaluate(model) -> {acc1, acc5, videos, val_skipped}``: top-1/top-5 (%) of the softmax
    averaged over every view of each video, over the ``videos`` that were read; a video that fails
    to load is not replaced by another (that would count one twice, with its label) but counted in
    ``val_skipped``. Every rank takes part (FSDP needs equal batch counts: the last rank pads with
    repeats that are not counted; a batch with no video read runs a dummy one)."""
    entries = read_list_checked(cfg, "--val-list", "finetune", cfg.num_classes)
    ds = VideoDataset(entries, "test", cfg.num_frames, cfg.sampling_rate, cfg.img_size,
                      num_segments=cfg.test_num_segment, num_crops=cfg.test_num_crop, decoder=cfg.decoder,
                      substitute=False)
    per_rank = math.ceil(len(ds) / d.world)
    keys = [(0, min(d.rank + k * d.world, len(ds) - 1)) for k in range(per_rank)]
    valid = torch.tensor([d.rank + k * d.world < len(ds) for k in range(per_rank)])
    bs = cfg.eval_batch_size or cfg.run.batch_size
    views = cfg.test_num_segment * cfg.test_num_crop

    @torch.no_grad()
    def run_once(model) -> dict:
        # Own generator: a loader's iterator draws worker seeds, never from the global stream.
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=keys, num_workers=cfg.run.num_workers,
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
                    model(torch.zeros(views, 3, cfg.num_frames, cfg.img_size, cfg.img_size, dtype=torch.uint8,
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
            warnings.warn(f"evaluation: none of the {int(counts[3].item())} videos of {cfg.val_list} could be read",
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


def build(cfg: FinetuneConfig, d: dist_.Dist) -> loop.Task:
    run = cfg.run
    dist_.seed_all(run.seed)  # the same initial weights on every rank (FSDP shards one model)
    model = vmae_fast.create_model(cfg.model, cfg.num_classes, **cfg.model_options())
    if run.start_weights:
        load_start_weights(model, cfg, d)
    model.to(d.device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model_cfg = model.cfg
    precision = resolve_precision(run.precision, d.device)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
    evaluate = make_evaluate(cfg, d, precision, ema) if cfg.val_list else None
    config = dict(model_cfg.to_dict(), num_classes=cfg.num_classes, head_drop_rate=cfg.head_drop)
    if run.eval_only:
        return loop.Task(name="finetune", model=model, model_config=config, loss=None, dataset=None,
                         evaluate=evaluate, state=EmaState(ema) if ema is not None else None)
    entries = read_list_checked(cfg, "--train-list", "finetune", cfg.num_classes) if cfg.train_list else []
    dataset = VideoDataset(entries, "finetune", cfg.num_frames, cfg.sampling_rate, cfg.img_size,
                           num_sample=run.num_sample, seed=run.seed, min_scale=cfg.min_scale,
                           decoder=cfg.decoder, auto_augment=cfg.aa, train_interpolation=cfg.train_interpolation,
                           erase=cfg.erase_spec())
    mixup = make_mixup(cfg)

    def loss(model, batch) -> torch.Tensor:
        video = normalize_uint8(batch["video"].to(d.device, non_blocking=True))
        if "erase" in batch:  # boxes drawn in the workers, filled here: the transfer stays uint8
            erase_(video, batch["erase"], cfg.remode)
        label = batch["label"].to(d.device, non_blocking=True)
        if mixup is not None:
            video, label = apply_mixup(mixup, video, label)  # soft targets, smoothing included
        return F.cross_entropy(model(video).float(), label, label_smoothing=0.0 if mixup is not None else cfg.smoothing)

    return loop.Task(
        name="finetune", model=model, model_config=config, loss=loss, dataset=training_data(cfg, dataset),
        flops_per_clip=3 * 2 * (encoder_macs(model_cfg) + model_cfg.embed_dim * cfg.num_classes),
        layer_decay=cfg.layer_decay, evaluate=evaluate, eval_every=cfg.eval_every,
        after_step=(lambda m, step: ema.update(dist_.unwrap(m), step=step)) if ema is not None else None,
        state=EmaState(ema) if ema is not None else None,
        summary=f", {cfg.num_classes} classes, layer decay {cfg.layer_decay}, drop path {cfg.drop_path}"
                + (f", mixup {cfg.mixup} / cutmix {cfg.cutmix}" if mixup is not None else "")
                + f", RandAugment {cfg.aa if dataset.rand_augment else 'off'}"
                + f", erasing {f'{cfg.reprob} {cfg.remode} x{cfg.recount}' if dataset.erase else 'off'}"
                + f", decoder {decoder_name(cfg.decoder)}")


def main(argv=None, on_step=None) -> dict:
    """Runs the fine-tuning (or, with ``--eval``, the evaluation); returns a summary dict (see ``cli.run_command``)."""
    return run_command(parse_args, build, argv, on_step)


def cli() -> None:
    """The ``vmae-finetune`` console script."""
    from .cli import exit_process, run_cli

    exit_process(run_cli(main, "vmae-finetune"))


if __name__ == "__main__":
    cli()
