"""The one training loop: pretraining and fine-tuning each hand it a ``Task`` (model, data,
loss, extra state, evaluation) and it does the rest.

    plan       batch geometry and lr schedule (optim.make_plan: the official scaling)
    wrap       DDP / FSDP2, optimizer, loss scaler
    resume     refuse another model config, say what changed in batch or schedule, restore
               model, optimizer, scaler, task state and every RNG stream of every rank
    per step   lr -> micro-batches (no_sync but the last under DDP) -> loss of the weights a
               pending checkpoint holds decides its commit -> unscale, clip, step -> task.after_step
    every N    log (loss, lr, clips/s, MFU, skipped videos, epoch), stop on a non-finite loss,
               evaluate, write a checkpoint (committed after the next step's loss)
    end        commit the last checkpoint, export the weights under the official key names

Nothing in the loop is specific to one task; ``Task`` holds what is.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import distributed as dist_
from .checkpointing import (CONFIG_FREE, Checkpointer, config_diff, export_official, gather_rng, plan_changes,
                            resolve_resume, set_rng_state, weights_finite)
from .cli import UsageError
from .data import StepSampler, collate
from .metrics import Logger, peak_flops, throughput, truncate_metrics
from .optim import autocast, make_optimizer, make_plan, make_scaler, optimizer_step, resolve_precision, set_lr


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Task:
    """What differs between pretraining and fine-tuning."""

    name: str                                    # "pretrain" | "finetune": messages, export file name
    model: nn.Module                             # built, weights loaded, on the device, not wrapped
    model_config: dict                           # a resume must match it (VideoMAEConfig + head)
    loss: Callable[[nn.Module, dict], torch.Tensor]  # one micro-batch -> scalar loss (under autocast)
    dataset: torch.utils.data.Dataset | None     # training videos (None: evaluation only)
    flops_per_clip: float = 0.0                  # model FLOPs of one clip, forward + backward (MFU)
    layer_decay: float | None = None             # layer-wise lr decay (fine-tuning)
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # checkpointed with the RNG
    after_step: Callable[[nn.Module, int], None] | None = None  # e.g. the EMA update
    evaluate: Callable[[nn.Module], dict] | None = None         # -> {"acc1": ..., ...}
    eval_every: int = 0                          # steps (0: at the end only)
    state_dict: Callable[[], dict] | None = None          # extra state to checkpoint (EMA weights)
    load_state_dict: Callable[[dict], None] | None = None
    summary: str = ""                            # appended to the start line


class LossWatch:
    """Per-step losses stay on the device until a log row or a checkpoint decision needs them
    (one host sync there, none per step). Keeps the lowest finite step loss of the run."""

    def __init__(self, d: dist_.Dist, factor: float, lowest: float = math.inf):
        self.d, self.factor, self.lowest = d, factor, lowest
        self.unsynced: list[tuple[int, torch.Tensor]] = []
        self.window: list[float] = []  # synced losses since the last log row

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.unsynced.append((step, loss))

    def sync(self) -> tuple[int, float] | None:
        """Bring the unsynced losses (mean over ranks) to the host; returns ``(step, loss)`` of
        the first non-finite one, else None."""
        if not self.unsynced:
            return None
        steps = [s for s, _ in self.unsynced]
        values = dist_.all_mean(torch.stack([v for _, v in self.unsynced]), self.d).tolist()
        self.unsynced = []
        self.window += values
        for s, v in zip(steps, values):
            if not math.isfinite(v):
                return s, v
            self.lowest = min(self.lowest, v)
        return None

    def too_high(self, value: float) -> str | None:
        """Why weights with this loss must not be kept, or None."""
        if self.factor and value > self.factor * self.lowest:
            return f"loss {value:.4g} > {self.factor:g} x the run's lowest step loss {self.lowest:.4g}"
        return None

    def take_window(self) -> list[float]:
        w, self.window = self.window, []
        return w


def _loader(dataset, args, d: dist_.Dist, start: int, total: int):
    """``(sampler, loader)`` yielding this rank's micro-batches from optimizer step ``start``. The
    loader has its own generator: making an iterator draws worker seeds from it, and drawing them
    from the global stream would shift drop path after a resume."""
    sampler = StepSampler(len(dataset), args.batch_size, args.accum_steps, d.world, d.rank, args.seed, start, total)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, collate_fn=collate,
                                         pin_memory=d.device.type == "cuda",
                                         prefetch_factor=4 if args.num_workers else None,
                                         generator=torch.Generator().manual_seed(args.seed))
    return sampler, loader


def steps_per_epoch(n_videos: int, args, d: dist_.Dist) -> int:
    try:
        probe = StepSampler(n_videos, args.batch_size, args.accum_steps, d.world, d.rank, args.seed, 0, 1)
        return probe.steps_per_epoch
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _resume(args, d, task, ck: Checkpointer, path: Path, model, opt, scaler, plan_now: dict | None) -> dict:
    """Checks the checkpoint against this run, then restores model, optimizer, scaler and task
    state in place; returns its extra entries. RNG states are restored by the caller, last."""
    if path.is_dir() != d.fsdp:
        raise UsageError(f"--resume {path}: a {'sharded (FSDP) folder' if path.is_dir() else 'single file'}; "
                         f"this run {'is' if d.fsdp else 'is not'} --dist fsdp under torchrun")
    try:
        extra = ck.read_extra(path)
    except Exception as exc:  # truncated, not ours, unreadable
        raise UsageError(f"--resume {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if "config" not in extra or "step" not in extra:
        raise UsageError(f"--resume {path}: not a checkpoint written by train.{task.name}"
                         + (" (to start from a weights file use --finetune)" if task.name == "finetune" else ""))
    if extra.get("task", task.name) != task.name:
        raise UsageError(f"--resume {path}: a {extra['task']} checkpoint; this is {task.name}")
    # evaluation has no drop path or dropout: a model trained with other rates evaluates the same
    free = CONFIG_FREE + (("drop_path_rate", "head_drop_rate") if plan_now is None else ())
    diff = config_diff(extra["config"], task.model_config, ignore=free)
    if diff:
        raise UsageError(f"--resume {path}: the checkpoint's model differs from this run's "
                         f"({'; '.join(diff)}); use the same model options or another --output-dir")
    if plan_now is not None and extra.get("plan"):
        changes = plan_changes(extra["plan"], plan_now)
        if changes:
            warnings.warn(f"resuming {path} at step {extra['step']}: " + "; ".join(changes), stacklevel=3)
    ck.load(path, model, opt)
    if opt is not None:
        scaler.load_state_dict(extra["scaler"])
    if task.load_state_dict is not None and extra.get("task_state") is not None:
        task.load_state_dict(extra["task_state"])
    return extra


def run(args, d: dist_.Dist, task: Task, *, eval_only: bool = False, on_step=None) -> dict:
    """Train (or, ``eval_only``, evaluate) ``task``; returns a summary. ``on_step(step, loss)``
    runs after each optimizer step (tests use it to simulate a crash)."""
    ok = False
    try:
        out = _run(args, d, task, eval_only, on_step)
        ok = True
        return out
    finally:
        dist_.teardown(d, wait=ok)  # after an error other ranks may never reach a barrier


def _run(args, d: dist_.Dist, task: Task, eval_only: bool, on_step) -> dict:
    precision = resolve_precision(args.precision, d.device)
    plan = None
    if not eval_only:
        plan = make_plan(args, d.world, steps_per_epoch(len(task.dataset), args, d))
    plan_now = None if plan is None else dict(plan.to_dict(), world=d.world, seed=args.seed)

    model = dist_.wrap(task.model, d, bf16=precision == "bf16", compile=args.compile)
    opt = None if eval_only else make_optimizer(model, args, d.device, task.layer_decay,
                                                   task.model_config.get("depth"))
    scaler = make_scaler(precision, d.device)
    ck = Checkpointer(args.output_dir, d)

    path = resolve_resume(args.resume, ck)
    if args.resume == "auto" and path is None and ck.other_layout() is not None:
        raise UsageError(f"--resume auto: {args.output_dir} holds a {'single-file' if d.fsdp else 'sharded (FSDP)'} "
                         f"checkpoint ({ck.other_layout().name}); resume it {'without' if d.fsdp else 'with'} "
                         "--dist fsdp")
    if eval_only and path is None and not args.finetune:
        raise UsageError(f"--eval --resume auto: no checkpoint in {args.output_dir}")
    extra: dict = {}
    if path is not None:
        extra = _resume(args, d, task, ck, path, model, opt, scaler, plan_now)
    start = extra.get("step", 0)

    # Everything above only read files: a run that fails a check leaves no output behind.
    out = Path(args.output_dir)
    dropped = 0
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not eval_only:  # the rows of steps this run redoes would appear twice
            dropped = truncate_metrics(out, start)
    if not eval_only:
        ck.clean_stale()
    log = Logger(out, d.main, plan.total_steps if plan else 0, start, progress=not (args.no_progress or eval_only),
                 tensorboard=args.tensorboard)
    try:
        if eval_only:
            return _evaluate_only(args, d, task, model, log, path, start)
        return _train(args, d, task, model, opt, scaler, ck, log, plan, plan_now, precision, path, extra,
                      dropped, on_step)
    finally:
        log.close()


def _evaluate_only(args, d, task, model, log, path, start) -> dict:
    res = task.evaluate(model)
    log.log(start, {"eval_only": True, "weights": str(path or args.finetune), **res})
    log.write(f"{task.name} eval of {path or args.finetune}: " + ", ".join(
        f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    return {"step": start, "eval": res}


class _Run:
    """The state one training run carries from step to step, and the per-step pieces the loop
    in ``_train`` calls by name."""

    def __init__(self, args, d, task, model, opt, scaler, ck, log, plan, plan_now, precision, path, extra):
        self.args, self.d, self.task, self.model, self.opt, self.scaler = args, d, task, model, opt, scaler
        self.ck, self.log, self.plan, self.plan_now, self.precision = ck, log, plan, plan_now, precision
        self.start = extra.get("step", 0)
        # Skipped videos count files, each once (every rank's, and before a resume): a file that
        # fails again in a later epoch, or on another rank or worker, is not counted again.
        self.skipped_files = set(extra.get("skipped_files", ()))
        self.skipped_base = extra.get("skipped_total", 0) - len(self.skipped_files)  # older checkpoints: a count
        self.skipped_new: set[str] = set()
        self.skipped = self.skipped_base + len(self.skipped_files)
        self.best, self.last_eval = extra.get("best"), None
        self.watch = LossWatch(d, args.divergence_factor, extra.get("lowest_loss", math.inf))
        self.committed, self.committed_step = path, (self.start if path is not None else None)
        self.sampler, loader = _loader(task.dataset, args, d, self.start, plan.total_steps)
        self.batches = iter(loader)
        self.norms: list[torch.Tensor] = []
        self.last_loss = math.nan  # of the last logged step; save() comes right after a log row
        self.n_win, self.t0, self.t_out = 0, time.perf_counter(), 0.0  # t_out: eval and checkpoint time
        self.peak = peak_flops(d.device)

    def forward_backward(self) -> torch.Tensor:
        """One optimizer step's micro-batches; returns their mean loss (on the device)."""
        args, ddp = self.args, self.d.enabled and not self.d.fsdp
        total = None
        for micro in range(args.accum_steps):
            batch = next(self.batches)
            self.skipped_new.update(batch["skipped"])
            # DDP: all-reduce the gradients once, on the last micro-batch. (FSDP reduce-scatters
            # every micro-batch: keeping unsharded gradients would undo its memory saving.)
            sync_off = ddp and micro < args.accum_steps - 1
            with (self.model.no_sync() if sync_off else contextlib.nullcontext()), \
                    autocast(self.precision, self.d.device):
                loss = self.task.loss(self.model, batch)
            self.scaler.scale(loss / args.accum_steps).backward()
            part = loss.detach().float() / args.accum_steps
            total = part if total is None else total + part
        return total

    def vouch(self, step: int) -> None:
        """The loss just computed is the loss of the weights the pending checkpoint (written after
        step ``step``) holds: commit it, or drop it when that loss has grown too much."""
        self.stop_if_non_finite()
        why = self.watch.too_high(self.watch.window[-1])
        if why:
            self.ck.discard()
            warnings.warn(f"the checkpoint of step {step} was not kept: {why}", stacklevel=2)
        else:
            self.committed, self.committed_step = self.ck.commit(), step

    def stop_if_non_finite(self) -> None:
        bad = self.watch.sync()
        if bad:
            self.stop(f"the loss became {bad[1]} at step {bad[0]}", bad[0])

    def stop(self, what: str, step: int) -> None:
        self.ck.discard()
        self.log.log(step, {"event": "stopped", "reason": what})
        safe = (f"{self.committed} (step {self.committed_step}); resume from it with --resume auto and a lower lr, "
                "--clip-grad, or bf16 instead of fp16") if self.committed is not None else \
            "none: no checkpoint was kept"
        raise NonFiniteLoss(f"{what}. The last safe checkpoint is {safe}.")

    def log_row(self, done: int, lr: float) -> None:
        self.stop_if_non_finite()
        window = self.watch.take_window()
        self.sync_skipped()
        now = time.perf_counter()
        clips_s, mfu = throughput(self.plan.clips_per_step, self.n_win, now - self.t0 - self.t_out,
                                  self.task.flops_per_clip, self.peak, self.d.world)
        self.t0, self.t_out, self.n_win = now, 0.0, 0
        row = {"loss": sum(window) / len(window), "lr": lr, "clips_per_s": clips_s, "mfu": mfu,
               "skipped_videos": self.skipped, "epoch": self.sampler.position(done - 1)[0]}
        if self.norms:
            row["grad_norm"] = torch.stack(self.norms).float().mean().item()
            self.norms = []
        if self.scaler.is_enabled():
            row["loss_scale"] = self.scaler.get_scale()
        self.last_loss = window[-1]
        self.log.log(done, row)

    def sync_skipped(self) -> int:
        """Every rank's newly skipped files into ``skipped_files`` (collective); the count."""
        for new in dist_.gather_objects(sorted(self.skipped_new - self.skipped_files), self.d):
            self.skipped_files.update(new)
        self.skipped_new = set()
        self.skipped = self.skipped_base + len(self.skipped_files)
        return self.skipped

    def evaluate(self, done: int) -> None:
        res = self.last_eval = self.task.evaluate(self.model)
        if self.best is None or res["acc1"] > self.best["acc1"] or (  # a NaN acc1: nothing was read
                math.isnan(self.best["acc1"]) and not math.isnan(res["acc1"])):
            self.best = dict(res, step=done)
        self.log.log(done, {**res, "best_acc1": self.best["acc1"]})
        self.log.write(f"step {done}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items() if isinstance(v, float))
                       + f" (best acc1 {self.best['acc1']:.2f} at step {self.best['step']})")

    def save(self, done: int) -> None:
        """Write a pending checkpoint (right after a log row: losses synced, skips counted),
        unless the weights are not finite (stop) or the last loss already grew too much."""
        if not weights_finite(self.model, self.d):
            self.stop(f"the weights became non-finite at step {done}", done)
        why = self.watch.too_high(self.last_loss)
        if why:
            warnings.warn(f"no checkpoint written at step {done}: {why}", stacklevel=2)
            return
        epoch, micro = self.sampler.position(done)
        task = self.task
        self.ck.write_pending(self.model, self.opt, {
            "task": task.name, "step": done, "config": task.model_config, "plan": self.plan_now,
            "args": vars(self.args), "scaler": self.scaler.state_dict(), "rng": gather_rng(task.generators, self.d),
            "data": {"epoch": epoch, "micro_in_epoch": micro, "seed": self.args.seed},
            "skipped_total": self.skipped, "skipped_files": sorted(self.skipped_files),
            "lowest_loss": self.watch.lowest, "best": self.best,
            "task_state": task.state_dict() if task.state_dict is not None else None})


def _train(args, d, task, model, opt, scaler, ck, log, plan, plan_now, precision, path, extra, dropped,
           on_step) -> dict:
    r = _Run(args, d, task, model, opt, scaler, ck, log, plan, plan_now, precision, path, extra)
    start, total = r.start, plan.total_steps
    _seed_or_restore(args, d, task, path, extra, log, dropped)
    n_params = sum(p.numel() for p in task.model.parameters())
    log.write(f"{task.name} {task.model_config.get('arch')}: {n_params / 1e6:.1f}M params, {len(task.dataset)} "
              f"videos, {plan.clips_per_step} clips/step ({plan.videos_per_step} videos x {args.num_sample}), "
              f"{plan.describe()}, steps {start}->{total}, {precision}, world {d.world} "
              f"({'fsdp' if d.fsdp else 'ddp' if d.enabled else 'single'}){task.summary}")

    model.train()
    for step in range(start, total):
        lr = plan.lr_at(step)
        set_lr(opt, lr)
        loss = r.forward_backward()
        r.watch.add(step + 1, loss)
        if ck.pending is not None:
            r.vouch(step)
        norm = optimizer_step(model, opt, scaler, args.clip_grad)
        if norm is not None:
            r.norms.append(norm.detach())
        if task.after_step is not None:
            task.after_step(model, step)
        done = step + 1
        r.n_win += 1
        log.tick()
        if on_step is not None:
            on_step(done, loss)

        save_now = done % args.save_every == 0 or done == total
        if done % args.log_every == 0 or save_now:
            r.log_row(done, lr)
        t_pause = time.perf_counter()
        if task.evaluate is not None and ((task.eval_every and done % task.eval_every == 0) or done == total):
            r.evaluate(done)
        if save_now:
            r.save(done)
        r.t_out += time.perf_counter() - t_pause

    if ck.pending is not None:
        # The last checkpoint has no next step to vouch for it: its weights were checked finite
        # and the loss of the step that made them within the factor.
        r.committed = ck.commit()
    skipped = r.sync_skipped()
    export = export_official(model, d, Path(args.output_dir) / f"{task.name}_official.pth")
    log.write(f"done: {total} steps, {skipped} videos skipped; checkpoint {r.committed}; weights in {export}")
    return {"step": total, "export": export, "skipped": skipped, "checkpoint": r.committed, "eval": r.last_eval,
            "best": r.best}


def _seed_or_restore(args, d, task, path, extra, log, dropped) -> None:
    """RNG last, after everything that might draw from it: restored exactly on resume, else
    seeded per rank (model init used one seed on every rank, so FSDP shards one model)."""
    if path is None:
        if args.resume == "auto":
            log.write(f"--resume auto: no checkpoint in {args.output_dir} yet, starting at step 0")
        dist_.seed_all(args.seed + d.rank)
        return
    rngs, start = extra["rng"], extra["step"]
    if len(rngs) == d.world:
        set_rng_state(rngs[d.rank], task.generators)
    else:
        warnings.warn(f"the checkpoint holds the RNG states of {len(rngs)} ranks, this run has {d.world}: each "
                      "rank's streams are reseeded (drop path and mixup draws differ from an uninterrupted run)",
                      stacklevel=3)
        dist_.seed_all(args.seed + d.rank + start)
        for k, g in task.generators.items():  # the same on every rank
            if k in rngs[0]["generators"]:
                g.set_state(rngs[0]["generators"][k])
    log.write(f"resumed {path} at step {start}" + (f" ({dropped} metrics rows after it dropped)" if dropped else ""))
    log.log(start, {"event": "resume", "checkpoint": str(path)})
