"""Fixed sin-cos positional table (docs/semantics.md §2)."""
from __future__ import annotations

import numpy as np
import torch


def sincos_table(num_tokens: int, dim: int) -> torch.Tensor:
    """``(num_tokens, dim)`` float32 table: ``angle = pos / 10000 ** (2 * (j // 2) / dim)``,
    ``sin`` on even ``j``, ``cos`` on odd ``j``. Computed in float64 like the official numpy
    code, then rounded to float32 once."""
    pos = np.arange(num_tokens, dtype=np.float64)[:, None]
    j = np.arange(dim)[None, :]
    angle = pos / np.power(10000, 2 * (j // 2) / dim)
    table = np.empty_like(angle)
    table[:, 0::2] = np.sin(angle[:, 0::2])
    table[:, 1::2] = np.cos(angle[:, 1::2])
    return torch.from_numpy(table).float()
