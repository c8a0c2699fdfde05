"""Where and how the benchmarks write their raw results (JSON under ``bench/results/``)."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from vmae_fast.checkpoint import write_atomic

from . import device as devmod


def result_path(out_dir: str | Path, stem: str | None, kind: str, info: dict, suffix: str = ".json") -> Path:
    """``out_dir/<stem>.json``; the default stem is ``<kind>-<device>-<date>``."""
    stem = stem or f"{kind}-{devmod.device_slug(info)}-{_dt.date.today().isoformat()}"
    return Path(out_dir) / f"{stem}{suffix}"


def write_json(result: dict, path: Path) -> None:
    """Atomic (vmae_fast's one writer): a killed run never leaves half a file."""
    write_atomic(path, json.dumps(result, indent=1, default=str))
