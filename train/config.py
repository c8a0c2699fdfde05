"""Every option of a training command, typed and frozen, built once from the command line after the
official recipe (``train/recipe.py``) filled its defaults: ``PretrainConfig`` / ``FinetuneConfig``
(what the task builds: model, data, masking, augmentation, head), each holding the ``RunConfig``
the loop reads (``cfg.run``). A value that makes no sense fails in ``__post_init__`` with one line
in the flag's own words; checks that look at files or the environment come after
(``train/cli.py``, the task's ``validate``).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import shlex
from dataclasses import dataclass, fields

import vmae_fast
from vmae_fast import envs
from vmae_fast.errors import OptionError, UsageError, check_at_least, check_within, flag_of
from vmae_fast.masking import num_decoder_tokens, num_encoder_masked

from .augment import EraseSpec, parse_rand_augment


# the model factory's keywords set by a flag of a task (``factory_options``): keyword -> field
_FLAG_OF_OPTION = {"num_frames": "num_frames", "img_size": "img_size", "drop_path_rate": "drop_path",
                   "decoder_depth": "decoder_depth"}


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
        check_at_least(self, {"batch_size": 1, "num_sample": 1, "accum_steps": 1, "save_every": 1, "log_every": 1,
                              "epochs": 1, "num_workers": 0, "warmup_steps": 0})
        if self.steps is not None and self.steps < 1 and not self.eval_only:
            raise UsageError(f"--steps must be >= 1, got {self.steps}"
                             + (" (to evaluate without training use --eval)" if self.task == "finetune" else ""))
        check_at_least(self, {"warmup_epochs": 0, "seed": 0, "eps": 0})
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UsageError(f"--betas takes two numbers in [0, 1), got {' '.join(map(str, self.betas))}")
        for name in ("base_lr", "lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise UsageError(f"{flag_of(name)} must be > 0, got {v}")
        check_at_least(self, {"min_lr": 0, "warmup_lr": 0, "weight_decay": 0, "save_every_minutes": 0})
        if self.clip_grad is not None and self.clip_grad < 0:
            raise UsageError(f"--clip-grad must be >= 0 (0: no clipping), got {self.clip_grad}")
        if self.divergence_factor != 0 and not self.divergence_factor > 1:
            raise UsageError(f"--divergence-factor must be > 1 (or 0 for none), got {self.divergence_factor}")
        if self.overwrite and self.resume:
            raise UsageError(f"--overwrite starts the run over; it cannot be combined with --resume {self.resume}")

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


# ----------------------------------------------------------------------------- the tasks' options
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
            raise UsageError(f"--model-overrides takes key=value pairs separated by commas, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


# The factories' options that are not VideoMAEConfig fields (the classifier's head and attention
# options, checkpointing), read off their signatures: config_for checks the rest.
_FACTORY_ONLY = ({name for f in (vmae_fast.create_model, vmae_fast.create_pretrain_model)
                  for name in inspect.signature(f).parameters} - set(vmae_fast.VideoMAEConfig.__dataclass_fields__))


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """The options both tasks build their model and data from. Every field is the command-line
    option of the same name; a field without a default is filled by the official recipe of
    ``--model`` (``train/recipe.py``) unless given."""

    run: RunConfig
    """the loop's options (``RunConfig``)"""
    model: str
    """the arch's full name (``--model`` takes an alias too)"""
    model_overrides: str = ""
    """VideoMAEConfig fields on top of the arch, 'depth=2,embed_dim=64' or a JSON object"""
    num_frames: int
    """frames of a clip"""
    sampling_rate: int
    """frames between sampled frames"""
    img_size: int = 224
    """side of a clip's square frames"""
    drop_path: float
    """stochastic depth rate of the encoder"""
    grad_checkpointing: bool
    """activation checkpointing of every block"""
    data_root: str = ""
    """folder the lists' paths are relative to"""
    shards: str | None = None
    """WebDataset shards to train from instead of a list (a folder, a brace pattern, URLs)"""
    shuffle_buffer: int = 64
    """--shards: samples a loader worker holds to shuffle"""
    log_samples: bool = False
    """every rank logs the keys of the samples it trained on to OUT/samples-rank<r>.jsonl"""
    max_missing: int = 0
    """files a list may name that are not there before the run refuses"""
    decoder: str = "auto"
    """video decoder"""

    def __post_init__(self):
        check_at_least(self, {"num_frames": 1, "sampling_rate": 1, "img_size": 1, "shuffle_buffer": 1,
                              "max_missing": 0})

    def factory_options(self) -> dict:
        """The task's model factory keywords from its own options (``--model-overrides`` not yet)."""
        return dict(num_frames=self.num_frames, img_size=self.img_size, drop_path_rate=self.drop_path)

    def model_options(self) -> dict:
        """The keywords of the model factory: the options, then ``--model-overrides`` on top."""
        return {**self.factory_options(), **parse_overrides(self.model_overrides)}

    def model_config(self) -> vmae_fast.VideoMAEConfig:
        """The config the run will build (``UsageError`` on a bad size or option)."""
        opts = {k: v for k, v in self.model_options().items() if k not in _FACTORY_ONLY}
        try:
            return vmae_fast.config_for(self.model, **opts)
        except OptionError as exc:  # the flag that set the option, if one of ours did
            field = _FLAG_OF_OPTION.get(exc.option)
            if field is None or not hasattr(self, field) or exc.option in parse_overrides(self.model_overrides):
                raise UsageError(f"--model-overrides {self.model_overrides!r}: {exc}") from None
            raise UsageError(f"{flag_of(field)} {getattr(self, field)}: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise UsageError(f"model options: {exc}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace, run: RunConfig):
        """The fields read off ``args`` (the recipe's defaults already filled in)."""
        return cls(run=run, **{f.name: getattr(args, f.name) for f in fields(cls)
                               if f.name != "run" and hasattr(args, f.name)})


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(TaskConfig):
    """``vmae-pretrain``: dual masking (tube encoder mask, running-cell decoder mask)."""

    data_list: str | None = None
    """lines 'path start_idx total_frames [label]' (or shards)"""
    encoder_ratio: float
    """encoder mask ratio"""
    decoder_ratio: float
    """running-cell decoder mask ratio (0: encoder-only masking)"""
    encoder_mask_type: str = "tube"
    """'tube' or 'random'"""
    decoder_depth: int
    """decoder blocks"""

    def __post_init__(self):
        super().__post_init__()
        if bool(self.data_list) == bool(self.shards):
            raise UsageError("give the training data as --data-list LIST or --shards SPEC (one of them)")
        if not 0 <= self.encoder_ratio < 1:
            raise UsageError(f"--encoder-ratio must be in [0, 1), got {self.encoder_ratio}")
        cfg = self.model_config()  # a bad size or an unknown model option fails here
        try:
            num_encoder_masked(cfg.grid, self.encoder_ratio, self.encoder_mask_type)
            num_decoder_tokens(cfg.grid, self.decoder_ratio, self.encoder_ratio, self.encoder_mask_type)
        except ValueError as exc:
            t, h, w = cfg.grid
            why = (f" (--img-size {cfg.img_size} / patch {cfg.patch_size} gives {h}x{w} tokens a frame)"
                   if "grid" in str(exc) else "")
            raise UsageError(f"masking: {exc}{why}") from None

    def factory_options(self) -> dict:
        return dict(super().factory_options(), decoder_depth=self.decoder_depth)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TaskConfig):
    """``vmae-finetune``: a classifier, its augmentation and its evaluation. The weights it starts
    from (``--finetune``) and ``--eval`` are the run's (``run.start_weights``, ``run.eval_only``)."""

    train_list: str | None = None
    """lines 'path label' or 'folder total_frames label' (or shards; not needed with --eval)"""
    val_list: str | None = None
    """the same formats, evaluated every eval_every steps and at the end"""
    num_classes: int
    """outputs of the head; every label in [0, num_classes)"""
    layer_decay: float
    """layer-wise lr decay"""
    mixup: float
    """mixup alpha (0: off)"""
    cutmix: float
    """cutmix alpha (0: off)"""
    mixup_prob: float = 1.0
    """probability of mixing a batch"""
    mixup_switch_prob: float = 0.5
    """probability of cutmix instead of mixup when both are on"""
    smoothing: float
    """label smoothing"""
    min_scale: float = 0.08
    """random resized crop: smallest area fraction"""
    aa: str | None
    """RandAugment spec rand-m<magnitude>-n<ops>[-mstd<std>][-inc<0|1>][-w0] ('none' or '': off)"""
    train_interpolation: str
    """resampling of RandAugment's rotate/shear/translate"""
    reprob: float
    """random erasing probability per clip (0: off)"""
    remode: str
    """random erasing fill: pixel, rand or const"""
    recount: int
    """random erasing: up to this many boxes per clip"""
    head_drop: float
    """dropout before the head"""
    model_ema: bool = False
    """keep an EMA of the weights (evaluated beside them)"""
    model_ema_decay: float = 0.9999
    """the EMA's decay"""
    test_num_segment: int
    """clips per video at evaluation"""
    test_num_crop: int
    """crops per clip at evaluation"""
    eval_every: int = 0
    """evaluate every N steps (0: only at the end)"""
    eval_batch_size: int | None = None
    """videos per process at evaluation (None: run.batch_size)"""

    def __post_init__(self):
        super().__post_init__()
        run = self.run
        check_at_least(self, {"num_classes": 1})
        if run.eval_only:
            if not self.val_list:
                raise UsageError("--eval needs --val-list")
            if not (run.resume or run.start_weights):
                raise UsageError("--eval needs the weights to evaluate: --resume CHECKPOINT or --finetune FILE")
        elif bool(self.train_list) == bool(self.shards):
            raise UsageError("give the training data as --train-list LIST or --shards SPEC, one of them "
                             "(or --eval to evaluate only)")
        check_at_least(self, {"test_num_segment": 1, "test_num_crop": 1, "eval_batch_size": 1, "eval_every": 0,
                              "mixup": 0, "cutmix": 0})
        # (these ran unchecked: --smoothing 1.5, --layer-decay 0, --mixup-prob 3 trained without a word)
        check_within(self, {"layer_decay": "(0, 1]", "mixup_prob": "[0, 1]", "mixup_switch_prob": "[0, 1]",
                             "smoothing": "[0, 1)", "min_scale": "(0, 1]", "head_drop": "[0, 1)",
                             "model_ema_decay": "[0, 1]"})
        try:
            parse_rand_augment(self.aa)
            self.erase_spec()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.mixing and not run.eval_only and (run.batch_size * run.num_sample) % 2:
            raise UsageError(f"mixup/cutmix pair clips: --batch-size x --num-sample must be even, got "
                             f"{run.batch_size} x {run.num_sample} (or --mixup 0 --cutmix 0)")
        self.model_config()

    def factory_options(self) -> dict:
        return dict(super().factory_options(), head_drop_rate=self.head_drop)

    @property
    def mixing(self) -> bool:
        """Mixup or cutmix on."""
        return self.mixup > 0 or self.cutmix > 0

    def erase_spec(self) -> EraseSpec | None:
        """Random erasing (None when ``--reprob 0``); ``ValueError`` on a bad value."""
        spec = EraseSpec(probability=self.reprob, mode=self.remode, max_count=self.recount)
        return spec if spec.probability > 0 else None
