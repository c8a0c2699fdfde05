"""Hugging Face ``transformers`` VideoMAE interop: its state dicts into our models and back, and
its ``VideoMAEForPreTraining`` built with a given model's weights (a peer for the benchmark).

Key level (no model, no ``transformers`` needed)::

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

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from .checkpoint import count_blocks, describe_keys, heads_of_width, mlp_ratio_of, unwrap_state_dict
from .ops._common import normalize_uint8

HF_PRETRAIN_CLASS = "VideoMAEForPreTraining"
HF_CLASSIFIER_CLASS = "VideoMAEForVideoClassification"
OFFICIAL_EPS = 1e-6
HF_HEAD_NORM_EPS = 1e-5  # transformers' fc_norm and decoder.norm: nn.LayerNorm's default

# HF block sub-keys -> official block sub-keys (the q/k/v weights are assembled separately)
_BLOCK_MAP = {
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "attention.output.dense.": "attn.proj.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
    "attention.attention.query.bias": "attn.q_bias",
    "attention.attention.q_bias": "attn.q_bias",
    "attention.attention.value.bias": "attn.v_bias",
    "attention.attention.v_bias": "attn.v_bias",
}
_QKV = ("query", "key", "value")
_LAYER = re.compile(r"^(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$")


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("this needs Hugging Face transformers: pip install transformers "
                          "(or pip install 'vmae-fast[test]')") from exc
    return transformers


# --------------------------------------------------------------------------- key level

@dataclass
class HFConversion:
    """What ``convert_hf_state_dict`` made of an HF state dict. ``state_dict``: official keys;
    ``kind``: ``"pretrain"`` (VideoMAEForPreTraining), ``"classifier"``
    (VideoMAEForVideoClassification) or ``"encoder"`` (VideoMAEModel); ``layout``: the bias
    naming found (``"q_bias"``: transformers 4, ``"query.bias"``: transformers 5, ``"none"``);
    ``dropped``: HF keys left out on purpose, with the reason; ``unknown``: HF keys of no known
    place (kept under their own names, so a load reports them as unexpected)."""

    state_dict: dict[str, torch.Tensor]
    kind: str
    layout: str
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def is_hf_state_dict(keys) -> bool:
    """Whether keys look like transformers' VideoMAE (``vmae_fast.checkpoint.guess_format``)."""
    from .checkpoint import guess_format

    return guess_format(keys) == "hf-videomae"


def convert_hf_state_dict(state_dict: Mapping[str, Any]) -> HFConversion:
    """HF VideoMAE keys -> official keys (module docstring). Accepts a file's dict or its
    ``model``/``state_dict`` entry. Raises ``ValueError`` when a block lacks one of its
    ``query``/``key``/``value`` weights or the state dict is not transformers' VideoMAE."""
    sd = unwrap_state_dict(state_dict)
    if not is_hf_state_dict(sd):
        raise ValueError(f"not a Hugging Face transformers VideoMAE state dict ({describe_keys(sd)})")
    rooted = any(k.startswith("videomae.") for k in sd)
    if any(k.startswith(("decoder.decoder_layers.", "encoder_to_decoder.")) or k == "mask_token" for k in sd):
        kind = "pretrain"
    elif any(k.startswith(("classifier.", "fc_norm.")) for k in sd):
        kind = "classifier"
    else:
        kind = "encoder"
    enc = "encoder." if kind == "pretrain" else ""
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    layouts = set()
    for key, v in sd.items():
        k = key[len("videomae."):] if rooted and key.startswith("videomae.") else key
        in_model = key.startswith("videomae.") or not rooted
        m = _LAYER.match(k)
        if m and (m.group(1) == "decoder.decoder_layers" or in_model):
            stack, i, rest = m.groups()
            base = f"{enc}blocks.{i}." if stack == "encoder.layer" else f"decoder.blocks.{i}."
            name = rest.split(".")
            if rest.startswith("attention.attention.") and name[2] in _QKV and name[3] == "weight":
                qkv.setdefault(base, {})[name[2]] = v
                continue
            if rest == "attention.attention.key.bias":
                dropped[key] = "key bias: softmax cancels it (the official model has none)"
                continue
            if rest.endswith(("q_bias", "v_bias")):
                layouts.add("q_bias")
            elif rest.endswith(("query.bias", "value.bias")):
                layouts.add("query.bias")
            for src, dst in _BLOCK_MAP.items():
                if rest == src or (src.endswith(".") and rest.startswith(src)):
                    out[base + dst + rest[len(src):]] = v
                    break
            else:
                unknown.append(key)
                out[key] = v
        elif in_model and k.startswith("embeddings.patch_embeddings.projection."):
            out[enc + "patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif in_model and k == "embeddings.position_embeddings":
            out[enc + "pos_embed"] = v if v.dim() == 3 else v.unsqueeze(0)
        elif in_model and k.startswith("layernorm."):
            out[enc + "norm." + k[len("layernorm."):]] = v
        elif key.startswith("classifier."):
            out["head." + key[len("classifier."):]] = v
        elif key.startswith(("fc_norm.", "decoder.norm.", "decoder.head.", "encoder_to_decoder.")) \
                or key == "mask_token":
            out[key] = v
        elif key == "position_embeddings":  # the decoder's table, where a conversion saved it
            out["pos_embed"] = v if v.dim() == 3 else v.unsqueeze(0)
        else:
            unknown.append(key)
            out[key] = v
    for base, parts in sorted(qkv.items()):
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise ValueError(f"Hugging Face VideoMAE block {base.rstrip('.')} lacks its "
                             f"{'/'.join(missing)} weight: cannot assemble the qkv projection")
        out[base + "attn.qkv.weight"] = torch.cat([parts[p] for p in _QKV], dim=0)
    layout = "q_bias" if "q_bias" in layouts else ("query.bias" if layouts else "none")
    return HFConversion(out, kind, layout, dropped, unknown)


def to_hf_state_dict(model: nn.Module, legacy_bias_names: bool = False) -> dict[str, torch.Tensor]:
    """Our model's weights under transformers' keys: ``VideoMAEForPreTraining`` for a
    ``VideoMAEv2Pretrain``, ``VideoMAEForVideoClassification`` for a ``VideoMAEv2Classifier``.
    ``legacy_bias_names=True`` names the q/v biases as transformers 4 did (``q_bias``/``v_bias``)
    instead of ``query.bias``/``value.bias``. Raises ``ValueError`` for what transformers' VideoMAE
    cannot hold (layer scale, cosine attention, learnable positional tables, a custom qk scale)."""
    _check_representable(model)
    kind = _kind_of(model)
    sd = model.official_state_dict()
    enc = "encoder." if kind == "pretrain" else ""
    qb, vb = ("q_bias", "v_bias") if legacy_bias_names else ("query.bias", "value.bias")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.match(rf"^({re.escape(enc)}blocks|decoder\.blocks)\.(\d+)\.(.+)$", k)
        if m:
            stack, i, rest = m.groups()
            base = (f"videomae.encoder.layer.{i}." if stack != "decoder.blocks"
                    else f"decoder.decoder_layers.{i}.")
            if rest == "attn.qkv.weight":
                for name, w in zip(_QKV, v.chunk(3, dim=0)):  # copies: safetensors refuses shared storage
                    out[f"{base}attention.attention.{name}.weight"] = w.clone()
                continue
            special = {"attn.q_bias": f"attention.attention.{qb}", "attn.v_bias": f"attention.attention.{vb}"}
            if rest in special:
                out[base + special[rest]] = v
                continue
            for src, dst in _BLOCK_MAP.items():
                if src.endswith(".") and rest.startswith(dst):
                    out[base + src + rest[len(dst):]] = v
                    break
            else:  # pragma: no cover - _check_representable refused it already
                raise ValueError(f"no Hugging Face place for {k}")
        elif k.startswith(enc + "patch_embed.proj."):
            out["videomae.embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith(enc + "norm."):
            out["videomae.layernorm." + k[len(enc + "norm."):]] = v
        elif k.startswith("head.") and kind == "classifier":
            out["classifier." + k[len("head."):]] = v
        else:  # fc_norm, decoder.norm/head, encoder_to_decoder, mask_token: same names
            out[k] = v
    return out


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


# --------------------------------------------------------------------------- model level

def _kind_of(model: nn.Module) -> str:
    from .models import VideoMAEv2Classifier, VideoMAEv2Pretrain

    if isinstance(model, VideoMAEv2Pretrain):
        return "pretrain"
    if isinstance(model, VideoMAEv2Classifier):
        return "classifier"
    raise TypeError(f"expected a VideoMAEv2Pretrain or VideoMAEv2Classifier, got {type(model).__name__}")


def _check_representable(model: nn.Module, training: bool = False) -> None:
    """Refuse what transformers' VideoMAE cannot hold: weights or options that change its
    function (always), and, with ``training``, what changes only the training function (drop
    path, dropout where transformers has none)."""
    from .layers import Attention

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


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a transformers VideoMAEConfig, a dict or None, got {type(config).__name__}")


def _int_size(v: Any) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"only square frames and patches are supported, got {v}")
        v = v[0]
    return int(v)


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
    outputs exactly; module docstring).
    """
    from .models import create_model, create_pretrain_model

    if eps not in ("official", "hf"):
        raise ValueError(f"eps must be 'official' or 'hf', got {eps!r}")
    conv = convert_hf_state_dict(state_dict)
    sd, kind = conv.state_dict, conv.kind
    if conv.unknown:
        raise ValueError(f"keys of no known place in a transformers VideoMAE: {describe_keys(conv.unknown, 8)}")
    c = _config_dict(config)
    enc = "encoder." if kind == "pretrain" else ""
    w = sd[enc + "patch_embed.proj.weight"]
    dim, in_chans, tubelet, patch = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
    if c.get("patch_size") is not None and _int_size(c["patch_size"]) != patch:
        raise ValueError(f"the config's patch_size is {c['patch_size']} but the weights' is {patch}")
    depth = count_blocks(sd, enc + "blocks.")
    hidden = sd[f"{enc}blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim
    ratio = mlp_ratio_of(dim, hidden)
    opts: dict[str, Any] = dict(
        embed_dim=dim, depth=depth, patch_size=patch, tubelet_size=tubelet, in_chans=in_chans, mlp_ratio=ratio,
        num_heads=heads_of_width(dim, "encoder", overrides.pop("num_heads", None) or c.get("num_attention_heads")),
        num_frames=int(c.get("num_frames", 16)), img_size=_int_size(c.get("image_size", 224)),
        qkv_bias=f"{enc}blocks.0.attn.q_bias" in sd if depth else True, attn_backend=attn_backend)
    exclude: tuple[str, ...] = ()
    if kind == "pretrain":
        if "encoder.norm.weight" not in sd:
            raise ValueError("this VideoMAEForPreTraining has no final encoder LayerNorm ('videomae.layernorm', "
                             "absent with use_mean_pooling=True): the official pretraining model and ours always "
                             "end the encoder with one, so its function cannot be reproduced")
        ddim = sd["encoder_to_decoder.weight"].shape[0]
        ddepth = count_blocks(sd, "decoder.blocks.")
        if ddepth:
            dhidden = sd["decoder.blocks.0.mlp.fc1.weight"].shape[0]
            if int(ddim * ratio) != dhidden:
                raise ValueError(f"the decoder's MLP width {dhidden} is not int(decoder width {ddim} x the encoder's "
                                 f"MLP ratio {hidden}/{dim}): our decoder shares the encoder's ratio, as official")
        opts.update(decoder_embed_dim=ddim, decoder_depth=ddepth,
                    decoder_num_heads=heads_of_width(ddim, "decoder", overrides.pop("decoder_num_heads", None)
                                                     or c.get("decoder_num_attention_heads")),
                    normalize_target=bool(c.get("norm_pix_loss", True)))
        opts.update(overrides)
        model = create_pretrain_model("vit_base_patch16_224", **opts)
    else:
        mean_pool = "fc_norm.weight" in sd or "norm.weight" not in sd
        opts.update(num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                    use_mean_pooling=mean_pool)
        opts.update(overrides)
        model = create_model("vit_base_patch16_224", **opts)
        if kind == "encoder":
            exclude = ("fc_norm.",)
    model.load_official_state_dict(sd, strict=True, exclude=exclude)
    if eps == "hf":
        set_layer_norm_eps(model, hf_layer_norm_eps(c.get("layer_norm_eps", 1e-12), model))
    return model


def hf_layer_norm_eps(layer_norm_eps: float, model: nn.Module) -> dict[str, float]:
    """transformers' eps of each LayerNorm of our ``model`` (by module name): ``layer_norm_eps``
    in the blocks and the encoder's final norm, PyTorch's 1e-5 in ``fc_norm`` and ``decoder.norm``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            out[name] = HF_HEAD_NORM_EPS if name in ("fc_norm", "decoder.norm") else float(layer_norm_eps)
    return out


def set_layer_norm_eps(model: nn.Module, eps: float | Mapping[str, float]) -> nn.Module:
    """Set the ``eps`` of every LayerNorm of ``model`` (one value, or per module name)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = float(eps[name] if isinstance(eps, Mapping) else eps)
    return model


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
