"""Where bench runs from, and so where its results go by default.

In a source checkout results go beside the committed ones, in ``bench/results/``. Installed as a
package, ``bench/`` sits in site-packages, no place for a user's files: results go to
``./bench-results`` under the current directory instead.
"""
from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
# A checkout has its pyproject.toml above bench/; site-packages has none.
SOURCE_ROOT: Path | None = _ROOT if (_ROOT / "pyproject.toml").is_file() else None
INSTALLED_RESULTS = Path("bench-results")


def results_dir() -> Path:
    return SOURCE_ROOT / "bench" / "results" if SOURCE_ROOT else INSTALLED_RESULTS


def results_help() -> str:
    """The default results folder, as ``--help`` states it."""
    if SOURCE_ROOT:
        return f"{results_dir()}, this source checkout's; ./{INSTALLED_RESULTS} when bench is installed"
    return f"./{INSTALLED_RESULTS} under the current directory (bench is installed, not in a source checkout)"
