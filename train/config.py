"""What the training loop reads, typed and frozen: one ``RunConfig``, built once from the command
line (``RunConfig.from_args``) after the official recipe filled its defaults. A value that makes no
sense fails in ``__post_init__`` with one line in the flag's own words.

The task-specific options (masking ratios, augmentation, the head) stay with the task that reads
them (``train/pretrain.py``, ``train/finetune.py``); the loop sees only this object.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, fields

from vmae_fast import envs
from vmae_fast.errors import UsageError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """One training (or evaluation) run. Every field is the command-line option of the same name
    (``--output-dir`` is ``output_dir``) unless its comment says otherwise."""

    task: str
    """'pretrain' or 'finetune' (which command)"""
    output_dir: str
    """where checkpoints, metrics.jsonl and the exported weights go"""
    command: tuple[str, ...] = ()
    """the command line's arguments: the resume line repeats them"""
    eval_only: bool = False
    """``--eval``: evaluate the weights, no training"""
    start_weights: str = ""
    """``--finetune``: weights the model started from (messages of an evaluation)"""
    resume: str = ""
    """'' (start), 'auto' (the last committed checkpoint of output_dir, if any) or a path"""
    overwrite: bool = False
    """start over in an output_dir that holds metrics or checkpoints of an earlier run"""
    restart: int = 0
    """torchrun's TORCHELASTIC_RESTART_COUNT: above 0 a restarted group resumes by itself"""
    seed: int = 0
    """data order, masks and the initial weights; each rank's streams from seed + rank"""
    batch_size: int = 1
    """videos per process per micro-batch"""
    num_sample: int = 1
    """clips per decoded video (repeated augmentation)"""
    accum_steps: int = 1
    """micro-batches per optimizer step (the official --update_freq)"""
    num_workers: int = 0
    """DataLoader worker processes per rank"""
    steps: int | None = None
    """optimizer steps of the run (None: epochs x steps per epoch)"""
    epochs: int | None = None
    """passes over the data (the recipe's, unless --steps)"""
    warmup_steps: int | None = None
    """linear warmup steps (None: warmup_epochs x steps per epoch)"""
    warmup_epochs: float = 0.0
    """linear warmup in epochs"""
    base_lr: float | None = None
    """peak lr before the batch scaling (the official --lr)"""
    lr: float | None = None
    """absolute peak lr: nothing scaled"""
    lr_scaling: str = "official"
    """'official' (lr, min and warmup lr x videos/256) or 'clips' (lr x clips/256)"""
    min_lr: float = 0.0
    """end of the cosine (scaled as lr_scaling says)"""
    warmup_lr: float = 0.0
    """start of the warmup (scaled as lr_scaling says)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not on biases, norms, tables and tokens)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""
    eps: float = 1e-8
    """AdamW eps"""
    clip_grad: float | None = None
    """max gradient norm; ``--clip-grad 0`` is stored as None (no clipping)"""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with a loss scaler) or fp32"""
    compile: bool = False
    """torch.compile the model"""
    dist: str = "ddp"
    """engine under torchrun: ddp or fsdp"""
    dist_backend: str | None = None
    """process-group backend (None: nccl on CUDA, gloo on CPU)"""
    device: str | None = None
    """cpu, cuda or cuda:N (None: cuda when available)"""
    save_every: int = 1000
    """a checkpoint every N optimizer steps (and at the end)"""
    save_every_minutes: float = 0.0
    """also a checkpoint once this many minutes passed since the last one (0: off)"""
    log_every: int = 10
    """a metrics row every N steps"""
    divergence_factor: float = 10.0
    """a checkpoint is kept only while its loss is within this factor of the lowest (0: off)"""
    no_progress: bool = False
    """no tqdm bar"""
    tensorboard: bool = False
    """also log to OUT/tb"""

    def __post_init__(self):
        if self.clip_grad == 0:
            object.__setattr__(self, "clip_grad", None)
        object.__setattr__(self, "betas", tuple(self.betas))
        for name in ("batch_size", "num_sample", "accum_steps", "save_every", "log_every", "epochs"):
            self._at_least(name, 1)
        for name in ("num_workers", "warmup_steps"):
            self._at_least(name, 0)
        if self.steps is not None and self.steps < 1 and not self.eval_only:
            raise UsageError(f"--steps must be >= 1, got {self.steps}"
                             + (" (to evaluate without training use --eval)" if self.task == "finetune" else ""))
        if self.warmup_epochs < 0:
            raise UsageError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        for name in ("base_lr", "lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise UsageError(f"{_flag(name)} must be > 0, got {v}")
        for name in ("min_lr", "warmup_lr", "weight_decay", "save_every_minutes"):
            if getattr(self, name) < 0:
                raise UsageError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise UsageError(f"--clip-grad must be >= 0 (0: no clipping), got {self.clip_grad}")
        if self.divergence_factor != 0 and not self.divergence_factor > 1:
            raise UsageError(f"--divergence-factor must be > 1 (or 0 for none), got {self.divergence_factor}")
        if self.overwrite and self.resume:
            raise UsageError(f"--overwrite starts the run over; it cannot be combined with --resume {self.resume}")

    def _at_least(self, name: str, minimum: int) -> None:
        v = getattr(self, name)
        if v is not None and v < minimum:
            raise UsageError(f"{_flag(name)} must be >= {minimum}, got {v}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, task: str, command: tuple[str, ...] = ()) -> "RunConfig":
        """The fields read off ``args`` (the recipe's defaults already filled in)."""
        names = {f.name for f in fields(cls)} - {"task", "command", "eval_only", "start_weights", "restart"}
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)}, task=task, command=tuple(command),
                   eval_only=bool(getattr(args, "eval", False)), start_weights=getattr(args, "finetune", "") or "",
                   restart=envs.TORCHELASTIC_RESTART_COUNT)

    @property
    def auto_resume(self) -> bool:
        """Continue from the output folder's last checkpoint: asked for, or a restarted group."""
        return self.resume == "auto" or self.restart > 0

    @property
    def start_over(self) -> bool:
        """Remove an earlier run's metrics and checkpoints first (``--overwrite``; a restarted
        group resumes instead: the files are this run's own)."""
        return self.overwrite and self.restart == 0

    def resume_command(self, torchrun: bool = False) -> str:
        """The command that continues this run from its output folder (under torchrun: the
        module part, after the launcher's own options, which only the launcher knows)."""
        prog = f"torchrun ... -m train.{self.task}" if torchrun else f"vmae-{self.task}"
        args = list(self.command)
        kept, skip = [], False
        for a in args:  # drop --resume X / --resume=X and --overwrite: the resume line sets its own
            if skip:
                skip = False
            elif a == "--resume":
                skip = True
            elif not a.startswith("--resume=") and a != "--overwrite":
                kept.append(a)
        return prog + " " + shlex.join([*kept, "--resume", "auto"])
