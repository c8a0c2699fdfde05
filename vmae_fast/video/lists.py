"""Dataset lists: one video (file or frame folder) per line, with the numbers the official
VideoMAE V2 lists carry (``read_list``; docs/semantics.md §9). Paths are relative to a data root;
a UTF-8 BOM is ignored.

    pretraining  ``path start_idx total_frames``  (``total_frames`` -1 for a video file), or the
                 official hybrid list's ``path start_idx total_frames label``
    fine-tuning  ``path label``, or the official rawframes list's ``folder total_frames label``
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    path: str            # absolute path (data root joined)
    start_idx: int = 0
    total_frames: int = -1  # -1: count from the file
    label: int = -1


def _fail(list_path, lineno, expected, line, why=""):
    raise ValueError(f"{list_path}:{lineno}: expected '{expected}'{', ' + why if why else ''}; "
                     f"got {line.rstrip()!r}")


# The list formats, by kind: field names after the path (the numbers are split off the right).
LIST_FORMATS = {
    "pretrain": (("start_idx", "total_frames"),            # this repository's / VideoMAE's
                 ("start_idx", "total_frames", "label")),  # the official HybridVideoMAE's
    "finetune": (("label",),                               # video files (Kinetics), or folders
                 ("total_frames", "label")),               # the official rawframes format (SSv2)
}
RAWFRAMES_START_IDX = 1  # the official fine-tuning ``--start_idx`` default for ``folder total_frames label``


def _trailing_ints(tokens: list[str]) -> int:
    """How many of ``tokens[1:]`` (the first token is always path) are integers, from the right."""
    n = 0
    for t in reversed(tokens[1:]):
        try:
            int(t)
        except ValueError:
            break
        n += 1
    return n


def read_list(list_path: str | os.PathLike, data_root: str | os.PathLike = "", kind: str = "pretrain") -> list[Entry]:
    """Parse a dataset list; any bad line raises ``ValueError`` naming the file and line number,
    the formats expected and the line got. A UTF-8 BOM is ignored.

    ``kind="pretrain"``: ``path start_idx total_frames`` or the official hybrid list's
    ``path start_idx total_frames label``. ``kind="finetune"``: ``path label`` or the official
    rawframes list's ``folder total_frames label`` (frames ``img_{:05}.jpg`` from 1, the official
    ``--start_idx``). A file has one format: the longest one every line fits (paths may contain
    spaces; the numbers are split off the right).
    """
    if kind not in LIST_FORMATS:
        raise ValueError(f"list kind must be 'pretrain' or 'finetune', got {kind!r}")
    list_path = Path(list_path)
    if not list_path.is_file():
        raise FileNotFoundError(f"dataset list not found: {list_path}")
    formats = LIST_FORMATS[kind]
    expected = " or ".join("<path> " + " ".join(f"<{f}>" for f in fmt) for fmt in formats)
    lines = []
    with open(list_path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            fits = _trailing_ints(tokens)
            if fits < len(formats[0]):
                _fail(list_path, lineno, expected, line, f"{len(tokens)} field(s), "
                      f"{fits} of them integers after the path")
            lines.append((lineno, line, tokens, fits))
    if not lines:
        raise ValueError(f"{list_path}: the dataset list is empty")
    fmt = max((fm for fm in formats if all(fits >= len(fm) for _, _, _, fits in lines)), key=len)
    k = len(fmt)
    this = "<path> " + " ".join(f"<{f}>" for f in fmt)
    out = []
    for lineno, line, tokens, _ in lines:
        nums = dict(zip(fmt, (int(t) for t in tokens[-k:])))
        path_s = line.strip().rsplit(maxsplit=k)[0]  # the line up to the numbers, inner spaces kept
        path = os.path.join(data_root, path_s) if data_root else path_s
        label = nums.get("label", -1)
        if kind == "pretrain":
            start, total = nums["start_idx"], nums["total_frames"]
            if start < 0 or total < -1 or total == 0:
                _fail(list_path, lineno, this, line, "start_idx >= 0 and total_frames > 0 or -1")
            out.append(Entry(path, start, total, label))
        else:
            if label < 0:
                _fail(list_path, lineno, this, line, "a label >= 0")
            if "total_frames" in nums:
                if nums["total_frames"] < 1:
                    _fail(list_path, lineno, this, line, "total_frames >= 1")
                out.append(Entry(path, RAWFRAMES_START_IDX, nums["total_frames"], label))
            else:
                out.append(Entry(path, label=label))
    return out
