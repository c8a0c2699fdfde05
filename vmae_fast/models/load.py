"""``load_model``: the model a checkpoint holds, in three steps that can be called alone.

1. **read** (``read_checkpoint``): a file, a Hugging Face folder or a state dict -> the weights
   under official keys (Hugging Face keys converted by the leaf ``vmae_fast.hf_keys``), the format
   the file had and its HF config;
2. **infer** (``infer_architecture``): the ``create_model`` / ``create_pretrain_model`` options
   those weights fit (width, depth, patch and tubelet size, MLP ratio, biases, heads, decoder...);
3. **build** (``build_model``): that model, with the weights loaded strictly.

``vmae_fast.hf.from_hf_state_dict`` is these steps for a transformers state dict: this module
imports ``hf_keys`` (key names), never ``vmae_fast.hf`` (which imports the models).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint import (count_blocks, describe_keys, guess_format, heads_of_width, load_checkpoint_file, mlp_ratio_of,
                          unwrap_state_dict)
from ..hf_keys import (HFConversion, convert_hf_state_dict, hf_config_dict, hf_layer_norm_eps, hf_size,
                       set_layer_norm_eps)
from ..pos_embed import sincos_table
from .classifier import VideoMAEv2Classifier
from .factory import create_model, create_pretrain_model
from .pretrain import VideoMAEv2Pretrain

_MODEL_OF_KIND = {"pretrain": VideoMAEv2Pretrain.__name__, "classifier": VideoMAEv2Classifier.__name__}


@dataclass
class CheckpointWeights:
    """What ``read_checkpoint`` read. ``state_dict``: official keys; ``format``: what the file
    looked like (``vmae_fast.checkpoint.FORMATS``); ``hf``: the conversion of a Hugging Face state
    dict (``None`` for the official formats); ``hf_config``: its config as a dict (empty if none)."""

    state_dict: dict[str, torch.Tensor]
    format: str
    hf: HFConversion | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Architecture:
    """What ``infer_architecture`` read off the weights. ``kind``: ``"pretrain"`` or
    ``"classifier"``; ``options``: the keyword arguments of ``create_pretrain_model`` /
    ``create_model``; ``exclude``: key prefixes of the file the model does not load (a head-less
    file's ``fc_norm``...); ``hf_layer_norm_eps``: transformers' ``layer_norm_eps`` of an HF file,
    set on the model with ``eps="hf"``."""

    kind: str
    options: dict[str, Any]
    exclude: tuple[str, ...] = ()
    hf_layer_norm_eps: float | None = None


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
    ``eps`` (Hugging Face files only): ``"official"`` or ``"hf"`` (``vmae_fast.hf``).
    """
    weights = read_checkpoint(checkpoint, hf_config)
    arch = infer_architecture(weights, kind, num_frames=num_frames, img_size=img_size, **overrides)
    return build_model(arch, weights, eps=eps)


# --------------------------------------------------------------------------- read

def read_checkpoint(checkpoint: Any, hf_config: Any = None) -> CheckpointWeights:
    """Step 1 of ``load_model``: the weights of a file, a Hugging Face folder (its
    ``config.json`` is read unless ``hf_config`` is given) or a state dict, under official keys."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if os.path.isdir(path):
            path, hf_config = _hf_folder(path, hf_config)
        sd = unwrap_state_dict(load_checkpoint_file(path))
    else:
        sd = unwrap_state_dict(checkpoint)
    fmt = guess_format(sd)
    if fmt != "hf-videomae":
        return CheckpointWeights(sd, fmt, hf_config=hf_config_dict(hf_config))
    conv = convert_hf_state_dict(sd)
    return CheckpointWeights(conv.state_dict, fmt, conv, hf_config_dict(hf_config))


def _hf_folder(path: str, hf_config: Any):
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


# --------------------------------------------------------------------------- infer

def infer_architecture(weights: CheckpointWeights, kind: str | None = None, *, num_frames: int | None = None,
                       img_size: int | None = None, **overrides) -> Architecture:
    """Step 2 of ``load_model``: the model options ``weights`` fit (``load_model``'s arguments).
    ``overrides`` win over what is read. Raises ``ValueError`` for a format we don't know, a
    ``kind`` the file cannot give, or weights no model of ours can hold."""
    if kind not in (None, "classifier", "pretrain"):
        raise ValueError(f"kind must be 'classifier', 'pretrain' or None, got {kind!r}")
    if weights.format == "unknown":
        raise ValueError("the checkpoint is no VideoMAE format we know (official pretraining / encoder-only / "
                         "fine-tuning, or Hugging Face transformers VideoMAE)")
    if weights.hf is not None:
        return _infer_hf(weights, kind, num_frames, img_size, overrides)
    return _infer_official(weights, kind, num_frames, img_size, overrides)


def _encoder_options(sd: dict[str, torch.Tensor], enc: str) -> dict[str, Any]:
    """What the patch embedding and the first block say, for either format (official keys)."""
    w = sd[enc + "patch_embed.proj.weight"]
    dim = w.shape[0]
    depth = count_blocks(sd, enc + "blocks.")
    hidden = sd[f"{enc}blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim
    return dict(embed_dim=dim, depth=depth, in_chans=w.shape[1], tubelet_size=w.shape[2], patch_size=w.shape[3],
                mlp_ratio=mlp_ratio_of(dim, hidden), qkv_bias=f"{enc}blocks.0.attn.q_bias" in sd if depth else True)


def _infer_official(weights: CheckpointWeights, kind: str | None, num_frames: int | None, img_size: int | None,
                    overrides: dict[str, Any]) -> Architecture:
    sd, fmt = weights.state_dict, weights.format
    enc = "encoder." if any(k.startswith("encoder.blocks.") or k.startswith("encoder.patch_embed.") for k in sd) else ""
    kind = kind or ("pretrain" if fmt == "pretrain" else "classifier")
    opts = _encoder_options(sd, enc)
    opts.update(
        init_values=0.1 if f"{enc}blocks.0.gamma_1" in sd else 0.0,  # loaded by build_model
        learnable_pos_embed=(enc + "pos_embed") in sd and not _is_fixed_table(sd[enc + "pos_embed"]),
        num_frames=16 if num_frames is None else num_frames, img_size=224 if img_size is None else img_size,
        num_heads=heads_of_width(opts["embed_dim"], "encoder", overrides.get("num_heads")))
    if kind == "pretrain":
        if fmt != "pretrain":
            raise ValueError(f"a pretraining model needs a pretraining checkpoint (decoder included); "
                             f"this one is {fmt}")
        ddim = sd["encoder_to_decoder.weight"].shape[0]
        opts.update(decoder_embed_dim=ddim, decoder_depth=count_blocks(sd, "decoder.blocks."),
                    decoder_num_heads=heads_of_width(ddim, "decoder", overrides.get("decoder_num_heads")))
        opts.update(overrides)
        return Architecture("pretrain", opts)
    has_head = "head.weight" in sd and not enc
    opts.update(num_classes=sd["head.weight"].shape[0] if has_head else 0,
                # a fine-tuning file says which pooling it had; any other gets the official default
                use_mean_pooling=fmt != "classifier" or "norm.weight" not in sd or "fc_norm.weight" in sd,
                cos_attn=f"{enc}blocks.0.attn.scale" in sd)
    opts.update(overrides)
    return Architecture("classifier", opts, () if fmt == "classifier" else ("fc_norm.", "head.", "norm."))


def _is_fixed_table(t) -> bool:
    t = t.reshape(-1, t.shape[-1])
    return bool(torch.allclose(t.double().cpu(), sincos_table(t.shape[0], t.shape[1]).double(), rtol=0, atol=1e-5))


def _infer_hf(weights: CheckpointWeights, kind: str | None, num_frames: int | None, img_size: int | None,
              overrides: dict[str, Any]) -> Architecture:
    """transformers' VideoMAE: what its config says (frames, size, heads, ``norm_pix_loss``), the
    rest off the weights; no layer scale, cosine attention or learnable tables there."""
    conv, c, sd = weights.hf, weights.hf_config, weights.state_dict
    if conv.unknown:
        raise ValueError(f"keys of no known place in a transformers VideoMAE: {describe_keys(conv.unknown, 8)}")
    hf_kind = "pretrain" if conv.kind == "pretrain" else "classifier"
    if kind is not None and kind != hf_kind:
        raise ValueError(f"the Hugging Face checkpoint holds a {_MODEL_OF_KIND[hf_kind]}, not a {kind} model")
    overrides = dict(overrides)
    enc = "encoder." if hf_kind == "pretrain" else ""
    opts = _encoder_options(sd, enc)
    if c.get("patch_size") is not None and hf_size(c["patch_size"]) != opts["patch_size"]:
        raise ValueError(f"the config's patch_size is {c['patch_size']} but the weights' is {opts['patch_size']}")
    dim = opts["embed_dim"]
    opts.update(num_heads=heads_of_width(dim, "encoder", overrides.pop("num_heads", None)
                                        or c.get("num_attention_heads")),
                num_frames=int(c.get("num_frames", 16)) if num_frames is None else num_frames,
                img_size=hf_size(c.get("image_size", 224)) if img_size is None else img_size)
    eps = float(c.get("layer_norm_eps", 1e-12))
    if hf_kind == "pretrain":
        if "encoder.norm.weight" not in sd:
            raise ValueError("this VideoMAEForPreTraining has no final encoder LayerNorm ('videomae.layernorm', "
                             "absent with use_mean_pooling=True): the official pretraining model and ours always "
                             "end the encoder with one, so its function cannot be reproduced")
        ddim = sd["encoder_to_decoder.weight"].shape[0]
        ddepth = count_blocks(sd, "decoder.blocks.")
        if ddepth:
            dhidden = sd["decoder.blocks.0.mlp.fc1.weight"].shape[0]
            if int(ddim * opts["mlp_ratio"]) != dhidden:
                hidden = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
                raise ValueError(f"the decoder's MLP width {dhidden} is not int(decoder width {ddim} x the encoder's "
                                 f"MLP ratio {hidden}/{dim}): our decoder shares the encoder's ratio, as official")
        opts.update(decoder_embed_dim=ddim, decoder_depth=ddepth,
                    decoder_num_heads=heads_of_width(ddim, "decoder", overrides.pop("decoder_num_heads", None)
                                                     or c.get("decoder_num_attention_heads")),
                    normalize_target=bool(c.get("norm_pix_loss", True)))
        opts.update(overrides)
        return Architecture("pretrain", opts, hf_layer_norm_eps=eps)
    opts.update(num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                use_mean_pooling="fc_norm.weight" in sd or "norm.weight" not in sd)
    opts.update(overrides)
    return Architecture("classifier", opts, ("fc_norm.",) if conv.kind == "encoder" else (), eps)


# --------------------------------------------------------------------------- build

def build_model(arch: Architecture, weights: CheckpointWeights,
                eps: str = "official") -> VideoMAEv2Classifier | VideoMAEv2Pretrain:
    """Step 3 of ``load_model``: the model ``arch`` describes, ``weights`` loaded strictly.
    ``eps="hf"`` sets transformers' LayerNorm eps on a model from a Hugging Face file."""
    if eps not in ("official", "hf"):
        raise ValueError(f"eps must be 'official' or 'hf', got {eps!r}")
    create = create_pretrain_model if arch.kind == "pretrain" else create_model
    model = create("vit_base_patch16_224", **arch.options)
    model.load_official_state_dict(weights.state_dict, strict=True, exclude=arch.exclude)
    if eps == "hf" and arch.hf_layer_norm_eps is not None:
        set_layer_norm_eps(model, hf_layer_norm_eps(arch.hf_layer_norm_eps, model))
    return model
