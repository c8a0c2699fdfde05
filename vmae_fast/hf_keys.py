"""Hugging Face ``transformers`` VideoMAE key names <-> the official key names, both ways, and the
few other names the two disagree on (LayerNorm eps by module name, config fields). A leaf: it
knows key names, not models (no import of ``vmae_fast.models``), so the models (which load HF
state dicts) and ``vmae_fast.hf`` (which builds models from them) both import it.

::

    conv = convert_hf_state_dict(sd)    # HF keys -> official keys (docs/semantics.md §7)
    conv.state_dict, conv.kind, conv.layout, conv.dropped
    official_to_hf_keys(sd, "pretrain") # official keys -> HF keys

The recognized layouts and the eps difference: ``vmae_fast.hf``'s docstring.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from .checkpoint import describe_keys, guess_format, unwrap_state_dict

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


def official_to_hf_keys(sd: Mapping[str, torch.Tensor], kind: str,
                        legacy_bias_names: bool = False) -> dict[str, torch.Tensor]:
    """Official keys -> transformers' keys: ``VideoMAEForPreTraining``'s for ``kind="pretrain"``,
    ``VideoMAEForVideoClassification``'s for ``"classifier"``. The ``qkv`` weight becomes the
    separate ``query``/``key``/``value`` weights. ``legacy_bias_names=True`` names the q/v biases as
    transformers 4 did (``q_bias``/``v_bias``) instead of ``query.bias``/``value.bias``. Raises
    ``ValueError`` for a block key of no HF place (layer scale, a cosine-attention scale)."""
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
            else:  # vmae_fast.hf.to_hf_state_dict refuses such models first
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

def hf_config_dict(config: Any) -> dict[str, Any]:
    """A transformers ``VideoMAEConfig``, its dict (a ``config.json``) or ``None`` as a dict."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a transformers VideoMAEConfig, a dict or None, got {type(config).__name__}")


def hf_size(v: Any) -> int:
    """An HF ``image_size``/``patch_size`` (an int or a square pair) as one int."""
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"only square frames and patches are supported, got {v}")
        v = v[0]
    return int(v)



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
