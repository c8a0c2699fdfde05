"""Hugging Face ``transformers`` VideoMAE interop: its state dicts into our models and back, and
its ``VideoMAEForPreTraining`` built with a given model's weights (a peer for the benchmark).

Key level (no model, no ``transformers`` needed; the leaf ``vmae_fast.hf_keys``, re-exported here)::

    conv = convert_hf_state_dict(sd)    # HF keys -> official keys (docs/semantics.md §7)
    conv.state_dict, conv.kind, conv.layout, conv.dropped

Model level::

    model = from_hf_state_dict(sd, config)            # VideoMAEv2Pretrain or VideoMAEv2Classifier
    model.load_official_state_dict(sd)                # an HF state dict loads into a built model too
    sd = to_hf_state_dict(model)                      # our weights under HF's keys
    hf = to_hf_model(model)                           # transformers model, same weights and function
    loss = hf_pretrain_step(hf, video, masks)         # its loss on our encoder masks

What is recognized: the state dicts of ``VideoMAEForPreTraining`` (``videomae.*``, ``decoder.*``,
``encoder_to_decoder``, ``mask_token``), ``VideoMAEForVideoClassification`` (``videomae.*``,
``fc_norm`` with mean pooling or ``videomae.layernorm`` without, ``classifier``) and the bare
``VideoMAEModel`` (no ``videomae.`` prefix), in both bias layouts of transformers' history:
``attention.attention.q_bias``/``v_bias`` (transformers 4) and ``query.bias``/``value.bias``
(transformers 5), or none (``qkv_bias=False``); an ``embeddings.position_embeddings`` table (no
class-token row), where a conversion saved one, is kept (it must be the fixed sin-cos table unless
the model's tables are learnable). The separate ``query``/``key``/``value`` weights become the
official ``qkv`` weight (rows ``[q; k; v]``). A ``key.bias`` is dropped on purpose: adding one
vector to every key adds the same number to each logit of a query's row, which softmax cancels.

Two differences that are not weights:

- **LayerNorm eps.** The official models (and ours) use ``1e-6`` everywhere. transformers uses
  ``config.layer_norm_eps`` (default ``1e-12``) in the blocks and the final ``videomae.layernorm``,
  and PyTorch's default ``1e-5`` in ``fc_norm`` and ``decoder.norm``. ``eps="official"`` (the
  default) keeps ours; ``eps="hf"`` sets every LayerNorm of the built model to transformers'
  values, so its outputs match a stock transformers model (not saved in any state dict).
- **Layouts.** transformers takes ``pixel_values`` as ``(B, T, C, H, W)``; we take
  ``(B, C, T, H, W)``. Its pretraining model masks with ``bool_masked_pos`` (True = masked) and
  reconstructs every masked token: our encoder-only masking (``DualMask.from_bool``); it has
  no dual masking. Its ``norm_pix_loss`` is our ``normalize_target`` (same unbiased per-cube
  statistics, ``+1e-6`` on the std), its loss the mean over all masked cubes of the batch: ours.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from .checkpoint import describe_keys, unwrap_state_dict
from .hf_keys import (HF_CLASSIFIER_CLASS, HF_HEAD_NORM_EPS, HF_PRETRAIN_CLASS, OFFICIAL_EPS,  # noqa: F401
                      HFConversion, convert_hf_state_dict, hf_layer_norm_eps, is_hf_state_dict,
                      official_to_hf_keys, set_layer_norm_eps)
from .layers import Attention
from .models import VideoMAEv2Classifier, VideoMAEv2Pretrain
from .models.load import build_model, infer_architecture, read_checkpoint
from .ops._common import normalize_uint8


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("this needs Hugging Face transformers: pip install transformers "
                          "(or pip install 'vmae-fast[test]')") from exc
    return transformers


# --------------------------------------------------------------------------- our models -> HF

def to_hf_state_dict(model: nn.Module, legacy_bias_names: bool = False) -> dict[str, torch.Tensor]:
    """Our model's weights under transformers' keys: ``VideoMAEForPreTraining`` for a
    ``VideoMAEv2Pretrain``, ``VideoMAEForVideoClassification`` for a ``VideoMAEv2Classifier``.
    ``legacy_bias_names=True`` names the q/v biases as transformers 4 did (``q_bias``/``v_bias``)
    instead of ``query.bias``/``value.bias``. Raises ``ValueError`` for what transformers' VideoMAE
    cannot hold (layer scale, cosine attention, learnable positional tables, a custom qk scale)."""
    _check_representable(model)
    kind = _kind_of(model)
    return official_to_hf_keys(model.official_state_dict(), kind, legacy_bias_names)


def hf_config_kwargs(model: nn.Module) -> dict[str, Any]:
    """The ``transformers.VideoMAEConfig`` keyword arguments of our model's architecture (with
    the official LayerNorm eps ``1e-6`` in the blocks; ``to_hf_model`` sets the other norms)."""
    _check_representable(model)
    cfg = model.cfg
    kw = dict(image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
              num_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size, hidden_size=cfg.embed_dim,
              num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
              intermediate_size=cfg.mlp_hidden, hidden_act="gelu", qkv_bias=cfg.qkv_bias,
              layer_norm_eps=OFFICIAL_EPS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if _kind_of(model) == "pretrain":
        kw.update(use_mean_pooling=False,  # the pretraining encoder ends with a LayerNorm
                  decoder_hidden_size=cfg.decoder_embed_dim, decoder_num_hidden_layers=cfg.decoder_depth,
                  decoder_num_attention_heads=cfg.decoder_num_heads,
                  decoder_intermediate_size=cfg.decoder_mlp_hidden, norm_pix_loss=cfg.normalize_target)
    else:
        blk = model.blocks[0] if len(model.blocks) else None
        kw.update(use_mean_pooling=model.use_mean_pooling, num_labels=model.num_classes,
                  attention_probs_dropout_prob=blk.attn.attn_drop if blk is not None else 0.0)
    return kw


def _kind_of(model: nn.Module) -> str:
    if isinstance(model, VideoMAEv2Pretrain):
        return "pretrain"
    if isinstance(model, VideoMAEv2Classifier):
        return "classifier"
    raise TypeError(f"expected a VideoMAEv2Pretrain or VideoMAEv2Classifier, got {type(model).__name__}")


def _check_representable(model: nn.Module, training: bool = False) -> None:
    """Refuse what transformers' VideoMAE cannot hold: weights or options that change its
    function (always), and, with ``training``, what changes only the training function (drop
    path, dropout where transformers has none)."""
    cfg = model.cfg
    why = []
    if cfg.init_values > 0:
        why.append("layer scale (init_values > 0: gamma_1/gamma_2)")
    if cfg.learnable_pos_embed:
        why.append("learnable positional tables (transformers' are fixed sin-cos)")
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    if any(a.cos_attn for a in attns):
        why.append("cosine attention (cos_attn)")
    if any(not a.cos_attn and a.scale != a.head_dim ** -0.5 for a in attns):
        why.append("a custom qk_scale")
    clf = _kind_of(model) == "classifier"
    if clf and model.num_classes == 0:
        why.append("no classification head (num_classes=0)")
    if training:
        if cfg.drop_path_rate > 0:
            why.append(f"drop path (drop_path_rate={cfg.drop_path_rate})")
        if clf and model.drop_rate > 0:
            why.append(f"drop_rate={model.drop_rate} (transformers has no dropout after the positional embedding)")
        if clf and model.head_dropout.p > 0:
            why.append(f"head dropout {model.head_dropout.p} (transformers has none before its classifier)")
    if why:
        raise ValueError(f"transformers' VideoMAE cannot hold this {type(model).__name__}: " + "; ".join(why))


# --------------------------------------------------------------------------- HF -> our models

def from_hf_state_dict(state_dict: Mapping[str, Any], config: Any = None, *, eps: str = "official",
                       attn_backend: str = "sdpa", **overrides) -> nn.Module:
    """Build our model from a transformers VideoMAE state dict and load it (strictly).

    ``config``: the transformers ``VideoMAEConfig`` (or its dict, e.g. a ``config.json``); its
    ``num_frames``, ``image_size``, head counts, ``norm_pix_loss`` and ``layer_norm_eps`` are
    used, everything else is read off the weights. Without it the head counts come from the
    named arch of the same width, and ``num_frames=16``, ``img_size=224``. ``overrides``: any
    ``create_model`` / ``create_pretrain_model`` option (``num_frames``, ``img_size``,
    ``num_heads``, ``drop_path_rate``...); they win over the config.

    Returns a ``VideoMAEv2Pretrain`` for ``VideoMAEForPreTraining`` weights, else a
    ``VideoMAEv2Classifier`` (``num_classes=0`` for a bare ``VideoMAEModel``, whose mean-pooling
    ``fc_norm`` it lacks stays at its init). ``eps``: ``"official"`` (1e-6, the function the
    released weights were trained with) or ``"hf"`` (transformers' LayerNorm eps, to match its
    outputs exactly; module docstring). The steps are ``load_model``'s (``vmae_fast.models.load``).
    """
    sd = unwrap_state_dict(state_dict)
    if not is_hf_state_dict(sd):
        raise ValueError(f"not a Hugging Face transformers VideoMAE state dict ({describe_keys(sd)})")
    weights = read_checkpoint(sd, config)
    return build_model(infer_architecture(weights, attn_backend=attn_backend, **overrides), weights, eps=eps)


def to_hf_model(model: nn.Module, attn_implementation: str = "sdpa", eps: str = "official") -> nn.Module:
    """A transformers ``VideoMAEForPreTraining`` (for a ``VideoMAEv2Pretrain``) or
    ``VideoMAEForVideoClassification`` (for a ``VideoMAEv2Classifier``) holding ``model``'s
    weights (``to_hf_state_dict``, strict load), on its device and dtype, in its train/eval mode.

    ``eps="official"``: every LayerNorm of the HF model gets eps 1e-6, as ours, so both compute
    the same function; ``"hf"``: transformers' own (1e-6 in the blocks from the config, 1e-5 in
    ``fc_norm``/``decoder.norm``). ``attn_implementation``: ``"sdpa"`` or ``"eager"``. Refuses, besides
    what ``to_hf_state_dict`` refuses, what would make its training function differ: drop path,
    and the classifier's ``drop_rate`` / head dropout."""
    transformers = _require_transformers()
    if eps not in ("official", "hf"):
        raise ValueError(f"eps must be 'official' or 'hf', got {eps!r}")
    _check_representable(model, training=True)
    kind = _kind_of(model)
    config = transformers.VideoMAEConfig(**hf_config_kwargs(model))
    cls = getattr(transformers, HF_PRETRAIN_CLASS if kind == "pretrain" else HF_CLASSIFIER_CLASS)
    hf = cls._from_config(config, attn_implementation=attn_implementation)
    legacy = any(k.endswith("attention.attention.q_bias") for k in hf.state_dict())
    hf.load_state_dict(to_hf_state_dict(model, legacy_bias_names=legacy), strict=True)
    if eps == "official":
        set_layer_norm_eps(hf, OFFICIAL_EPS)
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).train(model.training)


def hf_pixel_values(video: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Our clip ``(B, C, T, H, W)`` (normalized float, or uint8 normalized here with the ImageNet
    mean/std) as transformers' ``pixel_values`` ``(B, T, C, H, W)`` (a view for a float clip)."""
    if video.dtype == torch.uint8:
        video = normalize_uint8(video).to(dtype or torch.float32)
    return video.transpose(1, 2)


def hf_pretrain_step(hf_model: nn.Module, video: torch.Tensor, masks, check_masks: bool = True) -> torch.Tensor:
    """transformers' pretraining loss on our clip and masks: ``hf_model(pixel_values,
    bool_masked_pos=masks.encoder_masked).loss`` (float32 scalar), the same function as our
    ``model(video, masks).loss`` for a model built by ``to_hf_model``.

    transformers' VideoMAE has no dual masking: its decoder reconstructs every encoder-masked
    token. Masks whose decoder set is anything else raise ``ValueError``. That check compares
    the masks (a device sync): pass ``check_masks=False`` in a timed loop once checked."""
    if not hasattr(masks, "encoder_masked"):
        raise ValueError(f"masks must be a vmae_fast.DualMask, got {type(masks).__name__}")
    B, N = masks.encoder_masked.shape
    if masks.n_visible + masks.n_decoder != N or (check_masks and not torch.equal(
            masks.decoder_masked, ~masks.encoder_masked)):
        raise ValueError("transformers' VideoMAEForPreTraining supports encoder-only masking only (its decoder "
                         "reconstructs exactly the encoder-masked tokens): dual masking (a running-cell decoder "
                         "mask) is not supported there. Use DualMask.sample(..., decoder_ratio=0) or "
                         "DualMask.from_bool(encoder_masked)")
    dtype = next(hf_model.parameters()).dtype
    out = hf_model(hf_pixel_values(video, dtype), bool_masked_pos=masks.encoder_masked)
    return out.loss
