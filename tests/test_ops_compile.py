"""The pretrain model with the fused ops: equal to the model with the references (loss and every
grad), and traced whole by torch.compile(fullgraph=True) through the vmae_fast:: ops."""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from ops_helpers import interpret  # noqa: F401
from vmae_fast.reference import ReferencePretrain

TINY = dict(num_frames=4, img_size=32, depth=1, decoder_depth=1, embed_dim=48, num_heads=2,
            decoder_embed_dim=32, decoder_num_heads=2, patch_size=8)


def run(model, video, masks, fn=None):
    model.zero_grad(set_to_none=True)
    out = (model if fn is None else fn)(video, masks)
    out.loss.backward()
    return out.loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def setup(learnable, uint8=False):
    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", learnable_pos_embed=learnable, **TINY)
    if uint8:
        video = torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8)
    else:
        video = torch.randn(2, 3, 4, 32, 32)
    masks = model.sample_masks(2, encoder_ratio=0.75, decoder_ratio=0.5)
    return model, video, masks


def assert_same(a, b, atol=1e-5, rtol=1e-4):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def run_reference(model, video, masks):
    """Loss and grads of ``vmae_fast.reference`` (the official semantics, no fused op): an oracle
    that cannot be the kernel under test, whatever the kernel switch does."""
    ref = ReferencePretrain.from_model(model)
    if video.dtype == torch.uint8:  # the ImageNet normalization, written out
        mean = torch.tensor(vmae_fast.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
        std = torch.tensor(vmae_fast.IMAGENET_STD).view(1, 3, 1, 1, 1)
        video = (video.float() / 255 - mean) / std
    loss, _ = ref(video, masks.encoder_masked, masks.decoder_masked)
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in ref.named_parameters()}


@pytest.mark.parametrize("learnable,uint8", [(False, False), (True, True)])
def test_fused_model_equals_reference_model(learnable, uint8, interpret):
    model, video, masks = setup(learnable, uint8)
    fused = run(model, video, masks)
    ref = run_reference(model, video, masks)
    assert_same(fused, ref)
    if learnable:
        assert "pos_embed" in fused[1] and fused[1]["pos_embed"].abs().sum() > 0


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compile_fullgraph_matches_eager(backend, interpret):
    """Dynamo + AOTAutograd trace forward and backward through the vmae_fast:: ops (fake
    impls, registered autograd) with no graph break. CPU uses aot_eager: inductor's C++ build
    costs minutes on a 2-core machine; the GPU test below uses inductor."""
    torch._dynamo.reset()
    model, video, masks = setup(learnable=True)
    eager = run(model, video, masks)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = run(model, video, masks, fn=compiled)
    assert_same(got, eager)
    got2 = run(model, video, masks, fn=compiled)  # second step: no recompile needed
    assert_same(got2, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_inductor_cuda_matches_eager():
    torch._dynamo.reset()
    model, video, masks = setup(learnable=True, uint8=True)
    model, video, masks = model.cuda(), video.cuda(), masks.to("cuda")
    eager = run(model, video, masks)
    got = run(model, video, masks, fn=torch.compile(model, fullgraph=True))
    assert_same(got, eager, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("compile_first", [True, False])
def test_compile_fullgraph_on_the_default_path(compile_first):
    """The path users get (native CPU kernels when built, no interpreter, nothing patched):
    traced whole, whether the first call is compiled (nothing loaded lazily inside the trace)
    or eager. aot_eager: inductor's C++ build costs minutes on a 2-core machine."""
    torch._dynamo.reset()
    model, video, masks = setup(learnable=True, uint8=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    if compile_first:
        got = run(model, video, masks, fn=compiled)
        eager = run(model, video, masks)
    else:
        eager = run(model, video, masks)
        got = run(model, video, masks, fn=compiled)
    assert_same(got, eager)
