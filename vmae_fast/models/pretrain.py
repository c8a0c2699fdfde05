"""VideoMAE V2 pretraining model: encoder on visible cubes, decoder on running-cell cubes.

Computes the official function (docs/semantics.md §4-§5) with index gathers instead of boolean
indexing, the patch embedding on visible cubes only, and targets for decoder rows only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import ops
from ..checkpoint import DECODER_SIDE
from ..config import VideoMAEConfig
from ..layers import LN_EPS, init_weights_pretrain, make_blocks
from ..masking import DualMask
from .common import CubeEmbed, OfficialCheckpointMixin, as_embed_dtype, check_video_shape, make_pos_embed


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module
                         ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a file's (unwrapped, prefix-stripped) keys onto ``VideoMAEv2Pretrain`` (docs/semantics.md
    §7.3). Official pretraining files already use our keys; an encoder-only file saved without the
    ``encoder.`` prefix (``blocks.*``, ``patch_embed.*``) gets it. Returns the adapted dict and
    the keys skipped on purpose (none here)."""
    if not any(k.startswith("encoder.") for k in state_dict) \
            and any(k.startswith(("blocks.", "patch_embed.")) for k in state_dict):
        state_dict = {(k if k.startswith(DECODER_SIDE) else "encoder." + k): v for k, v in state_dict.items()}
    return state_dict, []


@dataclass
class PretrainOutput:
    """``loss``: float32 scalar. ``pred``: ``(B, n_decoder, C*t*p*p)`` in ``(t, h, w, c)`` order."""

    loss: torch.Tensor
    pred: torch.Tensor


class PretrainEncoder(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = CubeEmbed(cfg)
        make_pos_embed(self, "pos_embed", cfg.num_tokens, cfg.embed_dim, cfg.learnable_pos_embed)
        self.blocks = make_blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg.qkv_bias,
                                  cfg.drop_path_rate, cfg.init_values, cfg.attn_backend)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)

    def forward(self, video: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)``, ``(B, n_vis)`` -> ``(B, n_vis, D)``."""
        cubes = ops.gather_cubes(video, visible_idx, tubelet=self.cfg.tubelet_size,
                                 patch=self.cfg.patch_size, layout="cthw")
        x = self.patch_embed.embed_cubes(as_embed_dtype(cubes, video, self.patch_embed.proj.weight))
        # The table is cast to the embedding's dtype first, as the official ``type_as(x)``: under
        # autocast the encoder's residual stream stays in bf16/fp16.
        x = x + self.pos_embed[0].to(x.dtype)[visible_idx]
        return self.norm(self.blocks(x))


class PretrainDecoder(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        self.blocks = make_blocks(cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads,
                                  cfg.decoder_mlp_hidden, cfg.qkv_bias, cfg.drop_path_rate,
                                  cfg.init_values, cfg.attn_backend)
        self.norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=LN_EPS)
        self.head = nn.Linear(cfg.decoder_embed_dim, cfg.cube_numel)

    def forward(self, x: torch.Tensor, n_return: int) -> torch.Tensor:
        """``(B, n_vis + n_dec, D_dec)`` -> predictions of the last ``n_return`` rows."""
        if n_return <= 0:  # x[:, -0:] would silently be every row
            raise ValueError(f"the decoder must reconstruct at least one token, got n_return={n_return}")
        x = self.blocks(x)
        return self.head(self.norm(x[:, -n_return:]))


class VideoMAEv2Pretrain(OfficialCheckpointMixin, nn.Module):
    """Dual-masking masked video autoencoder.

    ``forward(video, masks)``: ``video`` ``(B, C, T, H, W)`` normalized float or uint8 clip,
    ``masks`` a ``DualMask``; returns ``PretrainOutput(loss, pred)``.
    Parameter names are the official checkpoint keys; ``official_state_dict()`` /
    ``load_official_state_dict()`` come from ``OfficialCheckpointMixin``.
    """

    checkpoint_filter = staticmethod(checkpoint_filter_fn)
    backbone_prefixes = ("encoder.patch_embed.", "encoder.blocks.", "encoder.pos_embed")

    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        if cfg.in_chans != 3:
            raise ValueError(f"pretraining needs RGB clips (in_chans=3): the target is un-normalized with "
                             f"the 3-channel ImageNet mean/std; got in_chans={cfg.in_chans}")
        self.cfg = cfg
        self.encoder = PretrainEncoder(cfg)
        self.encoder_to_decoder = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        make_pos_embed(self, "pos_embed", cfg.num_tokens, cfg.decoder_embed_dim, cfg.learnable_pos_embed)
        self.decoder = PretrainDecoder(cfg)
        # The official encoder and decoder each apply the Xavier init to themselves; the top-level
        # model never does, so ``encoder_to_decoder`` keeps nn.Linear's default (kaiming-uniform,
        # a=sqrt(5): U(+-1/sqrt(D_enc))). Reproduced on purpose (docs/semantics.md §6).
        self.encoder.apply(init_weights_pretrain)
        self.decoder.apply(init_weights_pretrain)
        # truncated at +-1 std, as the VideoMAE pretraining code's own trunc_normal_
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.cfg.grid

    def set_grad_checkpointing(self, enable: bool | int | str = True, *, decoder: bool | int | str | None = None
                               ) -> None:
        """The memory policy of the encoder's and the decoder's blocks (vmae_fast/memory.py):
        ``False``, ``True`` (every block checkpointed), ``n`` (the first ``n``) or ``"selective"``
        (every block, keeping matmul and attention outputs); ``decoder``: the decoder's own
        policy (default: ``enable``). Non-reentrant; loss and grads are unchanged."""
        self.encoder.blocks.set_grad_checkpointing(enable)
        self.decoder.blocks.set_grad_checkpointing(enable if decoder is None else decoder)

    def no_weight_decay(self) -> set[str]:
        """Names kept out of weight decay besides the 1-d parameters (timm's ``no_weight_decay``):
        the positional tables (when learnable) and the mask token, as the official recipe."""
        return {"pos_embed", "encoder.pos_embed", "mask_token"}

    def sample_masks(self, batch_size: int, encoder_ratio: float = 0.9, decoder_ratio: float = 0.5,
                     **kw) -> DualMask:
        kw.setdefault("device", self.mask_token.device)
        return DualMask.sample(batch_size, self.grid, encoder_ratio, decoder_ratio, **kw)

    def _check_masks(self, video: torch.Tensor, masks: DualMask) -> None:
        if not isinstance(masks, DualMask):
            raise ValueError(f"masks must be a vmae_fast.DualMask, got {type(masks).__name__}")
        B, N = video.shape[0], self.cfg.num_tokens
        if masks.encoder_masked.shape != (B, N) or masks.visible_idx.shape[0] != B \
                or masks.decoder_idx.shape[0] != B:
            raise ValueError(f"masks are for a batch of shape {tuple(masks.encoder_masked.shape)}, "
                             f"expected (B, N) = ({B}, {N}) for this video and model")
        if masks.device != video.device:
            raise ValueError(f"masks are on {masks.device} but the video is on {video.device}")

    def forward_features(self, video: torch.Tensor, masks: DualMask) -> torch.Tensor:
        """Predictions ``(B, n_decoder, C*t*p*p)``."""
        check_video_shape(video, self.cfg, self.mask_token.dtype)
        self._check_masks(video, masks)
        z = self.encoder_to_decoder(self.encoder(video, masks.visible_idx))
        x = ops.decoder_input(z, self.pos_embed[0], self.mask_token, masks.visible_idx, masks.decoder_idx)
        return self.decoder(x, masks.n_decoder)

    def forward(self, video: torch.Tensor, masks: DualMask) -> PretrainOutput:
        pred = self.forward_features(video, masks)
        loss = ops.masked_mse_loss(pred, video, masks.decoder_idx, masks.loss_weight(),
                                   tubelet=self.cfg.tubelet_size, patch=self.cfg.patch_size,
                                   normalize=self.cfg.normalize_target)
        return PretrainOutput(loss=loss, pred=pred)
