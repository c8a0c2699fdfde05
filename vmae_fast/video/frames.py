"""A folder of images read as a video (the official rawframes layout: one JPEG per frame)."""
from __future__ import annotations

import os

import numpy as np
import torch

from .decoders import UnreadableVideo, VideoReader

FRAME_PATTERN = "img_{:05}.jpg"  # the official rawframes name (``--filename_tmpl``)


class FrameFolder(VideoReader):
    """A folder of images as a video: ``n`` frames (the list's ``total_frames``, or the images
    counted), frame ``i`` read from ``tmpl.format(start_idx + i)``."""

    name = "frames"

    def __init__(self, path: str, tmpl: str = FRAME_PATTERN, start_idx: int = 0, total_frames: int = -1):
        self.path, self.tmpl, self.start = path, tmpl, start_idx
        self.n = total_frames if total_frames > 0 else len(
            [f for f in os.listdir(path) if f.lower().endswith((".jpg", ".jpeg", ".png"))])
        if self.n == 0:
            raise UnreadableVideo(path, "a folder without frames: no .jpg or .png files")

    def get(self, indices):
        from PIL import Image

        frames = []
        for i in self._check(indices):
            with Image.open(os.path.join(self.path, self.tmpl.format(self.start + i))) as im:
                frames.append(np.asarray(im.convert("RGB")))
        return torch.from_numpy(np.stack(frames))
