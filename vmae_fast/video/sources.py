"""One entry of a list (or one path) as frames: a video file through a decoder, or a frame folder."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .decoders import open_video, quiet_pyav
from .frames import FRAME_PATTERN, FrameFolder
from .lists import Entry


class FrameWindow:
    """Random access to a reader's frames ``start_idx .. start_idx + total_frames - 1`` (all of
    them when ``total_frames <= 0``): ``len(src)`` and ``src.get(indices)`` ->
    ``(len(indices), H, W, 3)`` uint8 tensor. The one windowing rule of a file and of a shard
    sample (``vmae_fast.video.shards.SampleSource``)."""

    def _open(self, reader, kind: str, start_idx: int = 0, total_frames: int = -1) -> None:
        self.reader, self.kind = reader, kind
        self.offset, self.n = 0, len(reader)
        if total_frames > 0:
            self.offset, self.n = start_idx, max(0, min(self.n, start_idx + total_frames) - start_idx)

    def __len__(self) -> int:
        return self.n

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        return self.reader.get([int(i) + self.offset for i in indices])

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VideoSource(FrameWindow):
    """The frames of one list entry. A video file with ``total_frames > 0`` is cut to frames
    ``start_idx .. start_idx + total_frames - 1`` (an extension: the official list gives -1
    there). A folder is read as frames named ``fname_tmpl`` (``vmae_fast.video.frames``), which
    applies the entry's window itself."""

    def __init__(self, entry: Entry, decoder: str = "auto", fname_tmpl: str = FRAME_PATTERN, threads: int = 1):
        self.entry = entry
        p = entry.path
        if os.path.isdir(p):
            self._open(FrameFolder(p, fname_tmpl, entry.start_idx, entry.total_frames), "frames")
        else:
            quiet_pyav()
            reader = open_video(p, decoder, threads=threads)
            self._open(reader, reader.name, entry.start_idx, entry.total_frames)


def open_source(path: str | os.PathLike, decoder: str = "auto") -> VideoSource:
    """Every frame of a video file or frame folder (``img_{:05}.jpg`` from 0) given by its path."""
    return VideoSource(Entry(path=os.path.abspath(os.fspath(path))), decoder)
