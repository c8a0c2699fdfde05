"""VideoMAE V2 fine-tuning classifier: all tokens, mean pooling, ``fc_norm``, dropout, head; the
timm model interface (``forward_head``, ``reset_classifier``, ``pretrained_cfg``, ...)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import IMAGENET_MEAN, IMAGENET_STD, VideoMAEConfig
from ..layers import LN_EPS, init_weights_finetune, make_blocks
from ..ops._common import normalize_uint8
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
    from ``OfficialCheckpointMixin``.

    Official fine-tuning options, off by default: ``qk_scale``, ``cos_attn`` (cosine attention
    with a learnable per-head logit scale, key ``blocks.{i}.attn.scale``), ``drop_rate`` (dropout
    after the positional embedding, after each ``attn.proj`` and ``mlp.fc2``, as the official
    ``drop_rate``) and ``attn_drop_rate`` (on the attention probabilities).

    timm interface: ``forward_features(video, pool=True)``, ``forward_head(x, pre_logits=False)``,
    ``get_classifier()``, ``reset_classifier(num_classes)``, ``no_weight_decay()``,
    ``pretrained_cfg``, ``num_features``.
    """

    checkpoint_filter = staticmethod(checkpoint_filter_fn)
    backbone_prefixes = ("patch_embed.", "blocks.", "pos_embed")

    def __init__(self, cfg: VideoMAEConfig, num_classes: int, head_drop_rate: float = 0.0,
                 use_mean_pooling: bool = True, head_init_scale: float = 0.001, *,
                 qk_scale: float | None = None, cos_attn: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        self.cos_attn = bool(cos_attn)
        self.drop_rate = float(drop_rate)
        self.patch_embed = CubeEmbed(cfg)
        make_pos_embed(self, "pos_embed", cfg.num_tokens, cfg.embed_dim, cfg.learnable_pos_embed)
        self.blocks = make_blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg.qkv_bias,
                                  cfg.drop_path_rate, cfg.init_values, cfg.attn_backend, qk_scale=qk_scale,
                                  cos_attn=cos_attn, drop=drop_rate, attn_drop=attn_drop_rate)
        self.use_mean_pooling = use_mean_pooling
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS) if use_mean_pooling else None
        self.head_dropout = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights_finetune)
        if num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)
        self.pretrained_cfg = default_pretrained_cfg(cfg, num_classes)

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.cfg.grid

    @property
    def default_cfg(self) -> dict:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    def set_grad_checkpointing(self, enable: bool | int | str = True) -> None:
        """The memory policy of the blocks (vmae_fast/memory.py): ``False``, ``True`` (every block
        checkpointed), ``n`` (the first ``n``) or ``"selective"`` (every block, keeping matmul and
        attention outputs). Non-reentrant; loss and grads are unchanged."""
        self.blocks.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ timm interface
    def no_weight_decay(self) -> set[str]:
        """Parameter names the official fine-tuning recipe keeps out of weight decay besides
        the 1-d ones: the positional table (when learnable) and cosine attention's ``scale``."""
        names = {"pos_embed"}
        names |= {n for n, _ in self.named_parameters() if n.endswith(".attn.scale")}
        return names

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none, ``forward`` returns pooled features), on
        the model's device and dtype, with the official fine-tuning init (trunc-normal std .02,
        zero bias). ``global_pool`` may only name the pooling the model has (``"avg"`` with mean
        pooling, ``"token"`` without): the norms are weights of the checkpoint."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            have = "avg" if self.use_mean_pooling else "token"
            if global_pool != have:
                raise ValueError(f"global_pool={global_pool!r}: this model pools with {have!r} "
                                 f"(use_mean_pooling={self.use_mean_pooling}); it cannot be switched here")
        w = self.patch_embed.proj.weight
        self.num_classes = num_classes
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=w.device, dtype=w.dtype)
            init_weights_finetune(self.head)
        else:
            self.head = nn.Identity()
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def forward_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """Encoder output of every token, ``(B, N, D)``, before pooling and ``fc_norm``."""
        check_video_shape(video, self.cfg, self.patch_embed.proj.weight.dtype)
        if video.dtype == torch.uint8:
            video = as_embed_dtype(normalize_uint8(video), video, self.patch_embed.proj.weight)
        x = self.patch_embed(video)
        x = x + self.pos_embed.to(x.dtype)  # official type_as(x): bf16 stream under autocast
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.blocks(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` tokens -> ``(B, D)``: ``fc_norm(mean)`` with mean pooling, else ``norm`` of
        the first token (official)."""
        if self.fc_norm is not None:
            return self.fc_norm(tokens.mean(1))
        return self.norm(tokens[:, 0])

    def forward_features(self, video: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """Features of the whole (unmasked) clip. ``pool=True``: ``(B, D)``, what the head sees
        (``fc_norm`` of the token mean, or ``norm`` of the first token without mean pooling), the
        official ``forward_features``. ``pool=False``: per-token ``(B, N, D)`` in token order
        (docs/semantics.md §1), after the final ``norm`` where the model has one (without mean
        pooling), raw block outputs with it."""
        x = self.forward_tokens(video)
        return self.pool(x) if pool else self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled ``(B, D)`` features (or ``(B, N, D)`` tokens from ``forward_tokens``, pooled
        here) -> logits; ``pre_logits=True`` returns the pooled features."""
        if x.dim() == 3:
            x = self.pool(x)
        if pre_logits:
            return x
        return self.head(self.head_dropout(x))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(video))


def default_pretrained_cfg(cfg: VideoMAEConfig, num_classes: int) -> dict:
    """timm's ``pretrained_cfg`` of a classifier: input ``(3, img_size, img_size)`` per frame
    (``num_frames`` frames), ImageNet mean/std, the official test protocol's resize (bilinear,
    short side = crop size), ``first_conv``/``classifier`` module names. No weights: ``url``,
    ``file`` and ``hf_hub_id`` are empty."""
    return {
        "url": "", "file": None, "hf_hub_id": None, "architecture": None, "tag": None,
        "num_classes": num_classes, "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size),
        "num_frames": cfg.num_frames, "fixed_input_size": True, "interpolation": "bilinear",
        "crop_pct": 1.0, "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": None,
        "paper_name": "VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking",
        "paper_ids": "arXiv:2303.16727", "origin_url": "https://github.com/OpenGVLab/VideoMAEv2",
    }
