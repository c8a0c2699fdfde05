"""Normalized-pixel masked MSE: the VideoMAE reconstruction loss on decoder-visible cubes."""
from __future__ import annotations

import torch

from ._common import imagenet_stats
from .gather_cubes import gather_cubes_raw


def cube_targets_ref(video: torch.Tensor, idx: torch.Tensor, *, tubelet: int, patch: int,
                     normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction targets of the cubes at ``idx``: ``(B, n, t*p*p*C)`` float32 in
    ``(t, h, w, c)`` order. Pixels are un-normalized (``x*std + mean`` for a float clip,
    ``x/255`` for uint8); with ``normalize`` each cube is standardized per channel over its
    ``t*p*p`` pixels with the unbiased variance: ``(x - mean) / (sqrt(var) + eps)``."""
    cubes = gather_cubes_raw(video, idx, tubelet=tubelet, patch=patch)  # (B, n, C, t, p, p)
    B, n, C = cubes.shape[:3]
    cubes = cubes.permute(0, 1, 3, 4, 5, 2).reshape(B, n, -1, C)  # (B, n, t*p*p, C)
    if video.dtype == torch.uint8:
        x = cubes.float() / 255
    else:
        mean, std = imagenet_stats(video.device)
        x = cubes.float() * std + mean
    if normalize:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + eps)
    return x.reshape(B, n, -1)


def masked_mse_loss_ref(pred: torch.Tensor, video: torch.Tensor, decoder_idx: torch.Tensor,
                        weight: torch.Tensor, *, tubelet: int, patch: int, normalize: bool = True,
                        eps: float = 1e-6) -> torch.Tensor:
    """Reference loss.

    Args:
        pred: ``(B, n, C*t*p*p)`` predictions in ``(t, h, w, c)`` order (any float dtype).
        video: ``(B, C, T, H, W)`` normalized float clip or uint8 clip.
        decoder_idx: ``(B, n)`` token index of each ``pred`` row.
        weight: ``(B, n)`` row weights (1 where the encoder masked the token).
    Returns:
        float32 scalar ``sum_rows(w * mean_P((pred - target)^2)) / sum(w)``; 0 when all
        weights are 0 (the official code would give NaN).

    Equivalent PyTorch code::

        target = cube_targets_ref(video, decoder_idx, ...)      # (B, n, P) float32
        rows = ((pred.float() - target) ** 2).mean(-1)
        (rows * weight).sum() / weight.sum()
    """
    target = cube_targets_ref(video, decoder_idx, tubelet=tubelet, patch=patch,
                              normalize=normalize, eps=eps)
    rows = (pred.float() - target).pow(2).mean(dim=-1)
    w = weight.float()
    den = w.sum()
    return (rows * w).sum() / torch.where(den > 0, den, torch.ones_like(den))


def masked_mse_loss(pred, video, decoder_idx, weight, *, tubelet: int, patch: int,
                    normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Dispatching loss (see ``masked_mse_loss_ref``)."""
    return masked_mse_loss_ref(pred, video, decoder_idx, weight, tubelet=tubelet, patch=patch,
                               normalize=normalize, eps=eps)
