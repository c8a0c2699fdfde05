"""Decoder input: running-cell gather of positional embeddings plus the mask-token concat."""
from __future__ import annotations

import torch


def decoder_input_ref(z: torch.Tensor, pos: torch.Tensor, mask_token: torch.Tensor,
                      visible_idx: torch.Tensor, decoder_idx: torch.Tensor) -> torch.Tensor:
    """Reference decoder input.

    Args:
        z: ``(B, n_vis, D)`` encoder output projected to the decoder width.
        pos: ``(N, D)`` decoder positional table (fixed or learnable).
        mask_token: ``(D,)`` or ``(1, 1, D)``.
        visible_idx: ``(B, n_vis)``; decoder_idx: ``(B, n_dec)`` token indices.
    Returns:
        ``(B, n_vis + n_dec, D)`` in the promoted dtype of the inputs (as the official code:
        a bf16 ``z`` plus the fp32 table gives fp32).

    Equivalent PyTorch code::

        torch.cat([z + pos[visible_idx], mask_token + pos[decoder_idx]], dim=1)
    """
    D = pos.shape[-1]
    return torch.cat([z + pos[visible_idx], mask_token.reshape(1, 1, D) + pos[decoder_idx]], dim=1)


def decoder_input(z, pos, mask_token, visible_idx, decoder_idx) -> torch.Tensor:
    """Dispatching decoder input (see ``decoder_input_ref``)."""
    return decoder_input_ref(z, pos, mask_token, visible_idx, decoder_idx)
