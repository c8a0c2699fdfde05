"""Fine-tune classifier against the official-semantics reference; timm registration."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vmae_fast
import vmae_fast.models.timm_registry  # noqa: F401  (registers vmae_fast_* with timm)
from vmae_fast.reference import ReferenceClassifier

from conftest import rel_err
from tolerances import MODEL_TOL

KW = dict(embed_dim=72, depth=2, num_heads=3, patch_size=8, num_frames=6, img_size=48)


@pytest.mark.parametrize("ckpt", [False, True])
def test_classifier_matches_reference(ckpt):
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=5, head_init_scale=1.0,
                                 grad_checkpointing=ckpt, **KW)
    ref = ReferenceClassifier.from_model(clf)
    video = torch.randn(3, 3, 6, 48, 48)
    a, b = clf(video), ref(video)
    assert a.shape == (3, 5)
    assert rel_err(a, b) < MODEL_TOL[torch.float32][0]
    a.square().sum().backward()
    b.square().sum().backward()
    refp = dict(ref.named_parameters())
    for n, p in clf.named_parameters():
        assert rel_err(p.grad, refp[n].grad) < MODEL_TOL[torch.float32][1], n


def test_head_init_scale_and_dropout():
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=4, head_drop_rate=0.5, **KW)
    assert 1e-5 < clf.head.weight.std().item() < 3e-5  # trunc-normal(std .02) scaled by 1e-3
    clf.eval()
    x = torch.randn(1, 3, 6, 48, 48)
    assert torch.equal(clf(x), clf(x))


def test_uint8_clip_into_bf16_classifier():
    """A uint8 clip is normalized into the model's own dtype: a bf16 model takes it (it raised a
    dtype mismatch in the Conv3d), close to the fp32 model on the fp32-normalized clip; fp32 is
    unchanged (bit-identical to normalizing first)."""
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=5, head_init_scale=1.0, **KW).eval()
    clip = torch.randint(0, 256, (2, 3, 6, 48, 48), dtype=torch.uint8)
    mean = torch.tensor(vmae_fast.IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(vmae_fast.IMAGENET_STD).view(3, 1, 1, 1)
    want = clf((clip.float() / 255 - mean) / std)
    assert torch.equal(clf(clip), want)
    bf16 = copy.deepcopy(clf).to(torch.bfloat16)
    got = bf16(clip)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got, want) < MODEL_TOL[torch.bfloat16][0], rel_err(got, want)


def test_timm_registration():
    names = timm.list_models("vmae_fast_*")
    assert "vmae_fast_vit_base_patch16_224" in names and "vmae_fast_pretrain_vit_giant_patch14_224" in names
    m = timm.create_model("vmae_fast_vit_small_patch16_224", num_classes=3, **KW)
    assert isinstance(m, vmae_fast.VideoMAEv2Classifier) and m(torch.randn(1, 3, 6, 48, 48)).shape == (1, 3)
    p = timm.create_model("vmae_fast_pretrain_vit_small_patch16_224", **KW, decoder_depth=1)
    assert isinstance(p, vmae_fast.VideoMAEv2Pretrain)
    with pytest.raises(ValueError, match="no hub weights"):
        timm.create_model("vmae_fast_vit_small_patch16_224", pretrained=True)


@pytest.mark.parametrize("arch, params_m", [("vit_small_patch16_224", 21.9), ("vit_base_patch16_224", 86.2),
                                            ("vit_giant_patch14_224", 1011.6)])
def test_parameter_counts(arch, params_m):
    # published encoder sizes: ViT-S 22M, ViT-B 87M, ViT-g 1.01B (+head); meta device: no memory
    with torch.device("meta"):
        clf = vmae_fast.create_model(arch, num_classes=0)
    n = sum(p.numel() for p in clf.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.01, n
