"""The command line both loops share: options, checks made before anything is created, the one
``main`` of both commands (``run_command``), and the console entry that turns a user's mistake
into one line on stderr (exit 2) instead of a traceback, and a stopped run into its status
(vmae_fast/errors.py has the table)."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

import vmae_fast
from vmae_fast.device import default_num_workers
from vmae_fast.video.decoders import add_decoder_arg
from vmae_fast.video.lists import read_list
from vmae_fast import envs
from vmae_fast import cli as _cli
from vmae_fast.errors import EXIT_STOPPED_BY_SIGNAL, UsageError, check_output
from vmae_fast.cli import ArgumentParser

from . import distributed as dist_
from . import loop, recipe
from .checkpointing import CHECKPOINT, DCP_LATEST
from .config import RunConfig, TaskConfig
from .errors import EXIT_CODES, StoppedBySignal
from .metrics import METRICS, tensorboard_available
from .optim import LR_SCALINGS

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
OUR_CODE = (str(PACKAGE_ROOT / "train") + os.sep, str(PACKAGE_ROOT / "vmae_fast") + os.sep)


# ----------------------------------------------------------------------------- options

def _arch(text: str) -> str:
    """``--model``: a full arch name or its alias (``vit_s``), as the README and vmae-bench take it."""
    try:
        return vmae_fast.config.resolve_arch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

def make_parser(kind: str, doc: str) -> argparse.ArgumentParser:
    return ArgumentParser(prog=f"vmae-{kind}", description=doc, epilog=recipe.help_table(kind),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def shards_or_usage(spec: str):
    """``vmae_fast.video.shards.resolve``: a missing shard or manifest as one usage line."""
    try:
        from vmae_fast.video.shards import ShardError, resolve
    except ImportError as exc:
        raise UsageError(f"--shards needs the webdataset package ({exc}): pip install 'vmae-fast[shards]'") from None
    try:
        return resolve(spec)
    except ShardError as exc:
        raise UsageError(str(exc)) from None


def training_data(cfg: TaskConfig, dataset):
    """What the loop reads: the list's ``dataset``, or, with ``--shards``, the shards loaded with
    ``dataset``'s options (``train/data_source.py``)."""
    from .data_source import ListSource, ShardSource

    log_dir = cfg.run.output_dir if cfg.log_samples else None
    if cfg.shards:
        return ShardSource(shards_or_usage(cfg.shards), dataset, cfg.run.seed, cfg.shuffle_buffer, log_dir)
    return ListSource(dataset, cfg.run.seed, log_dir)


def read_list_or_usage(flag: str, path: str, data_root: str, kind: str) -> list:
    """``vmae_fast.video.read_list``, its errors (a bad line, a missing file) as one usage line
    that names ``flag``."""
    try:
        return read_list(path, data_root, kind)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"{flag}: {exc}") from None


def read_list_checked(cfg: TaskConfig, flag: str, kind: str, num_classes: int | None = None) -> list:
    """The list that ``flag`` names, read and checked whole before the run makes anything: every
    label in ``[0, num_classes)`` (when given), every entry's file or frame folder present. Up to
    ``--max-missing`` missing files are allowed (named in one warning line; they are skipped and
    counted like unreadable videos); more refuse the run in one line that counts and names them."""
    path = getattr(cfg, flag[2:].replace("-", "_"))
    entries = read_list_or_usage(flag, path, cfg.data_root, kind)
    if num_classes is not None:
        bad = [e for e in entries if not 0 <= e.label < num_classes]
        if bad:
            raise UsageError(f"{flag} {path}: {len(bad)} of {len(entries)} labels are outside [0, {num_classes}) "
                             f"(--num-classes {num_classes}): " + _some(f"{e.path} {e.label}" for e in bad))
    # URLs (a decoder may stream them) are not files to look for
    missing = [e.path for e in entries if "://" not in e.path and not os.path.exists(e.path)]
    if len(missing) > cfg.max_missing:
        raise UsageError(f"{flag} {path}: {len(missing)} of {len(entries)} files are missing: {_some(missing)} "
                         f"(--max-missing {cfg.max_missing}; --data-root is {cfg.data_root or 'not set'!r})")
    if missing:
        warnings.warn(f"{flag} {path}: {len(missing)} of {len(entries)} files are missing, skipped like unreadable "
                      f"videos (--max-missing {cfg.max_missing}): {_some(missing)}", stacklevel=2)
    return entries


def _some(items, shown: int = 5) -> str:
    """The first ``shown`` of ``items``, and how many more."""
    items = list(items)
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")


def parse(ap: argparse.ArgumentParser, argv, kind: str, config: type[TaskConfig], validate) -> TaskConfig:
    """``ap`` (a loop's own options) with the common ones added, parsed; every option left at
    ``None`` filled from the official recipe of ``--model``; the task's ``config`` (its
    ``RunConfig`` inside) built once, its value checks first; then ``validate(cfg)``, the checks
    of files and environment. The namespace goes no further."""
    add_common_args(ap, kind)
    args = ap.parse_args(argv)
    if getattr(args, "lr", None) is not None and getattr(args, "base_lr", None) is not None:
        # two answers to one question: one would be dropped without a word
        raise UsageError(f"--lr {args.lr} and --base-lr {args.base_lr}: give one (--lr is the peak lr as it is, "
                         "--base-lr is scaled by the global batch)")
    recipe.fill_defaults(args, kind)
    cfg = config.from_args(args, RunConfig.from_args(args, kind, tuple(sys.argv[1:] if argv is None else argv)))
    validate(cfg)
    return cfg


def run_command(parse_args, build, argv=None, on_step=None) -> dict:
    """The ``main`` of both commands: parse, set up the processes, build the task, run it;
    returns the run's summary. ``on_step(step, loss)`` runs after each optimizer step (tests
    use it to simulate a crash)."""
    cfg = parse_args(argv)
    try:
        d = dist_.setup(cfg.run)
    except ValueError as exc:  # --device
        raise UsageError(str(exc)) from None
    return loop.Trainer(cfg.run, d, build(cfg, d), on_step=on_step).run()


def add_common_args(ap: argparse.ArgumentParser, kind: str) -> None:
    """Options of both loops. ``None`` defaults come from the official recipe of ``--model``
    (train/recipe.py, listed at the end of ``--help``)."""
    R = "(default: official recipe of --model)"
    a = ap.add_argument
    a("--data-root", default="", help="folder the lists' paths are relative to")
    a("--shards", default=None, metavar="SPEC",
      help="train from WebDataset shards written by vmae-shards instead of a list: a folder, a brace pattern "
           "(/data/shard-{000000..000127}.tar), file://, http(s):// or pipe: URLs (object stores); "
           "every epoch visits every sample once across ranks (README 'Shards')")
    a("--shuffle-buffer", type=int, default=64,
      help="--shards: samples a loader worker holds to shuffle (memory: this x a video's bytes per worker)")
    a("--log-samples", action="store_true",
      help="every rank appends {step, epoch, keys} lines to OUT/samples-rank<r>.jsonl (keys: list line numbers)")
    a("--max-missing", type=int, default=0,
      help="how many files a list may name that are not there before the run refuses (those are skipped)")
    a("--model", default=recipe.B, type=_arch, metavar="ARCH",
      help="arch, full name or alias (vit_s, vit_b, vit_l, vit_h, vit_g; docs/semantics.md §6)")
    a("--model-overrides", default="", help="VideoMAEConfig fields, e.g. 'depth=2,embed_dim=64'")
    a("--num-frames", type=int, default=None, help=R)
    a("--sampling-rate", type=int, default=None, help=f"frames between sampled frames {R}")
    a("--img-size", type=int, default=224)
    a("--num-sample", type=int, default=None, help=f"repeated augmentation: clips per decoded video {R}")
    a("--batch-size", type=int, default=None, help=f"videos per GPU per micro-batch {R}")
    a("--accum-steps", "--update-freq", type=int, default=1,
      help="micro-batches per optimizer step (the official --update_freq)")
    a("--epochs", type=int, default=None, help=R)
    a("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--warmup-epochs", type=float, default=None, help=R)
    a("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    a("--base-lr", type=float, default=None, help=f"lr before the batch scaling (the official --lr) {R}")
    a("--lr-scaling", choices=LR_SCALINGS, default="official",
      help="official (the default; what runs unless --lr is given): lr, min-lr and warmup-lr are each "
           "multiplied by batch x GPUs x accum-steps / 256 (videos; num-sample clips of a video not counted), "
           "as run_mae_pretraining.py / run_class_finetuning.py. clips: lr alone is multiplied by "
           "batch x num-sample x GPUs x accum-steps / 256; min-lr and warmup-lr stay absolute")
    a("--lr", type=float, default=None, help="absolute peak lr: nothing is scaled (min-lr, warmup-lr absolute)")
    a("--min-lr", type=float, default=None, help=f"end of the cosine, scaled as --lr-scaling says {R}")
    a("--warmup-lr", type=float, default=None, help=f"start of the linear warmup {R}: 0")
    a("--weight-decay", type=float, default=None, help=R)
    a("--betas", type=float, nargs=2, default=None, help=f"AdamW betas {R}")
    a("--eps", type=float, default=None, help=f"AdamW eps {R}")
    a("--clip-grad", type=float, default=None,
      help=f"max grad norm, 0 = none {R}: none except ViT-g pretraining 0.02")
    a("--drop-path", type=float, default=None, help=R)
    a("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
      help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 (the official) adds a loss scaler")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help=f"activation checkpointing of every block {R}: on for ViT-H/g pretraining")
    a("--dist", choices=("ddp", "fsdp"), default="ddp", help="engine when launched with torchrun")
    a("--dist-backend", default=None, help="nccl on CUDA, gloo on CPU by default")
    a("--device", default=None, help="cpu, cuda (under torchrun: the LOCAL_RANK GPU) or cuda:N "
      "(default: cuda when available)")
    add_decoder_arg(ap)
    a("--num-workers", type=int, default=default_num_workers(),
      help="data-loading processes (default: one per CPU this process may use, at most 8)")
    a("--seed", type=int, default=0)
    a("--output-dir", required=True)
    a("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps (and at the end)")
    a("--save-every-minutes", type=float, default=0.0,
      help="also a checkpoint once this many minutes passed since the last one (0: off); rank 0's clock")
    a("--resume", default="", help="'auto' (the last checkpoint in --output-dir, if any) or a checkpoint path; "
      "a group restarted by torchrun --max-restarts resumes by itself")
    a("--overwrite", action="store_true",
      help="start over in an --output-dir that holds an earlier run's metrics or checkpoints (they are removed)")
    a("--log-every", type=int, default=10)
    a("--divergence-factor", type=float, default=10.0,
      help="a checkpoint is kept only if the loss of its weights (the next step's) is finite and at most this "
           "many times the run's lowest step loss so far; a non-finite loss stops the run (0: no factor check)")
    a("--no-progress", action="store_true", help="no tqdm bar (logs still go to metrics.jsonl)")
    a("--tensorboard", action="store_true", help="also log to OUT/tb (needs the tensorboard package)")
    a("--debug", action="store_true", help="print the traceback of an error too")


# ----------------------------------------------------------------------------- checks
def check_file(flag: str, path: str | None) -> None:
    if path and not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")


def check_output_dir(path: str) -> None:
    """``--output-dir`` must be a folder that can be made and written (``check_output``)."""
    check_output("--output-dir", path, folder=True)


def check_common(cfg: RunConfig) -> None:
    """What both loops check of files and packages before creating anything (the values were
    checked when the config was built)."""
    if cfg.tensorboard and not tensorboard_available():
        raise UsageError("--tensorboard: the tensorboard package is not installed (it comes with the train "
                         "extra: pip install 'vmae-fast[train]', or pip install tensorboard)")
    if cfg.resume and cfg.resume != "auto" and not Path(cfg.resume).exists():
        raise UsageError(f"--resume {cfg.resume}: no such checkpoint")
    check_output_dir(cfg.output_dir)
    check_earlier_run(cfg)


def check_earlier_run(cfg: RunConfig) -> None:
    """A new run does not mix with an earlier one's files: a checkpoint it would not continue, or
    metrics rows with no checkpoint to continue them from (the run would truncate them)."""
    if cfg.eval_only or cfg.start_over or cfg.restart or (cfg.resume and cfg.resume != "auto"):
        return
    out = Path(cfg.output_dir)
    held = [name for name in (CHECKPOINT, DCP_LATEST) if (out / name).is_file()]
    rows = (out / METRICS).is_file() and (out / METRICS).stat().st_size > 0
    if not cfg.resume and held:
        raise UsageError(f"--output-dir {out} holds the checkpoint of an earlier run ({held[0]}); continue it "
                         "with --resume auto, start over with --overwrite, or choose another --output-dir")
    if rows and not held:
        raise UsageError(f"--output-dir {out} holds the metrics of an earlier run ({METRICS}) and no checkpoint "
                         "to continue from; start over with --overwrite (its rows are removed), or choose "
                         "another --output-dir")


# ----------------------------------------------------------------------------- console entry
def _our_frame(stack) -> tuple[str, int] | None:
    """Innermost frame of this repository's code (train/, vmae_fast/) on ``stack``."""
    for fs in reversed(stack):
        if fs.filename.startswith(OUR_CODE):
            return os.path.relpath(fs.filename, PACKAGE_ROOT), fs.lineno
    return None


@contextlib.contextmanager
def warnings_name_our_code(prog: str):
    """Print each warning as ``prog: warning: message [file:line]`` where ``file:line`` is the
    innermost line of our code that led to it: a warning raised inside torch (a DataLoader
    fetch, an optimizer) names the line of ours that called torch, not torch's own file."""
    saved = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        here = _our_frame(traceback.extract_stack()[:-1]) or (filename, lineno)
        print(f"{prog}: warning: {message} [{category.__name__} at {here[0]}:{here[1]}]",
              file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


def run_cli(main, prog: str, argv=None) -> int:
    """Run ``main(argv)`` under ``vmae_fast.cli.run_cli``: a ``UsageError`` (any check before
    the run starts) is one line on stderr and status 2; a stopped run (non-finite loss, a stop
    signal, a checkpoint that could not be written) its line and its status. Under torchrun each
    line names its rank; a stop signal's line (the same on every rank) comes from rank 0 only."""
    rank = envs.RANK
    tag = f"{prog}[rank {rank}]" if envs.WORLD_SIZE > 1 else prog

    def quiet(a):
        try:
            return main(a)
        except StoppedBySignal:
            if rank == 0:
                raise
            return EXIT_STOPPED_BY_SIGNAL
        except KeyboardInterrupt:  # Ctrl-C outside the training steps (setup, export): nothing to save
            print(f"{tag}: stopped: interrupted (SIGINT) outside the training steps; a committed checkpoint, "
                  "if any, is kept", file=sys.stderr, flush=True)
            return 128 + signal.SIGINT

    with warnings_name_our_code(tag):
        return _cli.run_cli(quiet, tag, argv, exit_codes=EXIT_CODES)


def exit_process(status: int) -> None:
    """End a training command's process with ``status``. In a rank of a torchrun group
    (``WORLD_SIZE > 1``), once ``run_cli`` has returned (the run's files written and closed, its
    process group destroyed), with ``os._exit``: under FSDP the gloo process group outlives
    ``destroy_process_group`` (its ``pt_gloo_runloop`` threads still run after it and a
    ``gc.collect()``: something in C++ holds it), and the interpreter's own teardown with those
    threads alive aborted a rank now and then ("terminate called without an active exception",
    SIGABRT: a finished run, or one stopped with its status, reported to torchrun as a crash; 1
    run in ~15 of tests/test_train_runs.py's FSDP test on a 2-core CPU). Nothing is left to tear
    down there: DataLoader workers leave when they see their parent gone."""
    if envs.WORLD_SIZE > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
