"""The one training loop: pretraining and fine-tuning each hand a ``Trainer`` their ``Task``
(model, data, loss, extra state, evaluation) and a ``RunConfig``; the trainer owns the run.

    plan       batch geometry and lr schedule (optim.make_plan: the official scaling)
    wrap       DDP / FSDP2, optimizer, loss scaler
    resume     refuse another model config, say what changed in batch or schedule, restore
               model, optimizer and the state set (``Trainer.state``: data position, scaler,
               loss watch, skip counts, best evaluation, task state, every RNG stream of every rank)
    per step   lr -> micro-batches (no_sync but the last under DDP) -> loss of the weights a
               pending checkpoint holds decides its commit -> unscale, clip, step -> task.after_step
               -> the ranks agree on stop signals and the save clock (train/signals.py)
    every N    log (loss, lr, clips/s, MFU, skipped videos, epoch), stop on a non-finite loss,
               evaluate, write a checkpoint (committed after the next step's loss)
    on signal  write and commit a checkpoint, stop with the command that resumes (exit 4)
    end        commit the last checkpoint, export the weights under the official key names

Nothing in the loop is specific to one task; ``Task`` holds what is.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from vmae_fast.errors import UsageError

from . import distributed as dist_
from .checkpointing import (CHECKPOINT, CONFIG_FREE, DCP_LATEST, Checkpointer, config_diff, export_official,
                            plan_changes, resolve_resume, weights_finite)
from .config import RunConfig
from .data_source import source_of
from .errors import CheckpointWriteFailed, NonFiniteLoss, StoppedBySignal
from .metrics import METRICS, Logger, peak_flops, throughput, truncate_metrics
from .optim import autocast, make_optimizer, make_plan, make_scaler, optimizer_step, resolve_precision, set_lr
from .signals import StopRequests
from .state import BestEval, DataPosition, LossWatch, RngState, SkipCount, Stateful, upgrade_legacy

CHECKPOINT_FORMAT = 2  # 1 (no "format" key): one top-level key per piece, read by state.upgrade_legacy

__all__ = ["Task", "Trainer", "LossWatch", "NonFiniteLoss", "StoppedBySignal", "CheckpointWriteFailed"]


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
    state: Stateful | None = None                # the task's own piece of the state set (EMA weights)
    summary: str = ""                            # appended to the start line


class Trainer:
    """One training (or evaluation) run: built from the task and the config, ``run()`` does it.

    Its state besides weights and optimizer is ``state()``, a set of named pieces each with a
    ``state_dict``/``load_state_dict`` pair; the checkpoint saves and restores that set whole."""

    def __init__(self, cfg: RunConfig, d: dist_.Dist, task: Task, *, on_step=None):
        self.cfg, self.d, self.task, self.on_step = cfg, d, task, on_step
        self.prog = f"vmae-{task.name}"
        self.precision = resolve_precision(cfg.precision, d.device)
        self.plan = None
        # where the batches come from (a list or shards, train/data_source.py); its position is
        # the state's "data" piece
        self.source = None if cfg.eval_only else source_of(task.dataset, cfg.seed)
        if not cfg.eval_only:
            try:
                per_epoch = self.source.steps_per_epoch(cfg, d)
            except ValueError as exc:  # fewer videos than one step needs
                raise UsageError(str(exc)) from None
            self.plan = make_plan(cfg, d.world, per_epoch)
        self.plan_now = None if self.plan is None else dict(self.plan.to_dict(), world=d.world, seed=cfg.seed)
        self.model = dist_.wrap(task.model, d, bf16=self.precision == "bf16", compile=cfg.compile)
        self.opt = None if cfg.eval_only else make_optimizer(self.model, cfg, d.device, task.layer_decay,
                                                             task.model_config.get("depth"))
        self.scaler = make_scaler(self.precision, d.device)
        self.ck = Checkpointer(cfg.output_dir, d)
        self.step = 0  # optimizer steps done (the schedule's position)
        self.data = self.source.position if self.source is not None else DataPosition(cfg.seed)
        self.watch = LossWatch(d, cfg.divergence_factor)
        self.skips = SkipCount(d)
        self.evals = BestEval()
        self.rng = RngState(task.generators, d, cfg.seed)
        self.committed: Path | None = None  # the newest committed checkpoint, and its step
        self.committed_step: int | None = None
        self.log: Logger | None = None
        self.n_win, self.t0, self.t_out = 0, time.perf_counter(), 0.0  # t_out: eval and checkpoint time
        self.peak = peak_flops(d.device)

    def state(self) -> dict[str, Stateful]:
        """The pieces a checkpoint holds besides model and optimizer, by name; RNG last, so that
        restoring it comes after everything that might draw."""
        pieces: dict[str, Stateful] = {"data": self.data, "scaler": self.scaler, "loss_watch": self.watch,
                                       "skips": self.skips, "best_eval": self.evals}
        if self.task.state is not None:
            pieces["task"] = self.task.state
        pieces["rng"] = self.rng
        return pieces

    # ------------------------------------------------------------------------- the run
    def run(self) -> dict:
        """Train (or, with ``--eval``, evaluate); returns a summary."""
        ok = False
        try:
            out = self._run()
            ok = True
            return out
        except (StoppedBySignal, CheckpointWriteFailed, NonFiniteLoss):
            ok = True  # every rank stops at the same point: they leave together, with one status
            raise
        finally:
            dist_.teardown(self.d, wait=ok)  # after an error other ranks may never reach a barrier

    def _run(self) -> dict:
        path = self._find_checkpoint()
        if path is not None:
            self._restore(path)
        else:
            # seeded per rank (model init used one seed on every rank, so FSDP shards one model)
            dist_.seed_all(self.cfg.seed + self.d.rank)
        # Everything above only read files: a run that fails a check leaves no output behind.
        dropped = self._prepare_output()
        cfg = self.cfg
        self.log = Logger(cfg.output_dir, self.d.main, self.plan.total_steps if self.plan else 0, self.step,
                          progress=not (cfg.no_progress or cfg.eval_only), tensorboard=cfg.tensorboard)
        try:
            if cfg.eval_only:
                return self._evaluate_only(path)
            if path is not None:
                self.log.write(f"resumed {path} at step {self.step}"
                               + (f" ({dropped} metrics rows after it dropped)" if dropped else "")
                               + (f" (torchrun restart {cfg.restart})" if cfg.restart else ""))
                self.log.log(self.step, {"event": "resume", "checkpoint": str(path)})
            elif cfg.auto_resume:
                self.log.write(f"--resume auto: no checkpoint in {cfg.output_dir} yet, starting at step 0")
            return self._train()
        finally:
            self.log.close()

    def _find_checkpoint(self) -> Path | None:
        cfg, ck = self.cfg, self.ck
        resume = "auto" if cfg.auto_resume else cfg.resume
        path = resolve_resume(resume, ck)
        if resume == "auto" and path is None and ck.other_layout() is not None:
            raise UsageError(f"--resume auto: {cfg.output_dir} holds a "
                             f"{'single-file' if self.d.fsdp else 'sharded (FSDP)'} checkpoint "
                             f"({ck.other_layout().name}); resume it {'without' if self.d.fsdp else 'with'} "
                             "--dist fsdp")
        if cfg.eval_only and path is None and not cfg.start_weights:
            raise UsageError(f"--eval --resume auto: no checkpoint in {cfg.output_dir}")
        return path

    def _read_checkpoint(self, path: Path) -> dict:
        """The checkpoint's plain entries, checked against this run (today's layout)."""
        d, name = self.d, self.task.name
        if path.is_dir() != d.fsdp:
            raise UsageError(f"--resume {path}: a {'sharded (FSDP) folder' if path.is_dir() else 'single file'}; "
                             f"this run {'is' if d.fsdp else 'is not'} --dist fsdp under torchrun")
        try:
            extra = self.ck.read_extra(path)
        except Exception as exc:  # truncated, not ours, unreadable
            raise UsageError(f"--resume {path}: cannot read it ({type(exc).__name__}: {exc})") from None
        if "config" not in extra or "step" not in extra:
            raise UsageError(f"--resume {path}: not a checkpoint written by train.{name}"
                             + (" (to start from a weights file use --finetune)" if name == "finetune" else ""))
        if extra.get("format", 1) > CHECKPOINT_FORMAT:
            raise UsageError(f"--resume {path}: written in checkpoint format {extra['format']} by a newer "
                             f"vmae-fast; this one reads up to {CHECKPOINT_FORMAT}")
        if extra.get("task", name) != name:
            raise UsageError(f"--resume {path}: a {extra['task']} checkpoint; this is {name}")
        # evaluation has no drop path or dropout: a model trained with other rates evaluates the same
        free = CONFIG_FREE + (("drop_path_rate", "head_drop_rate") if self.plan_now is None else ())
        diff = config_diff(extra["config"], self.task.model_config, ignore=free)
        if diff:
            raise UsageError(f"--resume {path}: the checkpoint's model differs from this run's "
                             f"({'; '.join(diff)}); use the same model options or another --output-dir")
        if self.plan_now is not None and extra.get("plan"):
            changes = plan_changes(extra["plan"], self.plan_now)
            if changes:
                warnings.warn(f"resuming {path} at step {extra['step']}: " + "; ".join(changes), stacklevel=4)
        return upgrade_legacy(extra)

    def _restore(self, path: Path) -> None:
        """Model, optimizer and the state set, in place (evaluation: the model and the task's
        piece, e.g. its EMA weights)."""
        extra = self._read_checkpoint(path)
        self.ck.load(path, self.model, self.opt)
        saved = extra["state"]
        if self.cfg.eval_only:
            if self.task.state is not None and "task" in saved:
                self.task.state.load_state_dict(saved["task"])
            return
        self.step = self.rng.step = extra["step"]
        for name, piece in self.state().items():
            if name in saved:
                piece.load_state_dict(saved[name])
        self.committed, self.committed_step = path, self.step

    def _prepare_output(self) -> int:
        """The output folder: made; with ``--overwrite`` an earlier run's files go; metrics rows
        after the resumed step (which this run redoes) go. Returns how many rows were dropped."""
        cfg, out, dropped = self.cfg, Path(self.cfg.output_dir), 0
        if self.d.main:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.start_over:
                for p in (out / METRICS, out / CHECKPOINT, out / DCP_LATEST):
                    p.unlink(missing_ok=True)
                for p in [*out.glob("checkpoint-step*.dcp*"), out / "tb"]:
                    shutil.rmtree(p, ignore_errors=True)
            if not cfg.eval_only:
                dropped = truncate_metrics(out, self.step)
        if not cfg.eval_only:
            self.ck.clean_stale()
        else:
            dist_.barrier(self.d)
        return dropped

    def _evaluate_only(self, path) -> dict:
        cfg = self.cfg
        res = self.task.evaluate(self.model)
        weights = path or cfg.start_weights
        self.log.log(self.step, {"eval_only": True, "weights": str(weights), **res})
        self.log.write(f"{self.task.name} eval of {weights}: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
        return {"step": self.step, "eval": res}

    def _train(self) -> dict:
        cfg, d, task, plan, log = self.cfg, self.d, self.task, self.plan, self.log
        start, total = self.step, plan.total_steps
        batches = self.source.batches(cfg, d, start, total)
        n_params = sum(p.numel() for p in task.model.parameters())
        log.write(f"{task.name} {task.model_config.get('arch')}: {n_params / 1e6:.1f}M params, {len(task.dataset)} "
                  f"videos, {plan.clips_per_step} clips/step ({plan.videos_per_step} videos x {cfg.num_sample}), "
                  f"{plan.describe()}, steps {start}->{total}, {self.precision}, world {d.world} "
                  f"({'fsdp' if d.fsdp else 'ddp' if d.enabled else 'single'}){task.summary}")

        self.model.train()
        with StopRequests(d, self.prog, cfg.save_every_minutes) as stops:
            for step in range(start, total):
                lr = plan.lr_at(step)
                set_lr(self.opt, lr)
                loss = self._forward_backward(batches)
                self.watch.add(step + 1, loss)
                if self.ck.pending is not None:
                    self._vouch(step)
                norm = optimizer_step(self.model, self.opt, self.scaler, cfg.clip_grad)
                if norm is not None:
                    self.watch.norms.append(norm.detach())
                if task.after_step is not None:
                    task.after_step(self.model, step)
                done = self.step = self.data.step = step + 1
                self.n_win += 1
                log.tick()
                if self.on_step is not None:
                    self.on_step(done, loss)

                signum, clock_due = stops.check()
                save_now = done % cfg.save_every == 0 or done == total
                if done % cfg.log_every == 0 or save_now:
                    self._log_row(done, lr)
                t_pause = time.perf_counter()
                if task.evaluate is not None and ((task.eval_every and done % task.eval_every == 0) or done == total):
                    self._evaluate(done)
                if save_now or clock_due or signum:
                    self._save(done)
                    stops.saved()
                if signum and done < total:
                    self._stop_for_signal(signum, done)
                self.t_out += time.perf_counter() - t_pause

        if self.ck.pending is not None:
            # The last checkpoint has no next step to vouch for it: its weights were checked finite
            # and the loss of the step that made them within the factor.
            self._commit(total)
        self.source.close()
        skipped = self.skips.sync()
        export = export_official(self.model, d, Path(cfg.output_dir) / f"{task.name}_official.pth")
        log.write(f"done: {total} steps, {skipped} videos skipped; checkpoint {self.committed}; weights in {export}")
        return {"step": total, "export": export, "skipped": skipped, "checkpoint": self.committed,
                "eval": self.evals.last, "best": self.evals.best}

    # ------------------------------------------------------------------------- per step
    def _forward_backward(self, batches) -> torch.Tensor:
        """One optimizer step's micro-batches; returns their mean loss (on the device)."""
        accum, ddp = self.cfg.accum_steps, self.d.enabled and not self.d.fsdp
        total = None
        for micro in range(accum):
            batch = next(batches)
            self.source.took(batch, self.step)
            self.skips.add(batch["skipped"])
            # DDP: all-reduce the gradients once, on the last micro-batch. (FSDP reduce-scatters
            # every micro-batch: keeping unsharded gradients would undo its memory saving.)
            sync_off = ddp and micro < accum - 1
            with (self.model.no_sync() if sync_off else contextlib.nullcontext()), \
                    autocast(self.precision, self.d.device):
                loss = self.task.loss(self.model, batch)
            self.scaler.scale(loss / accum).backward()
            part = loss.detach().float() / accum
            total = part if total is None else total + part
        return total

    def _vouch(self, step: int) -> None:
        """The loss just computed is the loss of the weights the pending checkpoint (written after
        step ``step``) holds: commit it, or drop it when that loss has grown too much."""
        self._stop_if_non_finite()
        why = self.watch.too_high(self.watch.window[-1])
        if why:
            self.ck.discard()
            warnings.warn(f"the checkpoint of step {step} was not kept: {why}", stacklevel=2)
        else:
            self._commit(step)

    def _commit(self, step: int) -> None:
        try:
            self.committed, self.committed_step = self.ck.commit(), step
        except CheckpointWriteFailed as exc:
            raise CheckpointWriteFailed(f"{exc}; {self._kept()}") from None

    def _kept(self) -> str:
        if self.committed is None:
            return "no checkpoint of this run was committed before it"
        return f"the last committed checkpoint, {self.committed} (step {self.committed_step}), is kept"

    def _stop_if_non_finite(self) -> None:
        bad = self.watch.sync()
        if bad:
            self._stop(f"the loss became {bad[1]} at step {bad[0]}", bad[0])

    def _stop(self, what: str, step: int) -> None:
        self.ck.discard()
        self.log.log(step, {"event": "stopped", "reason": what})
        safe = (f"{self.committed} (step {self.committed_step}); resume from it with --resume auto and a lower lr, "
                "--clip-grad, or bf16 instead of fp16") if self.committed is not None else \
            "none: no checkpoint was kept"
        raise NonFiniteLoss(f"{what}. The last safe checkpoint is {safe}.")

    def _stop_for_signal(self, signum: int, done: int) -> None:
        """After the checkpoint of step ``done`` was written: commit it (like the last one of a
        run, no next step vouches for it), log, and stop with the resume command."""
        if self.ck.pending is not None:
            self._commit(done)
        name = signal.Signals(signum).name
        self.log.log(done, {"event": "stopped", "reason": name, "checkpoint": str(self.committed)})
        where = (f"checkpoint {self.committed} (step {self.committed_step})" if self.committed is not None
                 else "no checkpoint (none could be kept)")
        raise StoppedBySignal(f"{name} at step {done}: {where}; resume with: "
                              f"{self.cfg.resume_command(torchrun=self.d.enabled)}")

    def _log_row(self, done: int, lr: float) -> None:
        self._stop_if_non_finite()
        window = self.watch.take_window()
        skipped = self.skips.sync()
        now = time.perf_counter()
        clips_s, mfu = throughput(self.plan.clips_per_step, self.n_win, now - self.t0 - self.t_out,
                                  self.task.flops_per_clip, self.peak, self.d.world)
        self.t0, self.t_out, self.n_win = now, 0.0, 0
        row = {"loss": sum(window) / len(window), "lr": lr, "clips_per_s": clips_s, "mfu": mfu,
               "skipped_videos": skipped, "epoch": self.source.epoch(done)}
        norms = self.watch.take_norms()
        if norms is not None:
            row["grad_norm"] = norms.mean().item()
        if self.scaler.is_enabled():
            row["loss_scale"] = self.scaler.get_scale()
        self.log.log(done, row)

    def _evaluate(self, done: int) -> None:
        res = self.task.evaluate(self.model)
        best = self.evals.update(res, done)
        self.log.log(done, {**res, "best_acc1": best["acc1"]})
        self.log.write(f"step {done}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items() if isinstance(v, float))
                       + f" (best acc1 {best['acc1']:.2f} at step {best['step']})")

    def _save(self, done: int) -> None:
        """Write a pending checkpoint, unless the weights are not finite (stop) or the last loss
        already grew too much. A write that fails stops the run (``CheckpointWriteFailed``)."""
        self._stop_if_non_finite()  # every loss on the host: the last one decides
        if not weights_finite(self.model, self.d):
            self._stop(f"the weights became non-finite at step {done}", done)
        why = self.watch.too_high(self.watch.last)
        if why:
            warnings.warn(f"no checkpoint written at step {done}: {why}", stacklevel=2)
            return
        extra = {"format": CHECKPOINT_FORMAT, "task": self.task.name, "step": done,
                 "config": self.task.model_config, "plan": self.plan_now, "args": asdict(self.cfg),
                 "state": {name: piece.state_dict() for name, piece in self.state().items()}}
        try:
            self.ck.write_pending(self.model, self.opt, extra)
        except CheckpointWriteFailed as exc:
            self.log.log(done, {"event": "stopped", "reason": str(exc)})
            raise CheckpointWriteFailed(f"{exc}; {self._kept()}; resume with: "
                                        f"{self.cfg.resume_command(torchrun=self.d.enabled)}") from None
