"""Hugging Face transformers VideoMAE against ours, on the same weights and inputs: classifier
logits, pretraining loss, predictions and gradients on the same encoder masks, in both directions
of the conversion (vmae_fast/hf.py). Needs transformers (the ``test`` extra)."""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from vmae_fast import hf as vhf

from conftest import rel_err
from tolerances import MODEL_TOL

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers, "
                                                          "in the test extra)")

# tiny: 4 frames of 32x32, patch 8, tubelet 2 -> grid (2, 4, 4), 32 tokens; 3 heads of 16
HF_KW = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=48, num_hidden_layers=2,
             num_attention_heads=3, intermediate_size=192, decoder_hidden_size=32, decoder_num_attention_heads=2,
             decoder_num_hidden_layers=2, decoder_intermediate_size=128, qkv_bias=True)
FWD_TOL = MODEL_TOL[torch.float32][0]


def _randomize(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Every parameter moved off its init (biases and LayerNorms too), so each mapping shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _hf_classifier(mean_pooling=True, num_labels=5, **kw):
    cfg = transformers.VideoMAEConfig(**(HF_KW | kw), use_mean_pooling=mean_pooling, num_labels=num_labels)
    return _randomize(transformers.VideoMAEForVideoClassification(cfg)).eval(), cfg


def _hf_pretrain(norm_pix_loss=True, **kw):
    # use_mean_pooling=False: the pretraining encoder ends with videomae.layernorm, as the hub's checkpoints
    cfg = transformers.VideoMAEConfig(**(HF_KW | kw), use_mean_pooling=False, norm_pix_loss=norm_pix_loss)
    return _randomize(transformers.VideoMAEForPreTraining(cfg)).eval(), cfg


_NAMES = {"query.bias": ("query.bias", "value.bias"), "q_bias": ("q_bias", "v_bias")}


def _as_layout(sd, layout):
    """The q/v biases under transformers 5's names (``query.bias``) or transformers 4's
    (``q_bias``), whichever the installed transformers saves."""
    out = {}
    for k, v in sd.items():
        for old in _NAMES.values():
            for o, n in zip(old, _NAMES[layout]):
                k = k.replace(f"attention.attention.{o}", f"attention.attention.{n}")
        out[k] = v
    return out


def _clip(b=2):
    return torch.randn(b, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mean_pooling", [True, False])
@pytest.mark.parametrize("layout", ["query.bias", "q_bias"])
def test_classifier_logits_match_transformers(mean_pooling, layout):
    hf, cfg = _hf_classifier(mean_pooling)
    sd = _as_layout(hf.state_dict(), layout)
    assert vhf.convert_hf_state_dict(sd).layout == layout
    video = _clip()
    with torch.no_grad():
        want = hf(pixel_values=video.transpose(1, 2)).logits
        # eps="hf": transformers' LayerNorm eps (1e-12 in the blocks, 1e-5 in fc_norm): its exact function
        ours = vhf.from_hf_state_dict(sd, cfg, eps="hf").eval()
        assert isinstance(ours, vmae_fast.VideoMAEv2Classifier) and ours.use_mean_pooling == mean_pooling
        assert rel_err(ours(video), want) < FWD_TOL
        # eps="official" (1e-6 everywhere) is transformers' model with its norms at 1e-6
        official = vhf.from_hf_state_dict(sd, cfg).eval()
        vhf.set_layer_norm_eps(hf, 1e-6)
        assert rel_err(official(video), hf(pixel_values=video.transpose(1, 2)).logits) < FWD_TOL


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_pretraining_loss_pred_and_grads_match_transformers(norm_pix_loss):
    hf, cfg = _hf_pretrain(norm_pix_loss)
    ours = vhf.from_hf_state_dict(hf.state_dict(), cfg, eps="hf")
    assert isinstance(ours, vmae_fast.VideoMAEv2Pretrain) and ours.cfg.normalize_target == norm_pix_loss
    video = _clip()
    masks = vmae_fast.DualMask.sample(2, ours.grid, 0.75, 0.0, generator=torch.Generator().manual_seed(3))
    out_hf = hf(pixel_values=video.transpose(1, 2), bool_masked_pos=masks.encoder_masked)
    out = ours(video, masks)
    assert rel_err(out.pred, out_hf.logits) < FWD_TOL
    assert rel_err(out.loss, out_hf.loss) < FWD_TOL and out.loss.item() > 0
    out.loss.backward()
    out_hf.loss.backward()
    hp = dict(hf.named_parameters())
    for i in range(2):
        a = f"videomae.encoder.layer.{i}.attention.attention."
        want = torch.cat([hp[a + n + ".weight"].grad for n in ("query", "key", "value")])
        assert rel_err(ours.encoder.blocks[i].attn.qkv.weight.grad, want) < 1e-4
        q_bias = hp.get(a + "query.bias", hp.get(a + "q_bias"))  # transformers 5 / 4
        assert rel_err(ours.encoder.blocks[i].attn.q_bias.grad, q_bias.grad) < 1e-4
    assert rel_err(ours.encoder.patch_embed.proj.weight.grad,
                   hp["videomae.embeddings.patch_embeddings.projection.weight"].grad) < 1e-4
    assert rel_err(ours.mask_token.grad, hp["mask_token"].grad) < 1e-4


@pytest.mark.parametrize("kind", ["pretrain", "classifier"])
def test_to_hf_round_trip(kind):
    torch.manual_seed(4)
    kw = dict(depth=2, num_heads=3, embed_dim=48, patch_size=8, num_frames=4, img_size=32)
    if kind == "pretrain":
        ours = vmae_fast.create_pretrain_model("vit_small_patch16_224", decoder_depth=1, decoder_embed_dim=32,
                                               decoder_num_heads=2, **kw)
    else:
        ours = vmae_fast.create_model("vit_small_patch16_224", num_classes=7, **kw)
    _randomize(ours).eval()
    peer = vhf.to_hf_model(ours)  # eps="official": the same function
    assert peer.config._attn_implementation == "sdpa" and not peer.training
    video = _clip()
    with torch.no_grad():
        if kind == "pretrain":
            masks = vmae_fast.DualMask.sample(2, ours.grid, 0.5, 0.0, generator=torch.Generator().manual_seed(5))
            assert rel_err(vhf.hf_pretrain_step(peer, video, masks), ours(video, masks).loss) < FWD_TOL
        else:
            assert rel_err(peer(pixel_values=video.transpose(1, 2)).logits, ours(video)) < FWD_TOL
    # and back: the HF state dict converts to exactly our tensors
    back = vhf.convert_hf_state_dict(peer.state_dict()).state_dict
    own = ours.official_state_dict()
    assert sorted(back) == sorted(own)
    for k, v in own.items():
        assert torch.equal(back[k], v), k
    # legacy bias names on the way out, recognized on the way in
    legacy = vhf.to_hf_state_dict(ours, legacy_bias_names=True)
    assert any(k.endswith("attention.attention.q_bias") for k in legacy)
    assert vhf.convert_hf_state_dict(legacy).layout == "q_bias"


def test_hf_peer_is_sdpa_and_refuses_dual_masking():
    ours = vmae_fast.create_pretrain_model("vit_small_patch16_224", depth=1, num_heads=3, embed_dim=48,
                                           decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2,
                                           patch_size=8, num_frames=4, img_size=32)
    peer = vhf.to_hf_model(ours, attn_implementation="sdpa")
    assert type(peer).__name__ == "VideoMAEForPreTraining" and peer.config._attn_implementation == "sdpa"
    video = torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8)  # uint8 clips too
    enc_only = vmae_fast.DualMask.sample(2, ours.grid, 0.75, 0.0)
    loss = vhf.hf_pretrain_step(peer, video, enc_only)
    assert rel_err(loss, ours(video, enc_only).loss) < FWD_TOL
    loss.backward()  # a training step of the peer works
    assert peer.mask_token.grad is not None
    dual = vmae_fast.DualMask.sample(2, ours.grid, 0.75, 0.5)
    with pytest.raises(ValueError, match="encoder-only masking only.*dual masking.*not supported"):
        vhf.hf_pretrain_step(peer, video, dual)
    # same counts as encoder-only but another decoder set: still refused (the masks are compared)
    same_count = vmae_fast.DualMask.from_bool(enc_only.encoder_masked, enc_only.encoder_masked.roll(1, dims=1))
    with pytest.raises(ValueError, match="dual masking"):
        vhf.hf_pretrain_step(peer, video, same_count)


def test_hf_files_load_through_load_official_state_dict():
    hf, cfg = _hf_pretrain()
    sd = {"state_dict": hf.state_dict()}
    built = vhf.from_hf_state_dict(hf.state_dict(), cfg)
    # into a built pretraining model of that shape: everything loads
    target = vmae_fast.create_pretrain_model("vit_small_patch16_224", **{k: getattr(built.cfg, k) for k in (
        "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "num_frames", "img_size", "decoder_embed_dim",
        "decoder_depth", "decoder_num_heads")})
    report = target.load_official_state_dict(sd, strict=True)
    assert report.format == "hf-videomae" and not report.missing and not report.unexpected
    assert any("converted from Hugging Face" in n for n in report.notes)
    for k, v in built.official_state_dict().items():
        assert torch.equal(target.official_state_dict()[k], v), k
    # into the classifier: the encoder loads, the decoder side is skipped (as an official pretraining file)
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=3, **{k: getattr(built.cfg, k) for k in (
        "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "num_frames", "img_size")})
    report = clf.load_official_state_dict(hf.state_dict())
    assert "blocks.0.attn.qkv.weight" in report.loaded and "mask_token" in report.skipped
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    # nn.Module.load_state_dict takes the HF layout too (timm's checkpoint_path calls it)
    fresh = vmae_fast.create_pretrain_model("vit_small_patch16_224", **{k: getattr(built.cfg, k) for k in (
        "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "num_frames", "img_size", "decoder_embed_dim",
        "decoder_depth", "decoder_num_heads")})
    missing, unexpected = fresh.load_state_dict(hf.state_dict())
    assert not missing and not unexpected
    assert torch.equal(fresh.encoder.blocks[1].attn.v_bias, built.encoder.blocks[1].attn.v_bias)


def test_hf_without_final_encoder_norm_is_refused():
    cfg = transformers.VideoMAEConfig(**HF_KW, use_mean_pooling=True)  # transformers' default: no videomae.layernorm
    hf = transformers.VideoMAEForPreTraining(cfg)
    with pytest.raises(ValueError, match="no final encoder LayerNorm"):
        vhf.from_hf_state_dict(hf.state_dict(), cfg)


def test_unrepresentable_models_are_refused_by_name():
    kw = dict(depth=1, num_heads=3, embed_dim=48, patch_size=8, num_frames=4, img_size=32)
    with pytest.raises(ValueError, match="layer scale"):
        vhf.to_hf_state_dict(vmae_fast.create_model("vit_small_patch16_224", num_classes=2, init_values=0.1, **kw))
    with pytest.raises(ValueError, match="cosine attention"):
        vhf.to_hf_model(vmae_fast.create_model("vit_small_patch16_224", num_classes=2, cos_attn=True, **kw))
    # drop path changes only training: the weights export, the training peer is refused
    dp = vmae_fast.create_pretrain_model("vit_small_patch16_224", drop_path_rate=0.1, decoder_embed_dim=32,
                                         decoder_num_heads=2, **kw)
    assert "mask_token" in vhf.to_hf_state_dict(dp)
    with pytest.raises(ValueError, match="drop path"):
        vhf.to_hf_model(dp)
    with pytest.raises(ValueError, match="learnable positional"):
        vhf.to_hf_state_dict(vmae_fast.create_pretrain_model("vit_small_patch16_224", learnable_pos_embed=True,
                                                             decoder_embed_dim=32, decoder_num_heads=2, **kw))
