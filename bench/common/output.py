"""What a benchmark's result file starts with, where it goes, and how it is written (JSON)."""
from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Sequence

from vmae_fast.checkpoint import write_atomic

from . import device as devmod
from .paths import results_dir


def result_header(module: str, argv: Sequence[str] | None, *, schema: int = 1, **fields) -> dict:
    """The first keys of every result: its schema, when it was made, the command that makes it
    again (``python -m bench.<module>``, which works installed and in a checkout alike), then
    ``fields`` (the machine, ``device_info``, among them)."""
    args = sys.argv[1:] if argv is None else argv
    return {"schema": schema, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": f"python -m bench.{module} " + " ".join(args), **fields}


def result_path(out_dir: str | Path | None, stem: str | None, kind: str, info: dict) -> Path:
    """``out_dir/<stem>.json``; the default folder is ``paths.results_dir()``, the default stem
    ``<kind>-<device>-<date>``."""
    stem = stem or f"{kind}-{devmod.device_slug(info)}-{_dt.date.today().isoformat()}"
    return Path(out_dir or results_dir()) / f"{stem}.json"


def save_result(result: dict, ns, kind: str, note: str = "") -> Path:
    """``result`` written where ``--out`` / ``--name`` (``ns``) say, and where, on stdout."""
    path = result_path(ns.out, ns.name, kind, result["device"])
    write_json(result, path)
    print(f"\nraw results: {path}{note}")
    return path


def write_json(result: dict, path: Path) -> None:
    """Atomic (vmae_fast's one writer): a killed run never leaves half a file."""
    write_atomic(path, json.dumps(result, indent=1, default=str))
