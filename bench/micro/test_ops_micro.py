"""pytest-benchmark microbenchmarks of the ops that run on CPU (not part of ``make test``).

    .venv/bin/python -m pytest bench/micro --benchmark-only

Small ViT-B-shaped inputs (1 clip, 16x224, dual 0.9/0.5), fp32; each op's reference beside its
dispatching entry point (native extension where built, else the reference again).
"""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from vmae_fast import ops
from vmae_fast.attention import attention
from vmae_fast.config import config_for

CFG = config_for("vit_base_patch16_224", num_frames=16, img_size=224)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, 3, 16, 224, 224, generator=g)
    m = vmae_fast.DualMask.sample(1, CFG.grid, 0.9, 0.5, generator=g)
    return dict(video=video, m=m, z=torch.randn(1, m.n_visible, CFG.decoder_embed_dim, generator=g),
                pos=torch.randn(CFG.num_tokens, CFG.decoder_embed_dim, generator=g),
                tok=torch.randn(1, 1, CFG.decoder_embed_dim, generator=g),
                pred=torch.randn(1, m.n_decoder, CFG.cube_numel, generator=g))


@pytest.mark.parametrize("impl", ["ref", "dispatch"])
def test_gather_cubes(benchmark, data, impl):
    f = ops.gather_cubes_ref if impl == "ref" else ops.gather_cubes
    out = benchmark(f, data["video"], data["m"].visible_idx, tubelet=2, patch=16)
    assert out.shape == (1, data["m"].n_visible, CFG.cube_numel)


@pytest.mark.parametrize("impl", ["ref", "dispatch"])
def test_decoder_input(benchmark, data, impl):
    f = ops.decoder_input_ref if impl == "ref" else ops.decoder_input
    m = data["m"]
    out = benchmark(f, data["z"], data["pos"], data["tok"], m.visible_idx, m.decoder_idx)
    assert out.shape == (1, m.n_visible + m.n_decoder, CFG.decoder_embed_dim)


@pytest.mark.parametrize("impl", ["ref", "dispatch"])
def test_masked_mse_loss(benchmark, data, impl):
    f = ops.masked_mse_loss_ref if impl == "ref" else ops.masked_mse_loss
    m = data["m"]
    loss = benchmark(f, data["pred"], data["video"], m.decoder_idx, m.loss_weight(), tubelet=2, patch=16)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_decoder_attention(benchmark, backend):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 944, 3, 6, 64, generator=g)  # ViT-B decoder, dual 0.5: 160 + 784 tokens
    out = benchmark(attention, qkv, backend)
    assert out.shape == (1, 944, 384)


def test_mask_sampling(benchmark):
    m = benchmark(vmae_fast.DualMask.sample, 32, CFG.grid, 0.9, 0.5)
    assert m.visible_idx.shape == (32, 160) and m.decoder_idx.shape == (32, 784)
