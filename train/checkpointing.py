"""Checkpoints and RNG state: what a run writes so that ``--resume`` continues it exactly.

A checkpoint is written in two phases. ``write_pending`` puts it beside the committed one; the
loop calls ``commit`` only once the loss of the weights it holds (the loss of the next step) is
known to be finite and not diverging, else ``discard``. So ``latest()`` never names weights that
already blew up, which a checkpoint written right after the step that diverged would hold.

Single process / DDP: rank 0 writes one ``torch.save`` file (``checkpoint-pending.pt``, renamed
over ``checkpoint-last.pt`` on commit). FSDP: a sharded ``torch.distributed.checkpoint`` folder
per save, written under a temporary name and renamed when complete; committing names it in
``checkpoint-latest.txt`` (replaced atomically) and deletes the previous one. A run killed at
any moment keeps its last committed checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import vmae_fast
from vmae_fast.checkpoint import check_torch_file, write_atomic

from .distributed import Dist, all_true, barrier, unwrap
from .errors import CheckpointWriteFailed

CHECKPOINT = "checkpoint-last.pt"     # single process and DDP: one file, replaced atomically
PENDING = "checkpoint-pending.pt"     # written, not yet vouched for by the next step's loss
DCP_LATEST = "checkpoint-latest.txt"  # FSDP: names the newest committed sharded checkpoint folder

# Model options that change how a model computes, not what: a resume may change them.
CONFIG_FREE = ("attn_backend", "arch")
# What "batch" and "schedule" mean when a resume compares its plan with the checkpoint's.
BATCH_KEYS = ("videos_per_step", "clips_per_step", "world", "steps_per_epoch", "seed")
SCHEDULE_KEYS = ("total_steps", "warmup_steps", "lr", "min_lr", "warmup_lr", "scaling")


# ----------------------------------------------------------------------------- RNG
def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random stream of this process: torch CPU (drop path and dropout on the CPU), CUDA
    (drop path on the GPU), numpy (timm's mixup/cutmix), python, and the named generators
    (the pretraining mask generator)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_state(s: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    for k, g in generators.items():
        if k in s["generators"]:
            g.set_state(s["generators"][k])


# ----------------------------------------------------------------------------- comparisons
def config_diff(saved: dict, current: dict, ignore=CONFIG_FREE) -> list[str]:
    """``["depth 2 -> 4", ...]`` for every model option that differs."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def plan_changes(saved: dict, current: dict) -> list[str]:
    """What a resume changes in the batch and the schedule, one phrase per group."""
    out = []
    for what, keys in (("batch", BATCH_KEYS), ("schedule", SCHEDULE_KEYS)):
        diff = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
                if k in saved and saved.get(k) != current.get(k)]
        if diff:
            out.append(f"{what} changed ({', '.join(diff)})")
    return out


def weights_finite(model: nn.Module, d: Dist) -> bool:
    """All parameters finite, on every rank (one host sync)."""
    flags = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in model.parameters()]
    ok = bool(torch.stack(flags).all().item()) if flags else True
    return all_true(ok, d)


# ----------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Writes, commits and finds the run's checkpoints (see the module doc)."""

    def __init__(self, out_dir: str | os.PathLike, d: Dist):
        self.dir, self.d, self.fsdp = Path(out_dir), d, d.fsdp
        self.pending: Path | None = None

    def latest(self) -> Path | None:
        """The newest committed checkpoint, or None."""
        if self.fsdp:
            f = self.dir / DCP_LATEST
            return self.dir / f.read_text().strip() if f.is_file() else None
        p = self.dir / CHECKPOINT
        return p if p.is_file() else None

    def clean_stale(self) -> None:
        """Remove what a killed run of this layout left uncommitted (rank 0; every rank waits)."""
        if self.d.main and self.dir.is_dir():
            if not self.fsdp:
                (self.dir / PENDING).unlink(missing_ok=True)
            else:
                for p in self.dir.glob("checkpoint-step*.dcp*"):
                    if p.is_dir() and p != self.latest():
                        shutil.rmtree(p)
        barrier(self.d)

    def other_layout(self) -> Path | None:
        """The committed checkpoint of the other layout (FSDP folder vs single file), if any."""
        p = self.dir / (CHECKPOINT if self.fsdp else DCP_LATEST)
        return p if p.is_file() else None

    def write_pending(self, model: nn.Module, opt, extra: dict) -> Path:
        """``extra``: plain data (step, config, the state set...). Every rank calls it. A write
        that fails on any rank (no space, an I/O error) removes what it wrote and raises
        ``CheckpointWriteFailed`` on every rank: the committed checkpoint is untouched."""
        if not self.fsdp:
            path = self.dir / PENDING
            err = None
            if self.d.main:
                try:
                    vmae_fast.save_atomic(dict(extra, model=unwrap(model).state_dict(), optimizer=opt.state_dict()),
                                          path)
                except OSError as exc:  # write_atomic removed its temporary file
                    err = exc
            self._agree(err, path)
            self.pending = path
            return path
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"checkpoint-step{extra['step']:08d}.dcp"
        tmp, final = self.dir / (name + ".tmp"), self.dir / name
        if self.d.main:
            for p in (tmp, final):
                if p.exists() and p != self.latest():
                    shutil.rmtree(p)
        barrier(self.d)
        msd, osd = get_state_dict(model, opt)
        err = None
        try:  # collective: a rank's failure reaches every rank as a CheckpointException
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            err = exc
        if self.d.main and err is None:
            try:
                vmae_fast.save_atomic(extra, tmp / "extra.pt")
                os.replace(tmp, final)
            except OSError as exc:
                err = exc
        self._agree(err, tmp, remove=tmp)
        self.pending = final
        return final

    def _agree(self, err: BaseException | None, path: Path, remove: Path | None = None) -> None:
        """Every rank learns whether the write succeeded everywhere; if not, rank 0 removes
        ``remove`` and every rank raises ``CheckpointWriteFailed``."""
        if all_true(err is None, self.d):
            return None
        if self.d.main and remove is not None and remove.exists():
            shutil.rmtree(remove, ignore_errors=True)
        why = _why(err) if err is not None else "it failed on another rank"
        raise CheckpointWriteFailed(f"writing the checkpoint {path} failed ({why})")

    def commit(self) -> Path:
        """Make the pending checkpoint the one ``latest()`` names (a rename, or for FSDP the
        atomic rewrite of ``checkpoint-latest.txt``: either the old or the new one is named)."""
        pending, self.pending = self.pending, None
        final = pending if self.fsdp else self.dir / CHECKPOINT
        err = None
        if self.d.main:
            try:
                if not self.fsdp:
                    os.replace(pending, final)
                else:
                    old = self.latest()
                    write_atomic(self.dir / DCP_LATEST, final.name)
                    if old is not None and old != final and old.exists():
                        shutil.rmtree(old)
            except OSError as exc:
                err = exc
        self._agree(err, final)
        return final

    def discard(self) -> None:
        path, self.pending = self.pending, None
        if path is not None and self.d.main and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        barrier(self.d)

    def read_extra(self, path: Path) -> dict:
        """The checkpoint's plain entries (no tensors of the model or optimizer are loaded;
        ``train.state.upgrade_legacy`` turns those of an older layout into today's)."""
        if path.is_dir():
            return torch.load(path / "extra.pt", map_location="cpu", weights_only=True)
        check_torch_file(path)  # a text file: one line naming it, not torch's remark about mmap
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ck.pop("model", None)
        ck.pop("optimizer", None)
        return ck

    def load(self, path: Path, model: nn.Module, opt=None) -> None:
        """Restores model (and optimizer, when given) in place."""
        if not self.fsdp:
            check_torch_file(path)
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            unwrap(model).load_state_dict(ck["model"])
            if opt is not None:
                opt.load_state_dict(ck["optimizer"])
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import state_dict as sd

        if opt is None:
            state = {"model": sd.get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=str(path))
            sd.set_model_state_dict(model, state["model"])
            return
        msd, osd = sd.get_state_dict(model, opt)
        state = {"model": msd, "optimizer": osd}
        dcp.load(state, checkpoint_id=str(path))
        sd.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _why(err: BaseException) -> str:
    """One line for a failed write: torch.distributed.checkpoint's ``CheckpointException`` holds
    each failed rank's exception (with its traceback, which its own text spells out)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, f in sorted(failures.items()):
            exc = f[0] if isinstance(f, tuple) else f
            parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        text = "; ".join(parts)
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def resolve_resume(text: str, ck: Checkpointer) -> Path | None:
    """``--resume``: '' -> None, 'auto' -> the newest committed checkpoint (or None), else the path."""
    if not text:
        return None
    if text == "auto":
        return ck.latest()
    return Path(text)


def full_state_dict(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Unsharded weights on the CPU under the official key names (rank 0 holds them under FSDP)."""
    if d.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.cpu() for k, v in unwrap(model).official_state_dict().items()}


def export_official(model: nn.Module, d: Dist, path: Path) -> Path | None:
    """Weights in the official key names, ``{'model': state_dict}``, written atomically by rank 0
    (every rank takes part in gathering them under FSDP). Returns the path on rank 0."""
    sd = full_state_dict(model, d)
    if not d.main:
        return None
    vmae_fast.save_atomic({"model": sd}, path)
    return path


