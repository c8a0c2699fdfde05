"""What a run reports: ``metrics.jsonl`` (one JSON object per line, every row with its ``step``),
a tqdm bar, TensorBoard when asked for, throughput and MFU. Rank 0 writes; other ranks no-op."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from vmae_fast.checkpoint import write_atomic
from vmae_fast.flops import datasheet_peak_tflops

METRICS = "metrics.jsonl"


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _rows(lines):
    """``(line, row)`` of every line that parses: a line cut short by a killed run is left out."""
    for line in lines:
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            continue


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``metrics.jsonl``; a line cut short by a killed run is left out."""
    with open(Path(out_dir) / METRICS, encoding="utf-8") as f:
        return [row for _, row in _rows(f)]


def truncate_metrics(out_dir: str | os.PathLike, step: int) -> int:
    """``truncate_jsonl`` of the run's ``metrics.jsonl``."""
    return truncate_jsonl(Path(out_dir) / METRICS, step)


def truncate_jsonl(path: str | os.PathLike, step: int) -> int:
    """Drop the rows of a JSONL log written after ``step`` (a resume redoes those steps, so they
    would appear twice) and any cut-short line; returns how many lines went. Rewritten
    atomically; rows without a ``step`` stay."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line, row in _rows(lines) if row.get("step", 0) <= step]
    if len(kept) != len(lines):
        write_atomic(path, "".join(k + "\n" for k in kept))
    return len(lines) - len(kept)


class Logger:
    """Rank 0 only: ``metrics.jsonl``, a tqdm bar (``progress``), and one TensorBoard writer in
    ``OUT/tb`` when ``tensorboard`` (a resume purges the events after its step)."""

    def __init__(self, out_dir: str | os.PathLike, main: bool, total: int, start: int, progress: bool = True,
                 tensorboard: bool = False):
        self.main = main
        self.bar = self.tb = self.f = None
        if not main:
            return
        self.f = open(Path(out_dir) / METRICS, "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm

            class Bar(tqdm):
                # no monitor thread: the loader's workers are forked from this process, and a
                # child inherits any lock a live thread holds (the bar is updated every step anyway)
                monitor_interval = 0

            self.bar = Bar(total=total, initial=start, dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start + 1 if start else None)

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
                if isinstance(v, (int, float)) and not isinstance(v, bool):
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
        self.bar = self.f = self.tb = None


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    # The datasheet bf16 dense peak; MFU is reported as n/a elsewhere (CPU, unknown GPUs).
    peak = datasheet_peak_tflops(torch.cuda.get_device_name(device))
    return None if peak is None else peak * 1e12


def throughput(clips_per_step: int, steps: int, seconds: float, flops_per_clip: float, peak: float | None,
               world: int) -> tuple[float, float | None]:
    """``(clips/s, MFU)``; MFU (model FLOPs, forward + backward, over the world's bf16 peak) is
    None where the device's peak is unknown (CPU)."""
    clips_s = clips_per_step * steps / seconds
    mfu = clips_s * flops_per_clip / (peak * world) if peak else None
    return clips_s, mfu
