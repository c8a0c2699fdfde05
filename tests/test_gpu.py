"""The model on CUDA: fp32 against the CPU reference, bf16 autocast against fp32 with a
per-dtype tolerance. Skipped, with the reason, where no CUDA device is present."""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from vmae_fast.reference import ReferencePretrain

from conftest import TOL, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _setup(decoder_ratio=0.5, **kw):
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", num_frames=8, img_size=112, depth=4, **kw)
    video = torch.randn(4, 3, 8, 112, 112)
    masks = vmae_fast.DualMask.sample(4, model.grid, 0.9, decoder_ratio, generator=torch.Generator().manual_seed(0))
    return model, video, masks


@pytest.mark.parametrize("decoder_ratio", [0.0, 0.5])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cuda_fp32_matches_cpu_reference(decoder_ratio, backend):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, video, masks = _setup(decoder_ratio, attn_backend=backend)
    ref = ReferencePretrain.from_model(model)
    loss_ref, pred_ref = ref(video, masks.encoder_masked, masks.decoder_masked)
    loss_ref.backward()
    model.cuda()
    out = model(video.cuda(), masks.to("cuda"))
    out.loss.backward()
    assert rel_err(out.loss.cpu(), loss_ref) < 1e-4
    refp = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert rel_err(p.grad.cpu(), refp[n].grad) < 1e-3, n


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_cuda_bf16_autocast_close_to_fp32(backend):
    model, video, masks = _setup(attn_backend=backend)
    model.cuda()
    video, masks = video.cuda(), masks.to("cuda")
    out32 = model(video, masks)
    g32 = torch.autograd.grad(out32.loss, list(model.parameters()))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16 = model(video, masks)
    assert out16.loss.dtype == torch.float32
    g16 = torch.autograd.grad(out16.loss, list(model.parameters()))
    fwd_tol, grad_tol = TOL[torch.bfloat16]
    assert rel_err(out16.loss, out32.loss) < fwd_tol
    for (n, _), a, b in zip(model.named_parameters(), g16, g32):
        assert rel_err(a, b) < grad_tol * 4, n  # bf16 grads through 8 blocks


def test_cuda_grad_checkpointing_identical():
    model, video, masks = _setup()
    model.cuda()
    video, masks = video.cuda(), masks.to("cuda")
    losses, grads = [], []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(video, masks).loss
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
