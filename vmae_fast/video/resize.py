"""The two uint8 resizes of the official pipelines, on ``(T, H, W, 3)`` uint8 frames.

* Training crops (``crop_resize``): crop first (a view), then one antialiased bilinear resize of
  the uint8 tensor (``resize_uint8``), PIL's filter as the official ``GroupMultiScaleCrop`` /
  ``RandomResizedCrop`` use it, with no float round trip. Against PIL's ``BILINEAR`` it is within
  +-1 everywhere and equal on 99.8% of values (the float round trip: 91.7%; measured on the real
  test footage by tests/test_data_transforms.py).
* The test views (``resize_frames``): short side to ``img_size``, bilinear without antialiasing,
  as the official test loader's ``cv2.INTER_LINEAR``, rounded back to uint8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _uint8_aa_supported() -> bool:
    try:  # uint8 antialiased bilinear on CPU is there since torch 2.1 (checked on 2.6 and 2.14)
        F.interpolate(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), size=(2, 2), mode="bilinear",
                      antialias=True, align_corners=False)
        return True
    except (RuntimeError, NotImplementedError):
        return False


UINT8_RESIZE = _uint8_aa_supported()


def resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(T, 3, h, w)`` uint8 (any strides) -> ``(T, 3, *size)`` uint8: antialiased bilinear, PIL's
    filter. Frames decoded as ``(T, H, W, 3)`` and permuted are channels-last, the layout the
    uint8 kernel is fastest on: 2.8 ms against 5.2 ms for the contiguous NCHW copy, resizing a
    (16, 3, 250, 440) crop of (16, 290, 480, 3) frames to 224 (torch 2.14.1, one thread, the
    2-core Xeon of ``bench/results/``, median of 15); the result is channels-last."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if UINT8_RESIZE:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def crop_resize(frames: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """``frames`` ``(T, H, W, 3)`` uint8 -> ``(T, 3, size, size)``: the crop is a view, the resize
    the only pass over the pixels."""
    x, y, w, h = box
    return resize_uint8(frames[:, y:y + h, x:x + w].permute(0, 3, 1, 2), (size, size))


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Short side to ``size``, the long side ``int(size * long / short)`` (official rounding)."""
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, h, w)`` uint8 with short side ``size`` (bilinear,
    no antialiasing, rounded)."""
    T, H, W, C = frames.shape
    h, w = resized_size(H, W, size)
    x = frames.permute(0, 3, 1, 2)
    if (h, w) == (H, W):
        return x.contiguous()
    y = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)
