"""The official semantics, restated plainly (docs/semantics.md §1-§5): the oracle of the tests and
the baseline of the benchmarks.

Written the way the official code computes, not the way we do: a Conv3d on the whole clip,
the positional table expanded and cloned per batch, boolean-mask indexing, the qkv bias built
with a fresh ``cat`` of zeros, naive softmax attention, and the normalized target materialized
for every token before the decoder rows are picked. Module names equal the official keys, so
``ReferencePretrain.from_model(model)`` shares weights by ``load_state_dict``.

One deliberate departure: with ``learnable_pos_embed`` the tables here receive gradients, as in
our model (the official code detaches them, so its learnable option never learns).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import IMAGENET_MEAN, IMAGENET_STD, VideoMAEConfig
from .layers import LN_EPS, DropPath
from .pos_embed import sincos_table


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, hidden, qkv_bias, drop_path, init_values):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = RefAttention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = RefMlp(dim, hidden)
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x):
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
            x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x


def _blocks(dim, depth, heads, hidden, cfg: VideoMAEConfig):
    dpr = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, depth)]
    return nn.ModuleList([RefBlock(dim, heads, hidden, cfg.qkv_bias, dpr[i], cfg.init_values)
                          for i in range(depth)])


class RefPatchEmbed(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        t, p = cfg.tubelet_size, cfg.patch_size
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=(t, p, p), stride=(t, p, p))

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def _pos(module: nn.Module, learnable: bool, n: int, d: int) -> None:
    """The positional table: a learnable ``pos_embed`` parameter, or the fixed sin-cos table as
    ``pos_embed_table``, a non-persistent buffer (no state-dict key, as official; it follows the
    module in ``.to()``/``.cuda()``/``.double()``)."""
    table = sincos_table(n, d).unsqueeze(0)
    if learnable:
        module.pos_embed = nn.Parameter(table)
    else:
        module.register_buffer("pos_embed_table", table, persistent=False)


class RefEncoder(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        self.patch_embed = RefPatchEmbed(cfg)
        _pos(self, cfg.learnable_pos_embed, cfg.num_tokens, cfg.embed_dim)
        self.blocks = _blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)

    def pos(self):
        return self.pos_embed if isinstance(getattr(self, "pos_embed", None), nn.Parameter) else self.pos_embed_table

    def forward(self, x, mask):
        x = self.patch_embed(x)
        x = x + self.pos().type_as(x).to(x.device).clone()
        B, _, C = x.shape
        x_vis = x[~mask].reshape(B, -1, C)
        for blk in self.blocks:
            x_vis = blk(x_vis)
        return self.norm(x_vis)


class RefDecoder(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        d = cfg.decoder_embed_dim
        self.blocks = _blocks(d, cfg.decoder_depth, cfg.decoder_num_heads, cfg.decoder_mlp_hidden, cfg)
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, cfg.cube_numel)

    def forward(self, x, return_token_num):
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, -return_token_num:]))


class ReferencePretrain(nn.Module):
    """Official-semantics pretraining model.

    ``forward(video, encoder_masked, decoder_masked) -> (loss, pred)`` with ``(B, N)`` bool
    masks (True = masked); ``decoder_masked=None`` is encoder-only masking.
    """

    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = RefEncoder(cfg)
        self.encoder_to_decoder = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        _pos(self, cfg.learnable_pos_embed, cfg.num_tokens, cfg.decoder_embed_dim)
        self.decoder = RefDecoder(cfg)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ReferencePretrain":
        """A reference with ``model``'s config and weights, on its device and dtype."""
        p = next(model.parameters())
        ref = cls(model.cfg).to(device=p.device, dtype=p.dtype)
        ref.load_state_dict(model.state_dict(), strict=True)
        ref.train(model.training)
        return ref

    def dec_pos(self):
        return self.pos_embed if isinstance(getattr(self, "pos_embed", None), nn.Parameter) else self.pos_embed_table

    def forward_pred(self, x, mask, decode_mask):
        x_vis = self.encoder(x, mask)
        x_vis = self.encoder_to_decoder(x_vis)
        B, N_vis, C = x_vis.shape
        expand_pos_embed = self.dec_pos().expand(B, -1, -1).type_as(x).to(x.device).clone()
        pos_emd_vis = expand_pos_embed[~mask].reshape(B, -1, C)
        pos_emd_mask = expand_pos_embed[~decode_mask].reshape(B, -1, C)
        x_full = torch.cat([x_vis + pos_emd_vis, self.mask_token + pos_emd_mask], dim=1)
        return self.decoder(x_full, pos_emd_mask.shape[1])

    def forward(self, video, encoder_masked, decoder_masked=None):
        cfg = self.cfg
        mask = encoder_masked.bool()
        decode_mask = ~mask if decoder_masked is None else decoder_masked.bool()
        with torch.no_grad():
            mean = torch.as_tensor(IMAGENET_MEAN, device=video.device)[None, :, None, None, None]
            std = torch.as_tensor(IMAGENET_STD, device=video.device)[None, :, None, None, None]
            unnorm = video * std + mean
            t, p = cfg.tubelet_size, cfg.patch_size
            if cfg.normalize_target:
                sq = rearrange(unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=t, p1=p, p2=p)
                norm = (sq - sq.mean(dim=-2, keepdim=True)) / (
                    sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
                patches = rearrange(norm, "b n p c -> b n (p c)")
            else:
                patches = rearrange(unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=t, p1=p, p2=p)
            B, _, C = patches.shape
            labels = patches[~decode_mask].reshape(B, -1, C)
        pred = self.forward_pred(video, mask, decode_mask)
        loss = F.mse_loss(pred.float(), labels.float(), reduction="none").mean(dim=-1)
        weight = mask[~decode_mask].reshape(B, -1)
        loss = (loss * weight).sum() / weight.sum()
        return loss, pred


class ReferenceClassifier(nn.Module):
    """Official-semantics fine-tuning classifier (mean pooling, ``fc_norm``, head)."""

    def __init__(self, cfg: VideoMAEConfig, num_classes: int, use_mean_pooling: bool = True):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = RefPatchEmbed(cfg)
        _pos(self, cfg.learnable_pos_embed, cfg.num_tokens, cfg.embed_dim)
        self.blocks = _blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg)
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS) if use_mean_pooling else None
        self.head = nn.Linear(cfg.embed_dim, num_classes)

    @classmethod
    def from_model(cls, model) -> "ReferenceClassifier":
        p = next(model.parameters())
        ref = cls(model.cfg, model.num_classes, model.use_mean_pooling).to(device=p.device, dtype=p.dtype)
        ref.load_state_dict(model.state_dict(), strict=True)
        ref.train(model.training)
        return ref

    def forward(self, x):
        x = self.patch_embed(x)
        B = x.shape[0]
        pos = self.pos_embed if hasattr(self, "pos_embed") and isinstance(self.pos_embed, nn.Parameter) \
            else self.pos_embed_table
        x = x + pos.expand(B, -1, -1).type_as(x).to(x.device).clone()
        for blk in self.blocks:
            x = blk(x)
        x = self.fc_norm(x.mean(1)) if self.fc_norm is not None else self.norm(x)[:, 0]
        return self.head(x)
