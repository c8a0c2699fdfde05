"""Where and how the benchmarks write their raw results (JSON under ``bench/results/``)."""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from . import device as devmod


def result_path(out_dir: str | Path, stem: str | None, kind: str, info: dict, suffix: str = ".json") -> Path:
    """``out_dir/<stem>.json``; the default stem is ``<kind>-<device>-<date>``."""
    stem = stem or f"{kind}-{devmod.device_slug(info)}-{_dt.date.today().isoformat()}"
    return Path(out_dir) / f"{stem}{suffix}"


def write_json(result: dict, path: Path) -> None:
    """Write through a temporary file and a rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
