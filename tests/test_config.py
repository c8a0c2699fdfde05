"""One arch table with its aliases; one datasheet peak table."""
from __future__ import annotations

import pytest

import vmae_fast
from vmae_fast.config import ARCH_ALIASES, ARCHS, resolve_arch
from vmae_fast.flops import datasheet_peak_tflops


@pytest.mark.parametrize("alias", sorted(ARCH_ALIASES))
def test_every_alias_resolves_everywhere(alias):
    full = ARCH_ALIASES[alias]
    assert full in ARCHS and resolve_arch(alias) == resolve_arch(alias.upper().replace("_", "-")) == full
    assert vmae_fast.config_for(alias).arch == full


def test_create_model_takes_an_alias():
    model = vmae_fast.create_model("vit_s", num_classes=3, num_frames=2, img_size=32, depth=1)
    assert model.cfg.arch == "vit_small_patch16_224" and model.cfg.embed_dim == 384
    with pytest.raises(ValueError, match="unknown arch 'vit_q'.*alias"):
        vmae_fast.create_model("vit_q")


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("Tesla T4", None)])
def test_datasheet_peaks(name, peak):
    assert datasheet_peak_tflops(name) == peak
