"""Transformer building blocks with the official parameter names (docs/semantics.md §4 and §7)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, effective_backend
from .memory import checkpoint_block, parse_policy, policy_label, saved_casts_context, uncached_weight_casts

LN_EPS = 1e-6


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample, drawn as the official code draws it."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    r = (keep + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * r


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc1``, exact GELU, ``fc2``; ``drop`` (official ``drop_rate``): dropout after ``fc2``
    (training only, off by default)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {drop}")
        self.drop = float(drop)

    def forward(self, x):
        x = self.fc2(self.act(self.fc1(x)))
        if self.drop > 0:
            x = F.dropout(x, self.drop, self.training)
        return x


class Attention(nn.Module):
    """``qkv`` Linear without bias plus ``q_bias``/``v_bias`` (k bias is zero), ``proj``.

    Shapes: ``(B, N, D) -> (B, N, D)``.

    Options of the official fine-tuning model, all off by default (the default path is the one
    of docs/semantics.md §4, unchanged):

    - ``qk_scale``: softmax scale instead of ``head_dim ** -0.5``.
    - ``cos_attn``: cosine attention (the official ``CosAttention``): per head
      ``softmax(exp(min(s, ln 100)) * q_n k_n^T) v`` with ``q_n``, ``k_n`` the L2-normalized
      queries and keys and ``s`` a learnable ``(heads, 1, 1)`` parameter named ``scale`` (the
      official key), initialized to ``ln 10``. It cannot be combined with ``qk_scale``.
    - ``attn_drop``: dropout on the attention probabilities (training only).
    - ``proj_drop``: dropout after ``proj`` (training only).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa", *,
                 qk_scale: float | None = None, cos_attn: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = effective_backend(backend)
        self.cos_attn = bool(cos_attn)
        if qk_scale is not None and (isinstance(qk_scale, bool) or not qk_scale > 0):
            raise ValueError(f"qk_scale must be a positive number or None, got {qk_scale!r}")
        if self.cos_attn:
            if qk_scale is not None:
                raise ValueError("cos_attn learns its own logit scale; it cannot be combined with qk_scale "
                                 "(the official CosAttention fails on that combination too)")
            # DO NOT RENAME: the official key is ``attn.scale`` (and it gets no weight decay)
            self.scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        else:
            self.scale = float(qk_scale) if qk_scale is not None else self.head_dim ** -0.5
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.attn_drop, self.proj_drop = float(attn_drop), float(proj_drop)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            # A persistent-free zero buffer: the k slot of the bias is assembled without
            # allocating zeros every step, and it follows the module's device and dtype.
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, self.k_bias, self.v_bias))

    def logit_scale(self) -> torch.Tensor:
        """Cosine attention's per-head multiplier ``exp(min(scale, ln 100))``, ``(heads, 1, 1)``."""
        return torch.clamp(self.scale, max=COS_ATTN_MAX_LOG_SCALE).exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias()).view(B, N, 3, self.num_heads, self.head_dim)
        scale = self.scale
        if self.cos_attn:
            # q_n * exp(s) @ k_n^T equals the official (q_n @ k_n^T) * exp(s); repacked so that every
            # backend runs it with scale 1
            q, k, v = qkv.unbind(2)
            ls = self.logit_scale().to(q.dtype).view(1, 1, self.num_heads, 1)
            qkv = torch.stack((F.normalize(q, dim=-1) * ls, F.normalize(k, dim=-1), v), dim=2)
            scale = 1.0
        out = attention(qkv, self.backend, scale, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj(out)
        if self.proj_drop > 0:
            out = F.dropout(out, self.proj_drop, self.training)
        return out


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Every ``Attention`` of ``model`` on ``backend`` (``$VMAE_FAST_ATTN`` still overrides it),
    and every module's config (``model.cfg``; the encoder's of a pretraining model) made to say
    ``attn_backend=backend``, as if the model had been built with it: what reads the config (a
    reference or copy built from it, its repr, a saved config) sees the backend the model runs."""
    effective = effective_backend(backend)
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = effective
        cfg = getattr(m, "cfg", None)
        if dataclasses.is_dataclass(cfg) and hasattr(cfg, "attn_backend"):
            m.cfg = dataclasses.replace(cfg, attn_backend=backend)


# torch.log(torch.tensor(1 / 0.01)) rounded as the official code writes it
COS_ATTN_MAX_LOG_SCALE = 4.6052


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, optional layer scale
    (``gamma_1``/``gamma_2``) and drop path. ``qk_scale``, ``cos_attn``, ``attn_drop`` and ``drop``
    (after ``attn.proj`` and ``mlp.fc2``, the official ``drop_rate``) are the official fine-tuning
    options (``Attention``), off by default."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool = True,
                 drop_path: float = 0.0, init_values: float = 0.0, backend: str = "sdpa", *,
                 qk_scale: float | None = None, cos_attn: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, backend, qk_scale=qk_scale, cos_attn=cos_attn,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden, drop)
        if init_values > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class Blocks(nn.ModuleList):
    """A stack of blocks with a memory policy (``set_grad_checkpointing``; vmae_fast/memory.py):
    the first ``checkpointed`` blocks run under non-reentrant activation checkpointing, fully
    (``mode == "full"``) or selectively (``"selective"``); RNG state is restored for the
    recomputation, so drop path and dropout draw what the forward drew."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self.checkpointed = 0
        self.mode = "none"

    def set_grad_checkpointing(self, enable: bool | int | str = True) -> None:
        """``False``, ``True``, ``n`` (the first ``n`` blocks) or ``"selective"`` (every block, keeping
        matmul and attention outputs); loss and gradients are the same under every policy."""
        self.checkpointed, self.mode = parse_policy(enable, len(self))

    @property
    def grad_checkpointing(self) -> bool | int | str:
        """The policy, as ``set_grad_checkpointing`` takes it."""
        return policy_label(self.checkpointed, self.mode, len(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = min(self.checkpointed, len(self)) if torch.is_grad_enabled() else 0
        mode = self.mode if self.mode != "none" else "full"  # checkpointed > 0 set directly
        blocks = list(self)
        with uncached_weight_casts(x):  # no copy of all weights alive at the end of forward
            for blk in blocks[:ckpt]:
                x = checkpoint_block(blk, x, mode)
            if ckpt < len(blocks):
                with saved_casts_context(x):  # no second copies of autocast's casts (memory.SavedCasts)
                    for blk in blocks[ckpt:]:
                        x = blk(x)
        return x


def make_blocks(dim, depth, num_heads, mlp_hidden, qkv_bias, drop_path_rate, init_values, backend, *,
                qk_scale: float | None = None, cos_attn: bool = False, drop: float = 0.0,
                attn_drop: float = 0.0) -> Blocks:
    # float32 linspace as the official code, on the CPU even under a meta-device context
    dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
    return Blocks(Block(dim, num_heads, mlp_hidden, qkv_bias, dpr[i], init_values, backend, qk_scale=qk_scale,
                        cos_attn=cos_attn, drop=drop, attn_drop=attn_drop)
                  for i in range(depth))


def init_weights_pretrain(m: nn.Module) -> None:
    """Official pretrain init: Linear xavier-uniform with zero bias, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_weights_finetune(m: nn.Module) -> None:
    """Official fine-tune init: Linear trunc-normal(std .02) with zero bias, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
