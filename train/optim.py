"""Optimizer, learning-rate plan and precision: AdamW parameter groups (weight decay and
layer-wise lr decay as the official ``optim_factory``), the batch-size scaling of the lr, the
official per-step warmup + cosine schedule, autocast and the loss scaler."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

LR_SCALINGS = ("official", "clips")


# ----------------------------------------------------------------------------- parameter groups
def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 depth: int | None = None, no_decay_names=("pos_embed", "mask_token", "cls_token")) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms (every 1-d parameter), positional
    embeddings and the mask token. With ``layer_decay`` (fine-tuning), group ``lr_scale`` is
    ``layer_decay ** (depth + 1 - layer)``: layer 0 = patch/pos embedding, i+1 = block i,
    depth+1 = the rest (fc_norm, head)."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = _model_name(name)
        base = name.split(".")[-1]
        decay = not (p.ndim <= 1 or name.endswith(".bias") or base in no_decay_names)
        layer = 0
        if layer_decay is not None:
            if name.startswith(("patch_embed", "pos_embed", "cls_token")):
                layer = 0
            elif name.startswith("blocks."):
                layer = int(name.split(".")[1]) + 1
            else:
                layer = depth + 1
        key = (decay, layer)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


_WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel's and torch.compile's attribute


def _model_name(name: str) -> str:
    """A parameter's name in the model itself, whatever wraps it (DDP, torch.compile): the layer
    rules above read the model's own names."""
    while name.startswith(_WRAPPERS):
        name = name.split(".", 1)[1]
    return name


def make_optimizer(model: nn.Module, args, device: torch.device, layer_decay: float | None = None,
                   depth: int | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, args.weight_decay, layer_decay, depth)
    for g in groups:
        g.pop("names")
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(args.betas), eps=args.eps, **fused)


# ----------------------------------------------------------------------------- lr plan
@dataclass(frozen=True)
class Plan:
    """The batch geometry and lr schedule of a run (saved in checkpoints, compared on resume)."""

    videos_per_step: int      # batch x GPUs x accumulation (the official "total_batch_size")
    clips_per_step: int       # x num_sample
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float                 # peak
    min_lr: float
    warmup_lr: float          # where the warmup starts
    scaling: str              # official | clips | absolute (--lr)
    factor: float             # what base lrs were multiplied by

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.lr, self.min_lr, self.total_steps, self.warmup_steps, self.warmup_lr)

    def describe(self) -> str:
        how = {"official": f"{self.videos_per_step} videos/256, official scaling",
               "clips": f"{self.clips_per_step} clips/256, --lr-scaling clips",
               "absolute": "--lr, not scaled"}[self.scaling]
        return (f"lr {self.lr:.3g} (x{self.factor:.4g}: {how}), min {self.min_lr:.3g}, warmup from "
                f"{self.warmup_lr:.3g} over {self.warmup_steps} steps")

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(args, world: int, steps_per_epoch: int) -> Plan:
    """``--lr-scaling official`` (default), as run_mae_pretraining.py and run_class_finetuning.py:
    ``lr``, ``min_lr`` and ``warmup_lr`` are each multiplied by ``batch x GPUs x accum / 256``,
    ``batch`` counting videos (repeated augmentation's ``num_sample`` clips of a video are not
    counted). ``clips``: only ``lr`` is scaled, by ``batch x num_sample x GPUs x accum / 256``
    (this code's rule before; 4x the official peak at ``--num-sample 4``). ``--lr``: absolute,
    nothing scaled."""
    videos = args.batch_size * world * args.accum_steps
    clips = videos * args.num_sample
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_epochs * steps_per_epoch)
    if total < 1:
        raise ValueError(f"the run has no steps: --epochs {args.epochs} x {steps_per_epoch} steps per epoch")
    if args.lr is not None:
        return Plan(videos, clips, steps_per_epoch, total, min(warmup, total), args.lr, args.min_lr,
                    args.warmup_lr, "absolute", 1.0)
    if args.lr_scaling == "official":
        f = videos / 256
        return Plan(videos, clips, steps_per_epoch, total, min(warmup, total), args.base_lr * f,
                    args.min_lr * f, args.warmup_lr * f, "official", f)
    f = clips / 256
    return Plan(videos, clips, steps_per_epoch, total, min(warmup, total), args.base_lr * f, args.min_lr,
                args.warmup_lr, "clips", f)


def cosine_lr(step: int, base: float, final: float, total: int, warmup: int, warmup_start: float = 0.0) -> float:
    """Per-step schedule, the official ``utils.cosine_scheduler``: ``linspace(warmup_start, base,
    warmup)`` over the first ``warmup`` steps (both ends included), then ``final + (base - final)
    * (1 + cos(pi * i / n)) / 2`` for ``i = 0 .. n-1``, ``n = total - warmup``."""
    if step < warmup:
        return warmup_start + (base - warmup_start) * step / max(warmup - 1, 1)
    n = max(total - warmup, 1)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup) / n))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ----------------------------------------------------------------------------- precision
def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def optimizer_step(model: nn.Module, opt, scaler, clip_grad: float | None) -> torch.Tensor | None:
    """Unscale and clip (when asked; returns the gradient norm before clipping, on the device),
    step (the scaler skips steps with inf/nan gradients), update the loss scale, clear grads."""
    norm = None
    if clip_grad is not None:
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm
