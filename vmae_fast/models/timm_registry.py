"""Registers every arch with timm: ``vmae_fast_<arch>`` (classifier) and
``vmae_fast_pretrain_<arch>`` (pretraining model)."""
from __future__ import annotations

from ..config import ARCHS
from .factory import create_model, create_pretrain_model

# timm passes these to every entry point; they don't apply (no hub weights are fetched).
_TIMM_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entry(factory, arch, **kwargs):
    if kwargs.pop("pretrained", False):
        raise ValueError("vmae_fast models have no hub weights; load a file with "
                         "model.load_official_state_dict(vmae_fast.load_checkpoint_file(path))")
    for k in _TIMM_KWARGS:
        kwargs.pop(k, None)
    return factory(arch, **kwargs)


def _make_entry(factory, arch):
    def entry(**kwargs):
        return _entry(factory, arch, **kwargs)
    return entry


def register() -> list[str]:
    from timm.models import register_model

    names = []
    for arch in ARCHS:
        for prefix, factory in (("vmae_fast_", create_model), ("vmae_fast_pretrain_", create_pretrain_model)):
            name = prefix + arch
            fn = _make_entry(factory, arch)
            fn.__name__ = fn.__qualname__ = name
            fn.__module__ = __name__
            fn.__doc__ = f"{factory.__name__}({arch!r}, **kwargs)"
            register_model(fn)
            names.append(name)
    return names
