"""VideoMAE V2 fine-tuning classifier: all tokens, mean pooling, ``fc_norm``, dropout, head."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import VideoMAEConfig
from ..layers import LN_EPS, init_weights_finetune, make_blocks
from ..ops._common import imagenet_stats
from .common import CubeEmbed, OfficialCheckpointMixin, as_embed_dtype, check_video_shape, make_pos_embed


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module
                         ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a file's (unwrapped, prefix-stripped) keys onto ``VideoMAEv2Classifier``
    (docs/semantics.md §7.3). Classifier files and encoder-only files without the ``encoder.``
    prefix already use our keys. From a pretraining file (``encoder.*`` keys) the encoder is
    taken, ``encoder.`` dropped; every other key (``decoder.*``, ``encoder_to_decoder.*``,
    ``mask_token``) is returned as skipped."""
    if not any(k.startswith("encoder.") for k in state_dict):
        return state_dict, []
    out, skipped = {}, []
    for k, v in state_dict.items():
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = v
        else:
            skipped.append(k)
    return out, skipped


class VideoMAEv2Classifier(OfficialCheckpointMixin, nn.Module):
    """``forward(video)``: ``(B, C, T, H, W)`` normalized float (or uint8) clip -> ``(B, num_classes)``
    logits. Keys ``patch_embed.proj.*``, ``blocks.{i}.*``, ``fc_norm.*`` (or ``norm.*`` without
    mean pooling), ``head.*``. ``official_state_dict()`` / ``load_official_state_dict()`` come
    from ``OfficialCheckpointMixin``."""

    checkpoint_filter = staticmethod(checkpoint_filter_fn)
    backbone_prefixes = ("patch_embed.", "blocks.", "pos_embed")

    def __init__(self, cfg: VideoMAEConfig, num_classes: int, head_drop_rate: float = 0.0,
                 use_mean_pooling: bool = True, head_init_scale: float = 0.001):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.patch_embed = CubeEmbed(cfg)
        make_pos_embed(self, "pos_embed", cfg.num_tokens, cfg.embed_dim, cfg.learnable_pos_embed)
        self.blocks = make_blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg.qkv_bias,
                                  cfg.drop_path_rate, cfg.init_values, cfg.attn_backend)
        self.use_mean_pooling = use_mean_pooling
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS) if use_mean_pooling else None
        self.head_dropout = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights_finetune)
        if num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.cfg.grid

    def set_grad_checkpointing(self, enable: bool | int = True) -> None:
        self.blocks.set_grad_checkpointing(enable)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, D)``."""
        check_video_shape(video, self.cfg, self.patch_embed.proj.weight.dtype)
        if video.dtype == torch.uint8:
            mean, std = imagenet_stats(video.device)
            norm = (video.float() / 255 - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)
            video = as_embed_dtype(norm, video, self.patch_embed.proj.weight)
        x = self.patch_embed(video)
        x = self.blocks(x + self.pos_embed.to(x.dtype))  # official type_as(x): bf16 stream under autocast
        if self.fc_norm is not None:
            return self.fc_norm(x.mean(1))
        return self.norm(x)[:, 0]

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.forward_features(video)))
