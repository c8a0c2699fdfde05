"""Our models in timm: ``vmae_fast_<arch>`` (classifier) and ``vmae_fast_pretrain_<arch>``
(pretraining model), each with a ``pretrained_cfg``, registered as timm registers its own: one
small entry function per name under ``@register_model``. Importing this module registers them::

    import vmae_fast.models.timm_registry  # noqa: F401  (imports timm, registers vmae_fast_*)
    model = timm.create_model("vmae_fast_vit_base_patch16_224", num_classes=400)

``import vmae_fast`` does not import this module: timm (with torchvision) costs 2.0-2.6 s of
imports after torch (``python -c "import torch, time; t = time.perf_counter(); import timm.models;
print(time.perf_counter() - t)"``, timm 1.0.31, torch 2.14.1, the 2-core Xeon of
``bench/results/``, 3 runs), which users who never touch timm should not pay.

Weights come from files, never from a hub:

- ``timm.create_model(name, checkpoint_path=FILE)``: timm reads the file and calls the model's
  ``load_state_dict``, which sends official and Hugging Face layouts (a pretraining file into the
  classifier, ...) through ``load_official_state_dict`` (strict, as timm asks). Note that timm
  reads the file itself: before timm 1.0.16 (or so) with ``torch.load(weights_only=False)``.
- ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=FILE))``: the file is
  read by ``vmae_fast.load_checkpoint_file`` (``weights_only=True``) and loaded with
  ``load_official_state_dict``; a head of another class count is left fresh (as timm's
  ``pretrained`` loading drops a mismatched classifier), except a Kinetics-710 head into a
  400/600/700-class model, which is refused with the conversion to use
  (``vmae_fast.labels.convert_k710_head``).
"""
from __future__ import annotations

from timm.models import register_model

from ..config import ARCHS, IMAGENET_MEAN, IMAGENET_STD
from .factory import create_model, create_pretrain_model

# The fields of timm's PretrainedCfg we fill (timm builds its dataclass from these).
_CFG = dict(url="", hf_hub_id=None, input_size=(3, 224, 224), fixed_input_size=True, interpolation="bilinear",
            crop_pct=1.0, crop_mode="center", mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="patch_embed.proj",
            paper_name="VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking",
            paper_ids="arXiv:2303.16727", origin_url="https://github.com/OpenGVLab/VideoMAEv2",
            notes=("no hub weights: load a file with checkpoint_path= or pretrained_cfg_overlay=dict(file=...)",))

# Read by timm's register_model (per entry point name): timm.models.get_pretrained_cfg(name) works.
default_cfgs: dict[str, dict] = {}
for _arch in ARCHS:
    default_cfgs["vmae_fast_" + _arch] = dict(_CFG, num_classes=400, classifier="head")
    default_cfgs["vmae_fast_pretrain_" + _arch] = dict(_CFG, num_classes=0, classifier=None)


def _pretrained_cfg(name: str, pretrained_cfg, overlay) -> dict:
    cfg = dict(default_cfgs.get(name, {}))
    if pretrained_cfg is not None and not isinstance(pretrained_cfg, str):
        cfg.update(pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict())
    cfg.update(overlay or {})
    cfg.setdefault("architecture", name)
    return cfg


def _load_file(model, path: str) -> None:
    from ..checkpoint import load_checkpoint_file, unwrap_state_dict

    sd = unwrap_state_dict(load_checkpoint_file(path))
    exclude = ()
    head = model.state_dict().get("head.weight")
    if head is not None and "head.weight" in sd and sd["head.weight"].shape != head.shape:
        if sd["head.weight"].shape[0] == 710 and head.shape[0] in (400, 600, 700):
            raise ValueError(f"{path} has a Kinetics-710 head and the model {head.shape[0]} classes: convert it "
                             f"as the official fine-tuning does, vmae_fast.labels.convert_k710_head(sd, "
                             f"'k{head.shape[0]}'), then load_official_state_dict")
        exclude = ("head.",)
    model.load_official_state_dict(sd, exclude=exclude)


def _entry(factory, name, arch, **kwargs):
    pretrained = kwargs.pop("pretrained", False)
    cfg = _pretrained_cfg(name, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
    kwargs.pop("cache_dir", None)
    if pretrained and not cfg.get("file"):
        raise ValueError("vmae_fast models have no hub weights; load a file with "
                         "timm.create_model(..., checkpoint_path=FILE), "
                         "pretrained_cfg_overlay=dict(file=FILE) with pretrained=True, or "
                         "model.load_official_state_dict(vmae_fast.load_checkpoint_file(path))")
    model = factory(arch, **kwargs)
    c = model.cfg
    cfg.update(input_size=(c.in_chans, c.img_size, c.img_size), num_frames=c.num_frames,
               num_classes=getattr(model, "num_classes", 0))
    model.pretrained_cfg = cfg
    if pretrained:
        _load_file(model, cfg["file"])
    return model


# ------------------------------------------------------ the registered names (one per arch and model)

@register_model
def vmae_fast_vit_small_patch16_224(**kwargs):
    """``create_model("vit_small_patch16_224", **kwargs)``: the fine-tuning classifier."""
    return _entry(create_model, "vmae_fast_vit_small_patch16_224", "vit_small_patch16_224", **kwargs)


@register_model
def vmae_fast_pretrain_vit_small_patch16_224(**kwargs):
    """``create_pretrain_model("vit_small_patch16_224", **kwargs)``: the pretraining model."""
    return _entry(create_pretrain_model, "vmae_fast_pretrain_vit_small_patch16_224", "vit_small_patch16_224", **kwargs)


@register_model
def vmae_fast_vit_base_patch16_224(**kwargs):
    """``create_model("vit_base_patch16_224", **kwargs)``: the fine-tuning classifier."""
    return _entry(create_model, "vmae_fast_vit_base_patch16_224", "vit_base_patch16_224", **kwargs)


@register_model
def vmae_fast_pretrain_vit_base_patch16_224(**kwargs):
    """``create_pretrain_model("vit_base_patch16_224", **kwargs)``: the pretraining model."""
    return _entry(create_pretrain_model, "vmae_fast_pretrain_vit_base_patch16_224", "vit_base_patch16_224", **kwargs)


@register_model
def vmae_fast_vit_large_patch16_224(**kwargs):
    """``create_model("vit_large_patch16_224", **kwargs)``: the fine-tuning classifier."""
    return _entry(create_model, "vmae_fast_vit_large_patch16_224", "vit_large_patch16_224", **kwargs)


@register_model
def vmae_fast_pretrain_vit_large_patch16_224(**kwargs):
    """``create_pretrain_model("vit_large_patch16_224", **kwargs)``: the pretraining model."""
    return _entry(create_pretrain_model, "vmae_fast_pretrain_vit_large_patch16_224", "vit_large_patch16_224", **kwargs)


@register_model
def vmae_fast_vit_huge_patch16_224(**kwargs):
    """``create_model("vit_huge_patch16_224", **kwargs)``: the fine-tuning classifier."""
    return _entry(create_model, "vmae_fast_vit_huge_patch16_224", "vit_huge_patch16_224", **kwargs)


@register_model
def vmae_fast_pretrain_vit_huge_patch16_224(**kwargs):
    """``create_pretrain_model("vit_huge_patch16_224", **kwargs)``: the pretraining model."""
    return _entry(create_pretrain_model, "vmae_fast_pretrain_vit_huge_patch16_224", "vit_huge_patch16_224", **kwargs)


@register_model
def vmae_fast_vit_giant_patch14_224(**kwargs):
    """``create_model("vit_giant_patch14_224", **kwargs)``: the fine-tuning classifier."""
    return _entry(create_model, "vmae_fast_vit_giant_patch14_224", "vit_giant_patch14_224", **kwargs)


@register_model
def vmae_fast_pretrain_vit_giant_patch14_224(**kwargs):
    """``create_pretrain_model("vit_giant_patch14_224", **kwargs)``: the pretraining model."""
    return _entry(create_pretrain_model, "vmae_fast_pretrain_vit_giant_patch14_224", "vit_giant_patch14_224", **kwargs)
