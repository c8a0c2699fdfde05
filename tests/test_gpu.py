"""The model on each device: fp32 against the CPU reference, bf16 autocast against fp32 with a
per-dtype tolerance, activation checkpointing bit-identical. Every test runs its setup, shapes
and logic on CPU; the CUDA case runs where a CUDA device is present (skipped with the reason
elsewhere)."""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from vmae_fast.reference import ReferencePretrain

from conftest import full_fp32, on_devices, rel_err
from tolerances import MODEL_TOL, eps

# ViT-S, 4 blocks, 8x128: a 4x8x8 token grid (running-cell masking needs an even grid).
FRAMES, SIZE, BATCH = 8, 128, 2


def _setup(decoder_ratio=0.5, **kw):
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", num_frames=FRAMES, img_size=SIZE,
                                            depth=4, **kw)
    video = torch.randn(BATCH, 3, FRAMES, SIZE, SIZE)
    masks = vmae_fast.DualMask.sample(BATCH, model.grid, 0.9, decoder_ratio,
                                      generator=torch.Generator().manual_seed(0))
    return model, video, masks


def test_setup_grid_is_even():
    model, _, masks = _setup()
    assert model.grid == (FRAMES // 2, SIZE // 16, SIZE // 16)
    assert masks.decoder_idx.shape == (BATCH, model.grid[0] * model.grid[1] * model.grid[2] // 2)


@on_devices
@pytest.mark.parametrize("decoder_ratio", [0.0, 0.5])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_fp32_matches_cpu_reference(device, decoder_ratio, backend, no_tf32):
    model, video, masks = _setup(decoder_ratio, attn_backend=backend)
    ref = ReferencePretrain.from_model(model)
    loss_ref, _ = ref(video, masks.encoder_masked, masks.decoder_masked)
    loss_ref.backward()
    model.to(device)
    out = model(video.to(device), masks.to(device))
    out.loss.backward()
    assert rel_err(out.loss.cpu(), loss_ref) < 1e-4
    refp = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert rel_err(p.grad.cpu(), refp[n].grad) < 1e-3, n


@on_devices
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_bf16_autocast_close_to_fp32(device, backend):
    model, video, masks = _setup(attn_backend=backend)
    model.to(device)
    video, masks = video.to(device), masks.to(device)
    out32 = model(video, masks)
    g32 = torch.autograd.grad(out32.loss, list(model.parameters()))
    with torch.autocast(device, dtype=torch.bfloat16):
        out16 = model(video, masks)
    assert out16.loss.dtype == torch.float32
    g16 = torch.autograd.grad(out16.loss, list(model.parameters()))
    # Measured on CPU (sdpa, auto): loss 2-3e-5, gradients median 6e-3, worst 1.6e-2 (the q_bias
    # of deep blocks), i.e. within 2 bf16 epsilons. The loss is a mean of many rows in fp32.
    _, grad_tol = MODEL_TOL[torch.bfloat16]
    assert rel_err(out16.loss, out32.loss) < eps(torch.bfloat16) / 8
    for (n, _), a, b in zip(model.named_parameters(), g16, g32):
        assert rel_err(a, b) < grad_tol, n


@on_devices
def test_grad_checkpointing_identical(device):
    model, video, masks = _setup()
    model.to(device)
    video, masks = video.to(device), masks.to(device)
    losses, grads = [], []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(video, masks).loss
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("before", [True, False])
def test_full_fp32_restores_the_tf32_flags(before):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before
        with full_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 is before and torch.backends.cudnn.allow_tf32 is before
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
