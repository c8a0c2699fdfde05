"""``create_pretrain_model`` / ``create_model``: named archs (docs/semantics.md §6) with options;
``load_model``: the model a checkpoint file holds, built and loaded."""
from __future__ import annotations

from typing import Any

import torch

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


# --------------------------------------------------------------------------- from a checkpoint

def load_model(checkpoint: Any, kind: str | None = None, *, num_frames: int | None = None,
               img_size: int | None = None, hf_config: Any = None, eps: str = "official",
               **overrides) -> VideoMAEv2Classifier | VideoMAEv2Pretrain:
    """A model built to fit a checkpoint, with its weights loaded (strictly).

    ``checkpoint``: a file (``.pth``/``.pt``/``.bin``/``.safetensors``, read with
    ``load_checkpoint_file``), a Hugging Face model folder (``model.safetensors`` or
    ``pytorch_model.bin``, with its ``config.json``), or a state dict. Official pretraining,
    encoder-only and fine-tuning files and Hugging Face transformers VideoMAE state dicts
    (``vmae_fast.hf``) are recognized; the architecture (width, depth, patch and tubelet size,
    MLP ratio, q/v biases, layer scale, cosine attention, mean pooling, classes, decoder) is read
    off the weights, the head counts from the named arch of the same width (``num_heads=`` /
    ``decoder_num_heads=`` otherwise). ``num_frames`` / ``img_size`` (not in the weights; default
    16 / 224, or the Hugging Face config's) must be those the positional tables were made for.

    ``kind``: ``"classifier"`` or ``"pretrain"``; default: what the file is (a pretraining file
    gives the pretraining model; an encoder-only file a classifier without head). A pretraining
    file with ``kind="classifier"`` loads its encoder into a head-less classifier (``num_classes=0``
    unless given; the head and ``fc_norm`` stay as initialized). ``overrides``: any other
    ``create_model`` / ``create_pretrain_model`` option (``attn_backend``, ``drop_path_rate``...).
    """
    import os

    from ..checkpoint import (count_blocks, guess_format, heads_of_width, load_checkpoint_file, mlp_ratio_of,
                              unwrap_state_dict)

    if kind not in (None, "classifier", "pretrain"):
        raise ValueError(f"kind must be 'classifier', 'pretrain' or None, got {kind!r}")
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if os.path.isdir(path):
            path, hf_config = _hf_folder(path, hf_config)
        sd = unwrap_state_dict(load_checkpoint_file(path))
    else:
        sd = unwrap_state_dict(checkpoint)
    fmt = guess_format(sd)
    if fmt == "hf-videomae":
        from ..hf import from_hf_state_dict

        kw = dict(overrides)
        if num_frames is not None:
            kw["num_frames"] = num_frames
        if img_size is not None:
            kw["img_size"] = img_size
        model = from_hf_state_dict(sd, hf_config, eps=eps, **kw)
        if kind is not None and kind != ("pretrain" if isinstance(model, VideoMAEv2Pretrain) else "classifier"):
            raise ValueError(f"the Hugging Face checkpoint holds a {type(model).__name__}, not a {kind} model")
        return model
    if fmt == "unknown":
        raise ValueError("the checkpoint is no VideoMAE format we know (official pretraining / encoder-only / "
                         "fine-tuning, or Hugging Face transformers VideoMAE)")
    enc = "encoder." if any(k.startswith("encoder.blocks.") or k.startswith("encoder.patch_embed.") for k in sd) else ""
    kind = kind or ("pretrain" if fmt == "pretrain" else "classifier")
    w = sd[enc + "patch_embed.proj.weight"]
    dim = w.shape[0]
    depth = count_blocks(sd, enc + "blocks.")
    hidden = sd[f"{enc}blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim
    ratio = mlp_ratio_of(dim, hidden)
    opts: dict[str, Any] = dict(
        embed_dim=dim, depth=depth, in_chans=w.shape[1], tubelet_size=w.shape[2], patch_size=w.shape[3],
        mlp_ratio=ratio, qkv_bias=f"{enc}blocks.0.attn.q_bias" in sd if depth else True,
        init_values=0.1 if f"{enc}blocks.0.gamma_1" in sd else 0.0,  # loaded below
        learnable_pos_embed=(enc + "pos_embed") in sd and not _is_fixed_table(sd[enc + "pos_embed"]),
        num_frames=16 if num_frames is None else num_frames, img_size=224 if img_size is None else img_size)
    opts["num_heads"] = heads_of_width(dim, "encoder", overrides.get("num_heads"))
    if kind == "pretrain":
        if fmt != "pretrain":
            raise ValueError(f"a pretraining model needs a pretraining checkpoint (decoder included); "
                             f"this one is {fmt}")
        ddim = sd["encoder_to_decoder.weight"].shape[0]
        opts.update(decoder_embed_dim=ddim, decoder_depth=count_blocks(sd, "decoder.blocks."),
                    decoder_num_heads=heads_of_width(ddim, "decoder", overrides.get("decoder_num_heads")))
        opts.update(overrides)
        model = create_pretrain_model("vit_base_patch16_224", **opts)
        model.load_official_state_dict(sd, strict=True)
        return model
    has_head = "head.weight" in sd and not enc
    opts.update(num_classes=sd["head.weight"].shape[0] if has_head else 0,
                # a fine-tuning file says which pooling it had; any other gets the official default
                use_mean_pooling=fmt != "classifier" or "norm.weight" not in sd or "fc_norm.weight" in sd,
                cos_attn=f"{enc}blocks.0.attn.scale" in sd)
    opts.update(overrides)
    model = create_model("vit_base_patch16_224", **opts)
    exclude = () if fmt == "classifier" else ("fc_norm.", "head.", "norm.")
    model.load_official_state_dict(sd, strict=True, exclude=exclude)
    return model


def _is_fixed_table(t) -> bool:
    from ..pos_embed import sincos_table

    t = t.reshape(-1, t.shape[-1])
    return bool(torch.allclose(t.double().cpu(), sincos_table(t.shape[0], t.shape[1]).double(), rtol=0, atol=1e-5))


def _hf_folder(path: str, hf_config: Any):
    import json
    import os

    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            weights = os.path.join(path, name)
            break
    else:
        raise FileNotFoundError(f"{path} is a folder without model.safetensors or pytorch_model.bin")
    cfg_path = os.path.join(path, "config.json")
    if hf_config is None and os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    return weights, hf_config
