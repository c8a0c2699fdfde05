"""What pretraining and fine-tuning share: arguments, distributed setup, optimizer groups, the
learning-rate schedule, precision, checkpoint/resume and logging."""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import vmae_fast
from vmae_fast.layers import Block

from .data import StepSampler, collate

CHECKPOINT = "checkpoint-last.pt"     # single process and DDP: one file, replaced atomically
DCP_LATEST = "checkpoint-latest.txt"  # FSDP: names the newest complete sharded checkpoint folder

# bf16 dense peak FLOP/s per GPU; MFU is reported as n/a elsewhere (CPU, unknown GPUs).
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- arguments
def parse_overrides(text: str | None) -> dict:
    """``"depth=2,embed_dim=64"`` (or a JSON object) -> ``{"depth": 2, "embed_dim": 64}``."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--model-overrides takes key=value pairs separated by commas, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def add_common_args(ap: argparse.ArgumentParser, *, base_lr: float, epochs: int, warmup_epochs: int,
                    batch_size: int) -> None:
    a = ap.add_argument
    a("--data-root", default="", help="folder the list's paths are relative to")
    a("--model", default="vit_base_patch16_224", help="arch name (docs/semantics.md §6)")
    a("--model-overrides", default="", help="VideoMAEConfig fields, e.g. 'depth=2,embed_dim=64'")
    a("--num-frames", type=int, default=16)
    a("--sampling-rate", type=int, default=4)
    a("--img-size", type=int, default=224)
    a("--num-sample", type=int, default=1, help="repeated augmentation: clips per decoded video")
    a("--batch-size", type=int, default=batch_size, help="videos per GPU per micro-batch")
    a("--accum-steps", type=int, default=1, help="gradient accumulation micro-batches per step")
    a("--epochs", type=int, default=epochs)
    a("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--warmup-epochs", type=float, default=warmup_epochs)
    a("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    a("--base-lr", type=float, default=base_lr, help="lr = base_lr x global clips per step / 256")
    a("--lr", type=float, default=None, help="absolute lr (skips the batch scaling)")
    a("--min-lr", type=float, default=1e-5)
    a("--warmup-lr", type=float, default=0.0)
    a("--weight-decay", type=float, default=0.05)
    a("--betas", type=float, nargs=2, default=(0.9, 0.95))
    a("--eps", type=float, default=1e-8)
    a("--clip-grad", type=float, default=None, help="max grad norm (none by default)")
    a("--drop-path", type=float, default=0.0)
    a("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
      help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a grad scaler")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad-checkpointing", action="store_true", help="activation checkpointing of every block")
    a("--dist", choices=("ddp", "fsdp"), default="ddp", help="engine when launched with torchrun")
    a("--dist-backend", default=None, help="nccl on CUDA, gloo on CPU by default")
    a("--device", default=None, help="cpu, cuda (under torchrun: the LOCAL_RANK GPU) or cuda:N "
      "(default: cuda when available)")
    a("--num-workers", type=int, default=8)
    a("--seed", type=int, default=0)
    a("--output-dir", required=True)
    a("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps (and at the end)")
    a("--resume", default="", help="'auto' (latest in --output-dir), a checkpoint path, or empty")
    a("--log-every", type=int, default=10)
    a("--no-progress", action="store_true", help="no tqdm bar (logs still go to metrics.jsonl)")


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(text: str | None, *, cuda_available: bool, device_count: int, current: int, local_rank: int,
                   world: int) -> tuple[torch.device, int | None]:
    """``(device, index for torch.cuda.set_device or None)`` for ``--device`` (no side effects,
    testable without CUDA). Default: CUDA when available, else the CPU. Bare ``cuda``: the GPU
    of this rank's ``LOCAL_RANK`` under torchrun, else the current device. ``cuda:N``: device N
    (one process only; torchrun's ranks would all land on it). Every CUDA device is made the
    current one, since streams, events, NCCL and library handles follow the current device."""
    text = text or ("cuda" if cuda_available else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"--device {text!r} is not a device ({exc})") from None
    if dev.type != "cuda":
        return dev, None
    if not cuda_available:
        raise ValueError(f"--device {text!r}: CUDA is not available on this machine")
    if dev.index is None:
        index = local_rank if world > 1 else current
    elif world > 1:
        raise ValueError(f"--device {text!r} names one GPU for all {world} processes torchrun started; "
                         "use --device cuda (each rank takes the GPU of its LOCAL_RANK)")
    else:
        index = dev.index
    if index >= device_count:
        raise ValueError(f"--device {text!r}: CUDA device {index} does not exist "
                         f"(this machine has {device_count})")
    return torch.device("cuda", index), index


def setup(args) -> Dist:
    """Device and process group from torchrun's environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    avail = torch.cuda.is_available()
    device, index = resolve_device(args.device, cuda_available=avail, local_rank=local, world=world,
                                   device_count=torch.cuda.device_count() if avail else 0,
                                   current=torch.cuda.current_device() if avail else 0)
    if index is not None:
        torch.cuda.set_device(index)
    if world > 1 and not dist.is_initialized():
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, **({"device_id": device} if device.type == "cuda" else {}))
    return Dist(rank, world, local, device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cpu_stream_stubs() -> None:
    """FSDP2 drives the device's streams and events; on the CPU those are no-op stubs, and the
    stub ``torch.cpu.Stream`` of older torch (2.6) lacks ``record_event``/``wait_event``. Adds
    them where missing, as no-ops like newer torch's own (the CPU runs everything in order)."""
    stream = torch.cpu.Stream
    if not hasattr(stream, "record_event"):
        stream.record_event = lambda self, event=None: None
    if not hasattr(stream, "wait_event"):
        stream.wait_event = lambda self, event: None


def wrap(model: nn.Module, args, d: Dist) -> nn.Module:
    """DDP or FSDP2 (``fully_shard`` per block, then the root) under torchrun; compile last."""
    if d.enabled and args.dist == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        cpu = d.device.type == "cpu"
        if cpu:
            _cpu_stream_stubs()
        mesh = init_device_mesh(d.device.type, (d.world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if resolve_precision(args, d) == "bf16" else MixedPrecisionPolicy()
        # On the CPU the blocks keep their gathered parameters from forward to backward (no second
        # all-gather before backward): there, FSDP2's all-gather copy-out bumps the parameters'
        # autograd version counters, which older torch (2.6) does not undo (pytorch/pytorch#132014),
        # and backward would then refuse the tensors forward saved. CUDA reshards after forward.
        for m in model.modules():
            if isinstance(m, Block):
                fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=not cpu)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not cpu)
    elif d.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if args.compile:
        model.compile()  # in place: state-dict keys keep their names (no "_orig_mod.")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


def all_sum_int(n: int, d: Dist) -> int:
    if not d.enabled:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=d.device)
    dist.all_reduce(t)
    return int(t.item())


# ----------------------------------------------------------------------------- optimization
def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 no_decay_names=("pos_embed", "mask_token", "cls_token")) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms (every 1-d parameter), positional
    embeddings and the mask token. With ``layer_decay`` (fine-tuning), group ``lr_scale`` is
    ``layer_decay ** (depth + 1 - layer)``: layer 0 = patch/pos embedding, i+1 = block i,
    depth+1 = the rest (fc_norm, head)."""
    depth = len(unwrap(model).blocks) if layer_decay is not None else 0
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
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


def make_optimizer(model: nn.Module, args, d: Dist, layer_decay: float | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, args.weight_decay, layer_decay)
    for g in groups:
        g.pop("names")
    fused = {"fused": True} if d.device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(args.betas), eps=args.eps, **fused)


def cosine_lr(step: int, base: float, final: float, total: int, warmup: int, warmup_start: float = 0.0) -> float:
    """Per-step schedule (the official ``cosine_scheduler``): linear warmup from
    ``warmup_start`` to ``base`` over ``warmup`` steps, then cosine from ``base`` to ``final``."""
    if step < warmup:
        return warmup_start + (base - warmup_start) * step / max(warmup - 1, 1)
    n = max(total - warmup, 1)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup) / n))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def resolve_precision(args, d: Dist) -> str:
    if args.precision == "auto":
        return "bf16" if d.device.type == "cuda" else "fp32"
    return args.precision


def autocast(precision: str, d: Dist):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(d.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_scaler(precision: str, d: Dist) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(d.device.type, enabled=precision == "fp16")


def schedule_lengths(args, steps_per_epoch: int) -> tuple[int, int]:
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_epochs * steps_per_epoch)
    if total < 1:
        raise ValueError(f"the run has no steps (epochs={args.epochs}, steps per epoch={steps_per_epoch})")
    return total, min(warmup, total)


# ----------------------------------------------------------------------------- RNG state
def rng_state(mask_gen: torch.Generator | None) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
        "mask": mask_gen.get_state() if mask_gen is not None else None,
    }


def set_rng_state(s: dict, mask_gen: torch.Generator | None) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    if mask_gen is not None and s["mask"] is not None:
        mask_gen.set_state(s["mask"])


def gather_rng(mask_gen, d: Dist) -> list:
    """Every rank's RNG state (drop path differs per rank), for rank 0 to save."""
    mine = rng_state(mask_gen)
    if not d.enabled:
        return [mine]
    out = [None] * d.world
    dist.all_gather_object(out, mine)
    return out


# ----------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Writes and finds the run's checkpoint. Single process / DDP: one ``torch.save`` file
    replaced atomically by rank 0. FSDP: a sharded ``torch.distributed.checkpoint`` folder
    written under a temporary name, renamed when complete, and named in ``checkpoint-latest.txt``
    (replaced atomically). A run killed at any moment keeps its previous checkpoint."""

    def __init__(self, out_dir: str | os.PathLike, d: Dist, fsdp: bool):
        self.dir, self.d, self.fsdp = Path(out_dir), d, fsdp

    def latest(self) -> Path | None:
        if self.fsdp:
            f = self.dir / DCP_LATEST
            return self.dir / f.read_text().strip() if f.is_file() else None
        p = self.dir / CHECKPOINT
        return p if p.is_file() else None

    def save(self, model: nn.Module, opt, extra: dict) -> Path:
        """``extra``: plain data (step, RNG of every rank, scaler, args...)."""
        if not self.fsdp:
            path = self.dir / CHECKPOINT
            if self.d.main:
                obj = dict(extra, model=unwrap(model).state_dict(), optimizer=opt.state_dict())
                vmae_fast.save_atomic(obj, path)
            if self.d.enabled:
                dist.barrier()
            return path
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"checkpoint-step{extra['step']:08d}.dcp"
        tmp, final = self.dir / (name + ".tmp"), self.dir / name
        if self.d.main and tmp.exists():
            shutil.rmtree(tmp)
        dist.barrier()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
        if self.d.main:
            vmae_fast.save_atomic(extra, tmp / "extra.pt")
            old = self.latest()
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.dir / DCP_LATEST, name)
            if old is not None and old != final and old.exists():
                shutil.rmtree(old)
        dist.barrier()
        return final

    def load(self, path: Path, model: nn.Module, opt) -> dict:
        """Restores model and optimizer in place; returns the extra dict."""
        if not self.fsdp:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            unwrap(model).load_state_dict(ck.pop("model"))
            opt.load_state_dict(ck.pop("optimizer"))
            return ck
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optimizer": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return torch.load(path / "extra.pt", map_location="cpu", weights_only=True)


def resume_path(args, ck: Checkpointer) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "auto":
        return ck.latest()
    p = Path(args.resume)
    if not p.exists():
        raise FileNotFoundError(f"--resume {p}: no such checkpoint")
    return p


def full_state_dict(model: nn.Module, d: Dist, fsdp: bool) -> dict[str, torch.Tensor]:
    """Unsharded weights on the CPU under the official key names (rank 0 holds them under FSDP)."""
    if fsdp and d.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.cpu() for k, v in unwrap(model).official_state_dict().items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- logging
def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


class Logger:
    """Rank 0 only: a tqdm bar, ``metrics.jsonl`` (one object per line) and TensorBoard when
    installed."""

    def __init__(self, out_dir: str | os.PathLike, d: Dist, total: int, start: int, progress: bool = True):
        self.main = d.main
        self.bar = self.tb = self.f = None
        if not self.main:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.f = open(Path(out_dir) / "metrics.jsonl", "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        row = {"step": step, "time": time.time(), **metrics}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()
                     if k in ("loss", "lr", "clips_per_s", "mfu", "acc1")}
            if "mfu" in shown and metrics.get("mfu") is None:
                shown["mfu"] = "n/a"
            self.bar.set_postfix(shown)

    def write(self, msg: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    with open(Path(out_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- shared loop set-up
def batch_plan(args, d, n_videos: int) -> tuple[int, int, float, int, int]:
    """``(clips per rank micro-batch, clips per optimizer step, peak lr, total steps, warmup
    steps)``; the lr is ``base_lr * global batch / 256`` unless ``--lr`` is given."""
    clips_micro = args.batch_size * args.num_sample
    global_clips = clips_micro * d.world * args.accum_steps
    lr = args.lr if args.lr is not None else args.base_lr * global_clips / 256
    probe = StepSampler(n_videos, args.batch_size, args.accum_steps, d.world, d.rank, args.seed, 0, 1)
    total, warmup = schedule_lengths(args, probe.steps_per_epoch)
    return clips_micro, global_clips, lr, total, warmup


def make_loader(dataset, args, d, start: int, total: int):
    """``(sampler, loader)`` yielding this rank's micro-batches from optimizer step ``start``."""
    sampler = StepSampler(len(dataset), args.batch_size, args.accum_steps, d.world, d.rank, args.seed, start, total)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, collate_fn=collate,
                                         pin_memory=d.device.type == "cuda",
                                         prefetch_factor=4 if args.num_workers else None)
    return sampler, loader


def restore(ck, path, model, opt, scaler, d, generator=None) -> dict:
    """Load a checkpoint written by ``Checkpointer.save`` (model, optimizer, scaler, this rank's
    RNG states); returns its extra entries (step, data position, ...)."""
    extra = ck.load(path, model, opt)
    scaler.load_state_dict(extra["scaler"])
    rngs = extra["rng"]
    set_rng_state(rngs[d.rank] if len(rngs) == d.world else rngs[0], generator)
    return extra


def export_official(model, d, fsdp: bool, path: str) -> str | None:
    """Weights in the official key names, ``{'model': state_dict}``, written atomically by rank 0
    (every rank takes part in gathering them under FSDP). Returns the path on rank 0."""
    sd = full_state_dict(model, d, fsdp)
    if not d.main:
        return None
    vmae_fast.save_atomic({"model": sd}, path)
    return path


# ----------------------------------------------------------------------------- shared step pieces
def optimizer_step(model, opt, scaler, clip_grad: float | None) -> None:
    """Unscale and clip (when asked), step, update the loss scale, clear the grads."""
    if clip_grad is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def check_finite(mean_loss: float, first: int, last: int, last_saved, log) -> None:
    """Stop with ``NonFiniteLoss`` before anything is saved over the last good checkpoint."""
    if math.isfinite(mean_loss):
        return
    log.close()
    raise NonFiniteLoss(
        f"loss became {mean_loss} between steps {first} and {last}; stopping. "
        f"The last good checkpoint is {last_saved or '(none yet)'} and was left as it was. "
        "Lower the lr, use bf16 instead of fp16, or set --clip-grad.")


def throughput(global_clips: int, steps: int, seconds: float, step_flops: float, peak: float | None,
               world: int) -> tuple[float, float | None]:
    """``(clips/s, MFU)``; MFU is None where the device's peak is unknown (CPU)."""
    clips_s = global_clips * steps / seconds
    mfu = clips_s * step_flops / global_clips / (peak * world) if peak else None
    return clips_s, mfu
