"""Our pretrain model against the official-semantics reference, same weights: loss, pred and
every parameter gradient."""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from vmae_fast.attention import why_not
from vmae_fast.reference import ReferencePretrain

from conftest import ODD, rel_err, small_pretrain
from tolerances import MODEL_TOL

LOSS_TOL, GRAD_TOL = MODEL_TOL[torch.float32]


def _compare(model, masks, video, *, grad_tol=GRAD_TOL):
    ref = ReferencePretrain.from_model(model)
    out = model(video, masks)
    out.loss.backward()
    loss_ref, pred_ref = ref(video, masks.encoder_masked, masks.decoder_masked)
    loss_ref.backward()
    assert torch.isfinite(out.loss)
    assert out.pred.shape == pred_ref.shape == (video.shape[0], masks.n_decoder, model.cfg.cube_numel)
    assert rel_err(out.loss, loss_ref) < LOSS_TOL, (out.loss.item(), loss_ref.item())
    assert rel_err(out.pred, pred_ref) < LOSS_TOL
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(ref_params), "parameter names differ from the official ones"
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        if g_ref is None or g_ref.abs().max() == 0:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None, f"no grad for {name}"
        assert rel_err(p.grad, g_ref) < grad_tol, (name, rel_err(p.grad, g_ref))
    return out, loss_ref


@pytest.mark.parametrize("decoder_ratio", [0.0, 0.25, 0.5, 0.75])
def test_vit_s_every_decoder_ratio(decoder_ratio):
    model = small_pretrain(depth=4)
    video = torch.randn(2, 3, 4, 64, 64)
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.75, decoder_ratio)
    _compare(model, masks, video)


def test_vit_s_full_depth_tube_09():
    # ViT-S widths and depth, 8 frames x 96 px: 4x6x6 tokens, tube 0.9 keeps 3 per frame
    model = small_pretrain(num_frames=8, img_size=96)
    video = torch.randn(2, 3, 8, 96, 96)
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.9, 0.5)
    assert masks.n_visible == 4 * 4
    _compare(model, masks, video)


@pytest.mark.parametrize("decoder_ratio", [0.0, 0.5])
@pytest.mark.parametrize("ckpt", [False, True, 1])
def test_odd_config(decoder_ratio, ckpt):
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", grad_checkpointing=ckpt, **ODD)
    video = torch.randn(3, 3, 6, 48, 48)
    masks = vmae_fast.DualMask.sample(3, model.grid, 0.6, decoder_ratio)
    _compare(model, masks, video)


def test_options_layer_scale_learnable_pos_tubelet_random_mask():
    model = vmae_fast.create_pretrain_model(
        "vit_small_patch16_224", init_values=0.1, learnable_pos_embed=True, tubelet_size=3,
        **{**ODD, "num_frames": 9})
    video = torch.randn(2, 3, 9, 48, 48)
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.7, 0.5, encoder_mask_type="random")
    _compare(model, masks, video)
    assert model.encoder.pos_embed.grad is not None and model.pos_embed.grad is not None


def test_uint8_clip_matches_normalized_float():
    model = small_pretrain(depth=2, decoder_depth=1)
    raw = torch.randint(0, 256, (2, 3, 4, 64, 64), dtype=torch.uint8)
    mean = torch.tensor(vmae_fast.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(vmae_fast.IMAGENET_STD).view(1, 3, 1, 1, 1)
    video = (raw.float() / 255 - mean) / std
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.75, 0.5)
    a, b = model(raw, masks), model(video, masks)
    assert rel_err(a.pred, b.pred) < 1e-6
    assert rel_err(a.loss, b.loss) < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "math", "flash_attn", "xformers", "auto"])
def test_each_attention_backend(backend):
    probe = torch.empty(1, 1, 3, 1, 64)
    if backend in ("flash_attn", "xformers") and why_not(backend, probe) is not None:
        pytest.skip(f"{backend} unusable here: {why_not(backend, probe)}")
    model = small_pretrain(depth=2, attn_backend=backend)
    video = torch.randn(2, 3, 4, 64, 64)
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.75, 0.5)
    _compare(model, masks, video)


def test_checkpointing_identical_loss_and_grads_with_drop_path():
    torch.manual_seed(1)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", drop_path_rate=0.3, **ODD)
    video = torch.randn(2, 3, 6, 48, 48)
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.6, 0.5)
    results = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(123)
        out = model(video, masks)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=0, atol=1e-7), n


def test_eval_mode_no_grad_and_determinism():
    model = small_pretrain(depth=2).eval()
    video = torch.randn(1, 3, 4, 64, 64)
    masks = vmae_fast.DualMask.sample(1, model.grid, 0.5, 0.25)
    with torch.no_grad():
        a = model(video, masks)
        b = model(video, masks)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss)


def test_bf16_autocast_keeps_official_dtypes_and_matches_reference():
    # Official: the encoder adds the table ``type_as(x)`` (a bf16 residual stream under
    # autocast) while the decoder input is promoted to fp32 by the fp32 table.
    model = small_pretrain(depth=2, decoder_depth=1)
    ref = ReferencePretrain.from_model(model)
    video = torch.randn(2, 3, 4, 64, 64)
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.75, 0.5)
    seen = {}

    def record(key):
        def hook(module, args):
            seen[key] = args[0].dtype  # returns None: the input is left as it is
        return hook

    model.encoder.blocks[0].register_forward_pre_hook(record("enc"))
    model.decoder.blocks[0].register_forward_pre_hook(record("dec"))
    ref.encoder.blocks[0].register_forward_pre_hook(record("ref_enc"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(video, masks)
        loss_ref, _ = ref(video, masks.encoder_masked, masks.decoder_masked)
    assert seen == {"enc": torch.bfloat16, "ref_enc": torch.bfloat16, "dec": torch.float32}
    assert out.loss.dtype == torch.float32
    assert rel_err(out.loss, loss_ref) < MODEL_TOL[torch.bfloat16][0]
