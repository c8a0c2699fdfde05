"""The official VideoMAE V2 pretraining data pipeline, restated (our code) for the loader benchmark
and the semantics tests, as vmae_fast/reference.py restates the official model.

What the official ``HybridVideoMAE`` + ``DataAugmentationForVideoMAEv2`` do per video, step by
step: decord (one thread) decodes the sampled frames; each becomes a PIL image (``convert('RGB')``
copies it); per view (``num_sample`` of them) ``GroupMultiScaleCrop`` crops every frame and
resizes it with PIL's BILINEAR, the frames are concatenated along channels, turned into a float
tensor divided by 255 and normalized channel by channel, then viewed as ``(3, T, S, S)``; the
collate function stacks the views of the batch. Left out: the two mask generators the official
transform also runs per view (their CPU time is not counted against the official pipeline here,
which flatters it slightly).

Random choices use the official sources (``random`` for crops, ``np.random`` for the start), so a
seeded run is reproducible but draws differ from ours; their distribution is the same (tested).
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def official_frame_ids(duration: int, new_length: int, new_step: int, np_random=np.random) -> list[int]:
    """``_sample_train_indices`` then ``get_frame_id_list`` with one segment and no temporal jitter."""
    skip_length = new_length * new_step
    average_duration = duration - skip_length + 1
    if average_duration > 0:
        offset = int(np_random.randint(average_duration))
    else:  # (the sorted-randint branch needs num_segments > 1 to be reachable)
        offset = 0
    offset += 1  # 1-based from here on, as in the official code
    ids = []
    for _ in range(0, skip_length, new_step):
        ids.append(offset - 1)
        if offset + new_step < duration:
            offset += new_step
    return ids


class OfficialMultiScaleCrop:
    """``GroupMultiScaleCrop(input_size, scales, max_distort, fix_crop, more_fix_crop)`` on PIL images."""

    def __init__(self, input_size: int, scales: Sequence[float] = (1, .875, .75, .66), max_distort: int = 1,
                 fix_crop: bool = True, more_fix_crop: bool = True, rand: random.Random | None = None):
        self.input_size = (input_size, input_size)
        self.scales, self.max_distort = list(scales), max_distort
        self.fix_crop, self.more_fix_crop = fix_crop, more_fix_crop
        self.rand = rand or random._inst  # the module-level generator, as the official uses

    def pairs(self, image_w: int, image_h: int) -> list[tuple[int, int]]:
        base = min(image_w, image_h)
        sizes = [int(base * s) for s in self.scales]
        crop_h = [self.input_size[1] if abs(x - self.input_size[1]) < 3 else x for x in sizes]
        crop_w = [self.input_size[0] if abs(x - self.input_size[0]) < 3 else x for x in sizes]
        out = []
        for i, h in enumerate(crop_h):
            for j, w in enumerate(crop_w):
                if abs(i - j) <= self.max_distort:
                    out.append((w, h))
        return out

    @staticmethod
    def fix_offsets(more_fix_crop: bool, image_w: int, image_h: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
        w_step, h_step = (image_w - crop_w) // 4, (image_h - crop_h) // 4
        offs = [(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step), (2 * w_step, 2 * h_step)]
        if more_fix_crop:
            offs += [(0, 2 * h_step), (4 * w_step, 2 * h_step), (2 * w_step, 4 * h_step), (2 * w_step, 0),
                     (w_step, h_step), (3 * w_step, h_step), (w_step, 3 * h_step), (3 * w_step, 3 * h_step)]
        return offs

    def sample(self, image_w: int, image_h: int) -> tuple[int, int, int, int]:
        """``(x, y, w, h)``: ``random.choice`` of a pair, then of an offset (or ``randint``s)."""
        w, h = self.rand.choice(self.pairs(image_w, image_h))
        if not self.fix_crop:
            return self.rand.randint(0, image_w - w), self.rand.randint(0, image_h - h), w, h
        x, y = self.rand.choice(self.fix_offsets(self.more_fix_crop, image_w, image_h, w, h))
        return x, y, w, h

    def __call__(self, images: list[Image.Image]) -> list[Image.Image]:
        x, y, w, h = self.sample(*images[0].size)
        return [im.crop((x, y, x + w, y + h)).resize(self.input_size, Image.BILINEAR) for im in images]


class OfficialTransform:
    """Crop, Stack, ToTorchFormatTensor(div=True), GroupNormalize, then ``(3, T, S, S)``."""

    def __init__(self, input_size: int = 224, **crop_kw):
        self.crop = OfficialMultiScaleCrop(input_size, **crop_kw)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        group = self.crop(images)
        stacked = np.concatenate(group, axis=2)  # (S, S, 3T)
        x = torch.from_numpy(stacked).permute(2, 0, 1).contiguous().float().div(255.)
        for t, m, s in zip(x, MEAN * len(group), STD * len(group)):
            t.sub_(m).div_(s)
        return x.view((len(group), 3) + x.shape[-2:]).transpose(0, 1)


class OfficialPretrainDataset(torch.utils.data.Dataset):
    """One item per video path: ``num_sample`` normalized float ``(3, T, S, S)`` views (a list
    when ``num_sample > 1``, as the official). ``open_video(path)`` gives the reader: decord's
    ``VideoReader(path, num_threads=1)`` by default, as the official loader."""

    def __init__(self, paths: Sequence[str], num_frames: int = 16, sampling_rate: int = 4, input_size: int = 224,
                 num_sample: int = 1, open_video=None):
        self.paths, self.num_frames, self.rate, self.num_sample = list(paths), num_frames, sampling_rate, num_sample
        self.transform = OfficialTransform(input_size)
        self.open_video = open_video or _decord_reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, tuple):  # the benchmark's (epoch, index) keys
            index = index[1]
        vr = self.open_video(self.paths[index])
        ids = official_frame_ids(len(vr), self.num_frames, self.rate)
        data = _as_numpy(vr.get_batch(ids) if hasattr(vr, "get_batch") else vr.get(ids))
        images = [Image.fromarray(data[k]).convert("RGB") for k in range(len(ids))]
        views = [self.transform(images) for _ in range(self.num_sample)]
        return views if self.num_sample > 1 else views[0]


def official_collate(batch: list) -> torch.Tensor:
    """``multiple_pretrain_samples_collate`` (views flattened) or default collation: a stack."""
    flat = [v for item in batch for v in (item if isinstance(item, list) else [item])]
    return torch.stack(flat)


def _decord_reader(path: str):
    import decord

    return decord.VideoReader(path, num_threads=1, ctx=decord.cpu(0))


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "asnumpy"):
        return x.asnumpy()
    if isinstance(x, torch.Tensor):
        return x.numpy()
    return np.asarray(x)
