"""Dual masking (docs/semantics.md §3): tube / random encoder masks and running-cell decoder masks.

Convention: ``True`` = masked (dropped). Every mask of a batch has the same number of masked
tokens, so index tensors have static shapes and neither sampling nor the forward pass needs to
ask the device how many tokens survived (no host sync).
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from functools import lru_cache

import torch

Grid = tuple[int, int, int]

ENCODER_MASK_TYPES = ("tube", "random")


def _check_grid(grid) -> Grid:
    try:
        g = tuple(operator.index(x) for x in grid)
    except TypeError:
        g = ()
    if len(g) != 3 or any(x <= 0 for x in g):
        raise ValueError(f"grid must be three positive ints (T/t, H/p, W/p), got {grid!r}")
    return g


def _check_ratio(name: str, ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"{name} must be a number, got {ratio!r}")
    return float(ratio)


def num_encoder_masked(grid: Grid, ratio: float, mask_type: str = "tube") -> int:
    """Masked tokens per clip, ``int(ratio * n)`` as the official generators round."""
    t, h, w = _check_grid(grid)
    ratio = _check_ratio("encoder_ratio", ratio)
    if mask_type not in ENCODER_MASK_TYPES:
        raise ValueError(f"encoder mask type must be one of {ENCODER_MASK_TYPES}, got {mask_type!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"encoder_ratio must be in [0, 1), got {ratio}")
    if mask_type == "tube":
        m = int(ratio * h * w)
        if m == h * w:
            raise ValueError(f"encoder_ratio={ratio} masks all {h * w} positions of a frame; "
                             "at least one token must stay visible")
        return t * m
    m = int(ratio * t * h * w)
    if m == t * h * w:
        raise ValueError(f"encoder_ratio={ratio} leaves no visible token")
    return m


def cell_masked_slots(ratio: float) -> int:
    """Masked slots of the 2x2 running cell, ``int(4 * ratio)``; ratio must be .25, .5 or .75."""
    if _check_ratio("decoder_ratio", ratio) not in (0.25, 0.5, 0.75):
        raise ValueError(f"running-cell decoder_ratio must be 0.25, 0.5 or 0.75 "
                         f"(or 0 for encoder-only masking), got {ratio}")
    return int(4 * ratio)


def num_decoder_tokens(grid: Grid, decoder_ratio: float, encoder_ratio: float = 0.9,
                       encoder_mask_type: str = "tube") -> int:
    """Tokens the decoder reconstructs per clip: the running cell keeps ``4 - int(4 * ratio)``
    of every 2x2 cell of every frame; ``decoder_ratio=0`` (encoder-only masking) reconstructs
    every encoder-masked token. Host arithmetic only: no tensor, no device sync."""
    if _check_ratio("decoder_ratio", decoder_ratio) == 0:
        return num_encoder_masked(grid, encoder_ratio, encoder_mask_type)
    t, h, w = _check_grid(grid)
    if h % 2 or w % 2:
        raise ValueError(f"running-cell masking needs an even token grid, got H/p={h}, W/p={w}")
    return t * (h // 2) * (w // 2) * (4 - cell_masked_slots(decoder_ratio))


@lru_cache(maxsize=32)
def running_cell_patterns(grid: Grid, ratio: float) -> torch.Tensor:
    """The four running-cell decoder masks, ``(4, T/t * H/p * W/p)`` bool, one per start
    pointer ``s``: frame ``f`` uses the queue ``[1]*k + [0]*(4-k)`` rotated by ``s + f + 1``,
    read as a 2x2 cell and tiled over the frame."""
    t, h, w = _check_grid(grid)
    if h % 2 or w % 2:
        raise ValueError(f"running-cell masking needs an even token grid, got H/p={h}, W/p={w}")
    k = cell_masked_slots(ratio)
    queue = torch.tensor([1] * k + [0] * (4 - k), dtype=torch.bool)
    slot = torch.arange(4)
    maps = torch.empty(4, t, h, w, dtype=torch.bool)
    for s in range(4):
        for f in range(t):
            cell = queue[(slot + s + f + 1) % 4].view(2, 2)
            maps[s, f] = cell.repeat(h // 2, w // 2)
    return maps.view(4, -1)


@lru_cache(maxsize=64)
def _running_cell_on(grid: Grid, ratio: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(patterns, sorted decoder-visible indices)`` on ``device``, made once per device: a
    per-step copy of the table would be a host-to-device transfer, i.e. a sync."""
    patterns = running_cell_patterns(grid, ratio)
    n_dec = num_decoder_tokens(grid, ratio)
    return patterns.to(device), _sorted_positions(patterns, n_dec).to(device)


def _sorted_positions(masked: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the first ``count`` False entries of each row (a stable sort puts the
    unmasked positions first, in increasing order): ``(B, count)`` int64, no sync."""
    return torch.sort(masked.to(torch.uint8), dim=1, stable=True).indices[:, :count]


@dataclass(frozen=True)
class DualMask:
    """Encoder and decoder masks of a batch, with their index forms.

    Attributes (``N`` tokens, ``True`` = masked):
        encoder_masked: ``(B, N)`` bool.
        decoder_masked: ``(B, N)`` bool; positions the decoder reconstructs are the False ones.
        visible_idx: ``(B, n_visible)`` int64, sorted encoder-visible token indices.
        decoder_idx: ``(B, n_decoder)`` int64, sorted decoder-visible token indices.
    """

    encoder_masked: torch.Tensor
    decoder_masked: torch.Tensor
    visible_idx: torch.Tensor
    decoder_idx: torch.Tensor

    def __post_init__(self):
        # Metadata checks only (no device sync): that the index counts agree with the boolean
        # masks is what ``sample``/``from_bool`` guarantee; direct construction trusts the caller.
        em, dm, vi, di = self.encoder_masked, self.decoder_masked, self.visible_idx, self.decoder_idx
        if not all(isinstance(x, torch.Tensor) for x in (em, dm, vi, di)):
            raise ValueError("DualMask fields must be tensors; build one with DualMask.sample or from_bool")
        if em.dtype != torch.bool or dm.dtype != torch.bool or em.dim() != 2 or dm.shape != em.shape:
            raise ValueError(f"encoder_masked/decoder_masked must be (B, N) bool tensors of one shape, got "
                             f"{tuple(em.shape)} {em.dtype} and {tuple(dm.shape)} {dm.dtype}")
        for name, x in (("visible_idx", vi), ("decoder_idx", di)):
            if x.dtype != torch.int64 or x.dim() != 2 or x.shape[0] != em.shape[0] or x.shape[1] > em.shape[1]:
                raise ValueError(f"{name} must be a (B={em.shape[0]}, n <= N={em.shape[1]}) int64 tensor, "
                                 f"got {tuple(x.shape)} {x.dtype}")
        if len({em.device, dm.device, vi.device, di.device}) != 1:
            raise ValueError("DualMask tensors must live on one device")

    @property
    def batch_size(self) -> int:
        return self.encoder_masked.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.encoder_masked.shape[1]

    @property
    def n_visible(self) -> int:
        return self.visible_idx.shape[1]

    @property
    def n_decoder(self) -> int:
        return self.decoder_idx.shape[1]

    @property
    def device(self) -> torch.device:
        return self.visible_idx.device

    def loss_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, n_decoder)``: 1 where a decoder row was masked for the encoder, else 0."""
        return self.encoder_masked.gather(1, self.decoder_idx).to(dtype)

    def to(self, device, non_blocking: bool = False) -> "DualMask":
        return DualMask(*(x.to(device, non_blocking=non_blocking) for x in
                          (self.encoder_masked, self.decoder_masked, self.visible_idx, self.decoder_idx)))

    def pin_memory(self) -> "DualMask":
        return DualMask(*(x.pin_memory() for x in
                          (self.encoder_masked, self.decoder_masked, self.visible_idx, self.decoder_idx)))

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def sample(batch_size: int, grid: Grid, encoder_ratio: float = 0.9, decoder_ratio: float = 0.5,
               *, encoder_mask_type: str = "tube", device=None,
               generator: torch.Generator | None = None) -> "DualMask":
        """Sample a batch of masks on ``device`` (default: the generator's device, else CPU).

        Encoder: tube masking (one random spatial mask repeated over time, ``int(ratio*H*W)``
        masked per frame) or ``"random"`` (MAE-ST: ``int(ratio*N)`` masked anywhere).
        Decoder: running cell at ``decoder_ratio`` (0.25/0.5/0.75), or ``0`` for encoder-only
        masking, where the decoder reconstructs exactly the encoder-masked tokens.
        """
        grid = _check_grid(grid)
        try:
            size = operator.index(batch_size)
        except TypeError:
            size = 0
        if size < 1:  # the message shows what was passed, not the 0 a non-int became
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size = size
        decoder_ratio = _check_ratio("decoder_ratio", decoder_ratio)
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"the generator lives on {generator.device} but masks are sampled on {device}; "
                             "pass a generator of the same device type")
        t, h, w = grid
        n = t * h * w
        n_masked = num_encoder_masked(grid, encoder_ratio, encoder_mask_type)
        n_vis = n - n_masked

        if encoder_mask_type == "tube":
            hw = h * w
            per_frame_masked = n_masked // t
            noise = torch.rand(batch_size, hw, device=device, generator=generator)
            order = noise.argsort(dim=1)  # a uniformly random permutation per clip
            spatial_vis = order[:, per_frame_masked:].sort(dim=1).values  # (B, hw - m)
            frame_off = torch.arange(t, device=device).mul_(hw)
            visible_idx = (frame_off[None, :, None] + spatial_vis[:, None, :]).reshape(batch_size, n_vis)
            spatial_masked = torch.ones(batch_size, hw, dtype=torch.bool, device=device)
            spatial_masked.scatter_(1, spatial_vis, False)
            encoder_masked = spatial_masked.repeat(1, t)
        else:
            noise = torch.rand(batch_size, n, device=device, generator=generator)
            order = noise.argsort(dim=1)
            visible_idx = order[:, n_masked:].sort(dim=1).values
            encoder_masked = torch.ones(batch_size, n, dtype=torch.bool, device=device)
            encoder_masked.scatter_(1, visible_idx, False)

        if decoder_ratio == 0:
            if n_masked == 0:
                raise ValueError(f"encoder_ratio={encoder_ratio} masks no token, so encoder-only masking "
                                 "leaves the decoder nothing to reconstruct")
            decoder_masked = ~encoder_masked
            decoder_idx = _sorted_positions(decoder_masked, n_masked)
        else:
            cell_masked_slots(decoder_ratio)  # validates the ratio
            patterns, pattern_idx = _running_cell_on(grid, decoder_ratio, device)
            start = torch.randint(0, 4, (batch_size,), device=device, generator=generator)
            decoder_masked = patterns[start]
            decoder_idx = pattern_idx[start]
        return DualMask(encoder_masked, decoder_masked, visible_idx, decoder_idx)

    @staticmethod
    def from_bool(encoder_masked: torch.Tensor, decoder_masked: torch.Tensor | None = None) -> "DualMask":
        """Wrap ``(B, N)`` masks made elsewhere (``True`` = masked; any integer/bool dtype of 0/1).

        ``decoder_masked=None`` means encoder-only masking. Every row must mask the same number
        of tokens. The counts are checked here once (a host sync if the masks live on a GPU:
        build them on the CPU, e.g. in the DataLoader, and move the ``DualMask`` with ``.to``).
        """
        enc = _as_bool_mask(encoder_masked, "encoder_masked")
        if decoder_masked is None:
            dec = ~enc
        else:
            dec = _as_bool_mask(decoder_masked, "decoder_masked")
            if dec.shape != enc.shape:
                raise ValueError(f"decoder_masked has shape {tuple(dec.shape)}, expected the encoder "
                                 f"mask's shape {tuple(enc.shape)}")
            if dec.device != enc.device:
                raise ValueError(f"masks on different devices: {enc.device} and {dec.device}")
        n_vis = _equal_count(~enc, "encoder-visible")
        n_dec = _equal_count(~dec, "decoder-visible")
        if n_vis == 0:
            raise ValueError("encoder_masked masks every token; at least one must stay visible")
        if n_dec == 0:
            raise ValueError("decoder_masked masks every token; the decoder has nothing to reconstruct")
        return DualMask(enc, dec, _sorted_positions(enc, n_vis), _sorted_positions(dec, n_dec))


def _as_bool_mask(m, name: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.dim() == 4:  # (B, T/t, H/p, W/p) grids are accepted and flattened in (t, h, w) order
        m = m.flatten(1)
    if m.dim() != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, N) with B, N > 0, got {tuple(m.shape)}")
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point() or m.is_complex():
        raise ValueError(f"{name} must be bool or integer 0/1, got dtype {m.dtype}")
    if ((m != 0) & (m != 1)).any():
        raise ValueError(f"{name} holds values other than 0 and 1")
    return m.bool()


def _equal_count(unmasked: torch.Tensor, what: str) -> int:
    counts = unmasked.sum(dim=1)
    first = int(counts[0])
    if bool((counts != first).any()):
        raise ValueError(f"every sample must have the same number of {what} tokens, got counts "
                         f"{counts.tolist()}")
    return first
