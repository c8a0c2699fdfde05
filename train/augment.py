"""The official VideoMAE V2 fine-tuning augmentation beyond the crop: RandAugment and random erasing.

Official order per training view (``VideoClsDataset._aug_frame``): RandAugment on the decoded
frames (PIL, one draw of ops and magnitudes for the whole clip), then to float and normalize,
then the random resized crop and flip, then random erasing of the normalized clip (one box for
every frame, ``cube=True``); mixup/cutmix come later, in the train step.

Ours (docs/semantics.md §9.3):

* **RandAugment** runs in the data worker on the uint8 frames, as PIL images like the official
  one, through timm's RandAugment ops (``timm.data.auto_augment``). One clip, one draw: python's
  ``random`` and numpy's global stream are seeded from the sample's own generator before each
  frame, so every frame replays the same draws (op choice, apply-or-not, magnitude, sign,
  interpolation), and both global states are put back afterwards: the loader's and mixup's
  streams never see it, and a sample stays a function of ``(seed, epoch, index)``.
* **Random erasing** is defined on the normalized clip, which exists only on the device (clips
  travel as uint8). So the worker draws the box(es) from the sample's generator, with the
  official rules (``erase_boxes``), and a noise seed per box; the batch carries them
  (``batch["erase"]``) and ``erase_`` fills them on the device after ``normalize_uint8``, before
  mixup. The noise generator is reseeded from the box's seed, so the noise too is a function of
  the sample (not of the rank, the batch it lands in or a resume), and there is no extra RNG
  state to checkpoint; the transfer stays uint8.

timm against the official ``dataset/rand_augment.py``, for the specs the official grammar takes:
the same op lists (``RAND_OPS``, ``RAND_INCREASING_OPS``), the same level functions within the
magnitude range 0..10 (timm's extra clamps never bind there), the same draw order from
``random``/``np.random``, magnitude ``gauss(m, mstd)`` clipped to [0, 10], fill (128, 128, 128)
(the official passes no ``img_mean``). They differ only in parsing the spec, which is ours here
(``parse_rand_augment``): timm dropped the official ``w0`` (weighted op choice; we keep it) and
rejects unknown sections (the official ignores them; we reject them too), and the official reads
``inc0`` as ``inc1`` (``bool`` of a non-empty string; we read it as off, its documented meaning).
One difference of the video wrapping: with interpolation ``random`` the official draws bilinear
or bicubic anew for every frame; here every frame of the clip gets the same draw.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

INTERPOLATIONS = ("bicubic", "bilinear", "random")  # the official --train_interpolation values
ERASE_MODES = ("pixel", "rand", "const")  # the official --remode values
FILL = (128, 128, 128)  # the official RandAugment fill (its default: no img_mean is passed)
MAX_LEVEL = 10

# The official RandAugment op sets, in the official order (the order matters for the ``w0`` weights).
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_INCREASING = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
RAND_INCREASING_OPS = tuple(n + "Increasing" if n in _INCREASING else n for n in RAND_OPS)
# ``w0``: op choice weights (normalized; ops drawn without replacement), by position in RAND_OPS.
W0 = {"Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1, "Color": 0.025,
      "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": 0.005, "SolarizeAdd": 0.005, "Contrast": 0.005,
      "Brightness": 0.005, "Equalize": 0.005}

_GRAMMAR = "rand-m<int>-n<int>[-mstd<float>][-inc<0|1>][-w0]"
_SECTION = re.compile(r"([a-z]*)(\d.*)")


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``--aa``; the fields the official grammar sets (its defaults where a section is absent)."""
    magnitude: int = MAX_LEVEL
    num_layers: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    weighted: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS

    @property
    def choice_weights(self) -> np.ndarray | None:
        if not self.weighted:
            return None
        w = np.array([W0.get(n, 0.0) for n in RAND_OPS])
        return w / w.sum()


def parse_rand_augment(spec: str | None) -> RandAugmentSpec | None:
    """``--aa`` -> its spec, or None for ``none`` / ``''`` (off). Raises ``ValueError`` with one
    line naming the bad part."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    parts = spec.strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"--aa {spec!r}: only RandAugment specs are supported, {_GRAMMAR} (or none)")
    fields: dict = {}
    for sec in parts[1:]:
        m = _SECTION.fullmatch(sec)
        key = m.group(1) if m else sec
        if key in fields or key not in ("m", "n", "mstd", "inc", "w"):
            why = "repeated" if key in fields else "unknown"
            raise ValueError(f"--aa {spec!r}: {why} section {sec!r}; expected {_GRAMMAR} (or none)")
        try:
            val = m.group(2)
            fields[key] = float(val) if key == "mstd" else int(val)
        except (AttributeError, ValueError):
            raise ValueError(f"--aa {spec!r}: section {sec!r} needs {'a number' if key == 'mstd' else 'an integer'} "
                             f"after {key!r}; expected {_GRAMMAR}") from None
    s = RandAugmentSpec(magnitude=fields.get("m", MAX_LEVEL), num_layers=fields.get("n", 2),
                        magnitude_std=fields.get("mstd", 0.0), increasing=bool(fields.get("inc", 0)),
                        weighted="w" in fields)
    if s.magnitude < 0 or s.num_layers < 0 or not 0 <= s.magnitude_std < math.inf:
        raise ValueError(f"--aa {spec!r}: m, n and mstd must be >= 0 (and mstd finite)")
    if "w" in fields and fields["w"] != 0:
        raise ValueError(f"--aa {spec!r}: the only op weight set is w0")
    if s.weighted and s.num_layers > len(W0):
        raise ValueError(f"--aa {spec!r}: with w0 the ops are drawn without replacement, n must be <= {len(W0)}")
    return s


class ClipRandAugment:
    """RandAugment of a clip: the same ops and magnitudes on every frame, drawn from ``seed``.

    ``spec``: an ``--aa`` string; ``img_size``: the crop size (sets the official
    ``translate_const``, ``int(0.45 * img_size)``); ``interpolation``: the official
    ``--train_interpolation`` (the geometric ops' resampling; ``random``: bilinear or bicubic,
    drawn per op and clip)."""

    def __init__(self, spec: str | RandAugmentSpec, img_size: int, interpolation: str = "bicubic"):
        from PIL import Image
        from timm.data.auto_augment import RandAugment, rand_augment_ops

        self.spec = spec if isinstance(spec, RandAugmentSpec) else parse_rand_augment(spec)
        if self.spec is None:
            raise ValueError("ClipRandAugment needs a RandAugment spec, got none")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": FILL}
        if self.spec.magnitude_std > 0:
            hparams["magnitude_std"] = self.spec.magnitude_std
        if interpolation != "random":  # absent: timm (and the official) pick bilinear or bicubic per op
            resample = getattr(Image, "Resampling", Image)
            hparams["interpolation"] = resample.BICUBIC if interpolation == "bicubic" else resample.BILINEAR
        ops = rand_augment_ops(magnitude=self.spec.magnitude, prob=0.5, hparams=hparams, transforms=list(self.spec.ops))
        self.transform = RandAugment(ops, self.spec.num_layers, choice_weights=self.spec.choice_weights)

    def __call__(self, frames, seed: int) -> list:
        """``frames``: PIL images (one clip) -> augmented PIL images. ``seed``: 0 .. 2**32 - 1."""
        py, npy = random.getstate(), np.random.get_state()
        try:
            out = []
            for img in frames:  # the same draws for every frame: reseed before each
                random.seed(seed)
                np.random.seed(seed)
                out.append(self.transform(img))
            return out
        finally:
            random.setstate(py)
            np.random.set_state(npy)

    def apply_uint8(self, frames: torch.Tensor | Sequence, seed: int) -> torch.Tensor:
        """``(T, H, W, 3)`` uint8 (or a list of PIL frames) -> ``(T, H, W, 3)`` uint8."""
        if isinstance(frames, torch.Tensor):
            frames = to_pil(frames)
        out = self(frames, seed)
        arr = np.empty((len(out), out[0].height, out[0].width, 3), dtype=np.uint8)
        for k, im in enumerate(out):
            arr[k] = np.asarray(im)
        return torch.from_numpy(arr)


def to_pil(frames: torch.Tensor) -> list:
    """``(T, H, W, 3)`` uint8 -> T PIL RGB images."""
    from PIL import Image

    arr = np.ascontiguousarray(frames.numpy())
    return [Image.fromarray(a, "RGB") for a in arr]


# ----------------------------------------------------------------------------- random erasing
@dataclass(frozen=True)
class EraseSpec:
    """The official random erasing of a fine-tuning view (``--reprob``, ``--remode``,
    ``--recount``; area and aspect ranges fixed as the official ones)."""
    probability: float = 0.25
    mode: str = "pixel"
    max_count: int = 1
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    attempts: int = 100  # the official cube variant's tries per box

    def __post_init__(self):
        if not 0 <= self.probability <= 1:
            raise ValueError(f"--reprob must be in [0, 1], got {self.probability}")
        if self.mode not in ERASE_MODES:
            raise ValueError(f"--remode must be one of {', '.join(ERASE_MODES)}, got {self.mode!r}")
        if self.max_count < 1:
            raise ValueError(f"--recount must be >= 1, got {self.max_count}")


# One row per box: top, left, height, width, noise seed. A row with height 0 erases nothing.
BOX_FIELDS = 5


def erase_boxes(rng: np.random.Generator, height: int, width: int, spec: EraseSpec) -> torch.Tensor:
    """The boxes of one view, drawn as the official ``RandomErasing`` (``cube=True``) draws them:
    erase with probability ``spec.probability``; then ``count`` boxes, uniform in
    ``1 .. max_count``; each box: up to ``attempts`` tries of an area uniform in
    ``(min_area, max_area) x H x W / count`` and a log-uniform aspect (height / width) in
    ``(min_aspect, 1 / min_aspect)``, sides rounded, kept when both are strictly smaller than the
    frame's, at a uniform position; a box with no fitting try is dropped. Returns
    ``(max_count, BOX_FIELDS)`` int64 (unused rows zero); the box is the same for every frame."""
    out = torch.zeros(spec.max_count, BOX_FIELDS, dtype=torch.int64)
    if not rng.random() < spec.probability:
        return out
    count = int(rng.integers(1, spec.max_count + 1)) if spec.max_count > 1 else 1
    area = height * width
    lo, hi = math.log(spec.min_aspect), math.log(1 / spec.min_aspect)
    for k in range(count):
        for _ in range(spec.attempts):
            target = rng.uniform(spec.min_area, spec.max_area) * area / count
            aspect = math.exp(rng.uniform(lo, hi))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                out[k] = torch.tensor([top, left, h, w, int(rng.integers(2 ** 63))])
                break
    return out


_GENERATORS: dict[torch.device, torch.Generator] = {}


def erase_(video: torch.Tensor, boxes: torch.Tensor, mode: str = "pixel") -> torch.Tensor:
    """Random erasing, in place, of a normalized batch ``(N, C, T, H, W)`` with the boxes of
    ``erase_boxes`` (``(N, K, BOX_FIELDS)``, on the CPU: read without a device sync). Each box
    covers the same ``(h, w)`` area in every frame. ``pixel``: per-pixel N(0, 1) noise, new for
    every frame (the official draws it frame by frame); ``rand``: one N(0, 1) color per channel
    and frame; ``const``: 0 (the mean color). The noise comes from a generator on ``video``'s
    device seeded with the box's seed."""
    if mode not in ERASE_MODES:
        raise ValueError(f"mode must be one of {ERASE_MODES}, got {mode!r}")
    if boxes.shape[0] != video.shape[0]:
        raise ValueError(f"{boxes.shape[0]} clips of erase boxes for a batch of {video.shape[0]}")
    rows = boxes.tolist()
    C, T = video.shape[1:3]
    for i, clip in enumerate(rows):
        for top, left, h, w, seed in clip:
            if h <= 0 or w <= 0:
                continue
            region = video[i, :, :, top:top + h, left:left + w]
            if mode == "const":
                region.zero_()
                continue
            g = _GENERATORS.get(video.device)
            if g is None:
                g = _GENERATORS[video.device] = torch.Generator(device=video.device)
            g.manual_seed(seed)
            if mode == "pixel":
                region.normal_(generator=g)
            else:
                region.copy_(torch.randn(C, T, 1, 1, generator=g, device=video.device, dtype=video.dtype)
                             .expand_as(region))
    return video
