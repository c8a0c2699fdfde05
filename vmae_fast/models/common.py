"""Pieces shared by the pretrain model and the classifier: cube embedding, positions, input
checks, and official checkpoint interop (``OfficialCheckpointMixin``, docs/semantics.md §7)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.module import _IncompatibleKeys

from ..checkpoint import FORMATS, describe_keys, guess_format, unwrap_state_dict
from ..config import VideoMAEConfig
from ..errors import ShapeMismatch
from ..hf_keys import convert_hf_state_dict
from ..pos_embed import sincos_table


class CubeEmbed(nn.Module):
    """Tubelet embedding: a Conv3d with kernel = stride = ``(t, p, p)`` (key ``patch_embed.proj``).

    Because stride equals kernel, it is a Linear on each cube's pixels in ``(c, t, h, w)``
    order; ``embed_cubes`` applies it to gathered cubes only.
    """

    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        t, p = cfg.tubelet_size, cfg.patch_size
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=(t, p, p), stride=(t, p, p))

    def embed_cubes(self, cubes: torch.Tensor) -> torch.Tensor:
        """``(B, n, C*t*p*p)`` cubes in Conv3d weight order -> ``(B, n, D)``."""
        w = self.proj.weight
        return torch.nn.functional.linear(cubes, w.view(w.shape[0], -1), self.proj.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """All tokens: ``(B, C, T, H, W) -> (B, N, D)``."""
        return self.proj(video).flatten(2).transpose(1, 2)


def make_pos_embed(module: nn.Module, name: str, num_tokens: int, dim: int, learnable: bool) -> None:
    """A fixed sin-cos table as a non-persistent buffer (no state-dict key, as official), or a
    learnable ``(1, N, D)`` parameter initialized to the same table."""
    table = sincos_table(num_tokens, dim)
    if learnable:
        module.register_parameter(name, nn.Parameter(table.unsqueeze(0)))
    else:
        module.register_buffer(name, table.unsqueeze(0), persistent=False)


def check_video_shape(video: torch.Tensor, cfg: VideoMAEConfig, param_dtype: torch.dtype) -> None:
    expected = (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or tuple(video.shape[1:]) != expected:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must have shape (B, {', '.join(map(str, expected))}) for this model "
                         f"(B, C, T, H, W), got {got}")
    if not (video.is_floating_point() or video.dtype == torch.uint8):
        raise ValueError(f"video must be a normalized float clip or a uint8 clip, got {video.dtype}")
    if video.is_floating_point():
        allowed = {param_dtype}
        dev = video.device.type
        if torch.is_autocast_enabled(dev):  # autocast casts fp32 inputs of its op lists
            allowed |= {torch.float32, torch.get_autocast_dtype(dev)}
        if video.dtype not in allowed:
            raise ValueError(f"video is {video.dtype} but the model's weights are {param_dtype}: cast the "
                             f"clip (or the model){' or use an fp32 clip under autocast' if len(allowed) > 1 else ''}")


def as_embed_dtype(x: torch.Tensor, video: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x``, the float32 pixels (clip or gathered cubes) normalized from a uint8 ``video``, cast
    to the embedding ``weight``'s dtype: a bf16/fp16 model takes uint8 clips in its own dtype.
    Unchanged for a float clip, an fp32 model (bit-identical) or under autocast, which casts the
    embedding's inputs itself."""
    if video.dtype != torch.uint8 or x.dtype == weight.dtype:
        return x
    if torch.is_autocast_enabled(video.device.type):
        return x
    return x.to(weight.dtype)


# --------------------------------------------------------------------------- checkpoint interop

@dataclass
class LoadReport:
    """What a load did. ``missing``: model keys the file lacked (left as initialized);
    ``unexpected``: file keys the model has no place for (ignored); ``loaded``: keys copied;
    ``skipped``: file keys left out on purpose (``exclude``, the decoder side of a pretraining
    file loaded into the classifier, a Hugging Face key bias, a fixed positional table equal to
    the model's); ``format``: what the file looks like (``vmae_fast.checkpoint.FORMATS``);
    ``notes``: why keys were skipped or converted, one line each."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    format: str = ""
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"LoadReport(format={self.format!r}, loaded={len(self.loaded)}, missing={self.missing}, "
                f"unexpected={self.unexpected}, skipped={self.skipped})")


# A checkpoint filter maps a file's (unwrapped, prefix-stripped) keys onto one model's layout:
# ``fn(state_dict, model) -> (adapted state dict, keys skipped on purpose)``. Each model keeps its
# own beside it (``checkpoint_filter_fn`` in pretrain.py / classifier.py), as timm does.
CheckpointFilter = Callable[[dict, nn.Module], "tuple[dict[str, torch.Tensor], list[str]]"]


class OfficialCheckpointMixin:
    """``official_state_dict()`` and ``load_official_state_dict()`` for a model whose module
    names are the official ones. A model sets ``checkpoint_filter`` (its module's
    ``checkpoint_filter_fn``, as a staticmethod) and ``backbone_prefixes`` (the key prefixes of
    its encoder's patch embedding and blocks)."""

    checkpoint_filter: CheckpointFilter
    backbone_prefixes: tuple[str, ...] = ()
    # A load that fills less than this share of the backbone's tensors is refused: the file is
    # for another model (or another format), not a partial load.
    min_backbone_fraction: float = 0.5

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights under the official key names (detached, same device)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_official_state_dict(self, state_dict: Mapping[str, Any], strict: bool = False,
                                 exclude: Sequence[str] = ()) -> LoadReport:
        """Load official weights (a file's dict or its ``model``/``module``/``state_dict`` entry).

        A Hugging Face transformers VideoMAE state dict (``VideoMAEForPreTraining``,
        ``VideoMAEForVideoClassification`` or ``VideoMAEModel``) is converted to the official keys
        first (``vmae_fast.hf_keys.convert_hf_state_dict``; its LayerNorm eps differences are not
        weights: see ``vmae_fast.hf``). Keys starting with any prefix in ``exclude`` are skipped
        (e.g. ``("head.",)`` to keep a fresh head of another class count). A positional table in
        the file where the model's is a fixed (non-persistent) table is skipped when it equals
        the model's, and refused otherwise. Raises ``ValueError``, loading nothing, when: a shape
        mismatches (every offending key named); fewer than ``min_backbone_fraction`` of the
        backbone's tensors (patch embedding and blocks) would load, naming the format the file
        looks like; ``strict=True`` and keys are missing or unexpected.
        """
        sd = unwrap_state_dict(state_dict)
        fmt = guess_format(sd)
        name = type(self).__name__
        exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        file_keys = list(sd)
        notes: list[str] = []
        converted_away: list[str] = []
        if fmt == "hf-videomae":
            conv = convert_hf_state_dict(sd)
            sd = conv.state_dict
            converted_away = sorted(conv.dropped)
            notes += [f"{k}: {why}" for k, why in sorted(conv.dropped.items())]
            notes.append(f"converted from Hugging Face transformers VideoMAE keys ({conv.kind}, "
                         f"q/v bias layout {conv.layout!r})")
        sd, dropped = self.checkpoint_filter(sd, self)
        own = self.state_dict()
        fixed = {k: b for k, b in self.named_buffers() if k not in own}
        report = LoadReport(skipped=sorted(dropped) + converted_away, format=fmt, notes=notes)
        to_load, mismatched = {}, []
        for k, v in sd.items():
            if k.startswith(exclude):
                report.skipped.append(k)
            elif k in fixed:
                _check_fixed_table(k, v, fixed[k], name)
                report.skipped.append(k)
                report.notes.append(f"{k}: equals the model's fixed table (not a parameter here)")
            elif k not in own:
                report.unexpected.append(k)
            elif tuple(v.shape) != tuple(own[k].shape):
                mismatched.append(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}")
            else:
                to_load[k] = v
        if mismatched:
            raise ShapeMismatch("checkpoint shapes do not match the model (wrong arch, num_frames, img_size "
                                "or num_classes? pass exclude=('head.',) to keep a fresh head): "
                                + "; ".join(mismatched), mismatched)
        backbone = [k for k in own if k.startswith(self.backbone_prefixes) and not k.startswith(exclude)]
        got = sum(k in to_load for k in backbone)
        if backbone and got < self.min_backbone_fraction * len(backbone):
            raise ValueError(
                f"the checkpoint does not fit {name}: {got} of its {len(backbone)} backbone tensors "
                f"({', '.join(p + '*' for p in self.backbone_prefixes)}) would load, fewer than the "
                f"{self.min_backbone_fraction:.0%} required. The state dict looks like {FORMATS[fmt]} "
                f"({describe_keys(file_keys)}), while this model's backbone keys are like "
                f"{sorted(backbone)[0]!r}")
        report.missing = sorted(k for k in own if k not in to_load and not k.startswith(exclude))
        report.unexpected.sort()
        if strict and (report.missing or report.unexpected):
            raise ValueError(f"strict load failed: missing {report.missing}, unexpected {report.unexpected}")
        with torch.no_grad():
            for k, v in to_load.items():
                own[k].copy_(v)
        report.loaded = sorted(to_load)
        return report

    def needs_official_adapter(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether ``state_dict`` is not this model's own ``state_dict()`` layout but one that
        ``load_official_state_dict`` adapts: a wrapper (``model``/``module``/``state_dict``) or
        a stripped prefix, Hugging Face keys, or keys this model's ``checkpoint_filter`` maps."""
        if not isinstance(state_dict, Mapping):
            return False
        try:
            sd = unwrap_state_dict(state_dict)
        except ValueError:
            return False
        if sd.keys() != state_dict.keys():
            return True
        if guess_format(sd) == "hf-videomae":
            return True
        adapted, skipped = self.checkpoint_filter(sd, self)
        return bool(skipped) or adapted.keys() != sd.keys()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, unchanged for this model's own keys. A state dict in
        another layout that ``load_official_state_dict`` adapts (``needs_official_adapter``: an
        official file's wrapper, a pretraining file into the classifier, Hugging Face keys, ...)
        goes through it instead, so ``timm.create_model(..., checkpoint_path=FILE)`` loads
        official files; returns ``(missing_keys, unexpected_keys)`` as torch does, and with
        ``strict=True`` raises ``ValueError`` on either."""
        if self.needs_official_adapter(state_dict):
            if assign:
                raise ValueError("assign=True is not supported for state dicts that need adapting; "
                                 "use load_official_state_dict on a materialized model")
            report = self.load_official_state_dict(state_dict, strict=strict)
            return _IncompatibleKeys(report.missing, report.unexpected)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _check_fixed_table(key: str, value: torch.Tensor, table: torch.Tensor, model_name: str) -> None:
    """A file's positional table where the model's is fixed: it must be that table."""
    v = value.unsqueeze(0) if value.dim() == table.dim() - 1 else value  # (N, D) saved without the batch axis
    if tuple(v.shape) != tuple(table.shape):
        raise ValueError(f"{key}: the file's positional table has shape {tuple(value.shape)}, {model_name}'s fixed "
                         f"table {tuple(table.shape)} (a class-token row, or another num_frames/img_size?)")
    if not torch.allclose(v.to(table.device, torch.float64), table.double(), rtol=0, atol=1e-5):
        raise ValueError(f"{key}: the file's positional table is not the fixed sin-cos table this {model_name} "
                         f"uses: build the model with learnable_pos_embed=True to load it")
