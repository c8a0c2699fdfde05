"""``create_pretrain_model`` / ``create_model``: named archs (docs/semantics.md §6) with options
(``load.py`` builds the model a checkpoint holds)."""
from __future__ import annotations

from ..attention import check_backend_name
from ..config import config_for
from .classifier import VideoMAEv2Classifier
from .pretrain import VideoMAEv2Pretrain


def create_pretrain_model(arch: str = "vit_base_patch16_224", *, num_frames: int = 16, img_size: int = 224,
                          decoder_depth: int = 4, tubelet_size: int = 2, drop_path_rate: float = 0.0,
                          init_values: float = 0.0, learnable_pos_embed: bool = False,
                          attn_backend: str = "sdpa", grad_checkpointing: bool | int | str = False,
                          normalize_target: bool = True, **overrides) -> VideoMAEv2Pretrain:
    """A VideoMAE V2 pretraining model (encoder + decoder).

    ``overrides`` may replace any ``VideoMAEConfig`` field (e.g. ``depth=2`` for a tiny test
    model). Sizes that don't divide into cubes raise ``ValueError``.
    """
    check_backend_name(attn_backend)
    cfg = config_for(arch, num_frames=num_frames, img_size=img_size, decoder_depth=decoder_depth,
                     tubelet_size=tubelet_size, drop_path_rate=drop_path_rate, init_values=init_values,
                     learnable_pos_embed=learnable_pos_embed, attn_backend=attn_backend,
                     normalize_target=normalize_target, **overrides)
    model = VideoMAEv2Pretrain(cfg)
    if grad_checkpointing:
        model.set_grad_checkpointing(grad_checkpointing)
    return model


def create_model(arch: str = "vit_base_patch16_224", num_classes: int = 400, *, num_frames: int = 16,
                 img_size: int = 224, tubelet_size: int = 2, drop_path_rate: float = 0.0,
                 head_drop_rate: float = 0.0, init_values: float = 0.0, learnable_pos_embed: bool = False,
                 use_mean_pooling: bool = True, head_init_scale: float = 0.001,
                 attn_backend: str = "sdpa", grad_checkpointing: bool | int | str = False,
                 qk_scale: float | None = None, cos_attn: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, **overrides) -> VideoMAEv2Classifier:
    """A VideoMAE V2 fine-tuning classifier (mean pooling, ``fc_norm``, head dropout, head).

    ``qk_scale``, ``cos_attn``, ``drop_rate`` and ``attn_drop_rate`` are the official fine-tuning
    model's options of the same names (``VideoMAEv2Classifier``), off by default."""
    check_backend_name(attn_backend)
    cfg = config_for(arch, num_frames=num_frames, img_size=img_size, tubelet_size=tubelet_size,
                     drop_path_rate=drop_path_rate, init_values=init_values,
                     learnable_pos_embed=learnable_pos_embed, attn_backend=attn_backend, **overrides)
    model = VideoMAEv2Classifier(cfg, num_classes, head_drop_rate=head_drop_rate,
                                 use_mean_pooling=use_mean_pooling, head_init_scale=head_init_scale,
                                 qk_scale=qk_scale, cos_attn=cos_attn, drop_rate=drop_rate,
                                 attn_drop_rate=attn_drop_rate)
    if grad_checkpointing:
        model.set_grad_checkpointing(grad_checkpointing)
    return model
