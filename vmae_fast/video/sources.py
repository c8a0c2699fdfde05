"""One entry of a list (or one path) as frames: a video file through a decoder, or a frame folder."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .decoders import open_video, quiet_pyav
from .frames import FRAME_PATTERN, FrameFolder
from .lists import Entry


class VideoSource:
    """Random access to the frames of one entry: ``len(src)`` and ``src.get(indices)`` ->
    ``(len(indices), H, W, 3)`` uint8 tensor. A video file with ``total_frames > 0`` is cut to
    frames ``start_idx .. start_idx + total_frames - 1`` (an extension: the official list gives
    -1 there). A folder is read as frames named ``fname_tmpl`` (``vmae_fast.video.frames``)."""

    def __init__(self, entry: Entry, decoder: str = "auto", fname_tmpl: str = FRAME_PATTERN, threads: int = 1):
        self.entry = entry
        p = entry.path
        if os.path.isdir(p):
            self.kind = "frames"
            self.reader = FrameFolder(p, fname_tmpl, entry.start_idx, entry.total_frames)
            self.offset, self.n = 0, len(self.reader)
        else:
            quiet_pyav()
            self.reader = open_video(p, decoder, threads=threads)
            self.kind = self.reader.name
            self.offset, self.n = 0, len(self.reader)
            if entry.total_frames > 0:
                self.offset = entry.start_idx
                self.n = max(0, min(self.n, entry.start_idx + entry.total_frames) - entry.start_idx)

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


def open_source(path: str | os.PathLike, decoder: str = "auto") -> VideoSource:
    """Every frame of a video file or frame folder (``img_{:05}.jpg`` from 0) given by its path."""
    return VideoSource(Entry(path=os.path.abspath(os.fspath(path))), decoder)
