"""Shared fixtures: small configs that run in seconds on a 2-core CPU."""
from __future__ import annotations

import pytest
import torch

import vmae_fast

# fp32 tolerance table (relative to the reference's magnitude): forward values, gradients.
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-9), torch.bfloat16: (2e-2, 5e-2)}

# "odd" small config: dims not powers of two, 3 heads, non-square-ish token counts.
ODD = dict(embed_dim=72, depth=2, num_heads=3, decoder_embed_dim=48, decoder_num_heads=2, decoder_depth=2,
           patch_size=8, num_frames=6, img_size=48)


def small_pretrain(arch="vit_small_patch16_224", **kw):
    kw.setdefault("num_frames", 4)
    kw.setdefault("img_size", 64)
    return vmae_fast.create_pretrain_model(arch, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def has_cuda() -> bool:
    return torch.cuda.is_available()
