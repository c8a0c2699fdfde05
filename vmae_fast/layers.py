"""Transformer building blocks with the official parameter names (docs/semantics.md §4 and §7)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attention, effective_backend

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
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """``qkv`` Linear without bias plus ``q_bias``/``v_bias`` (k bias is zero), ``proj``.

    Shapes: ``(B, N, D) -> (B, N, D)``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = effective_backend(backend)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        out = attention(qkv.view(B, N, 3, self.num_heads, self.head_dim), self.backend, self.scale)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, optional layer scale
    (``gamma_1``/``gamma_2``) and drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool = True,
                 drop_path: float = 0.0, init_values: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden)
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
    """A stack of blocks whose first ``checkpointed`` run under non-reentrant activation
    checkpointing (recomputed in backward; RNG state is restored so drop path matches)."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self.checkpointed = 0

    def set_grad_checkpointing(self, enable: bool | int = True) -> None:
        if isinstance(enable, bool):
            self.checkpointed = len(self) if enable else 0
        elif isinstance(enable, int) and enable >= 0:
            self.checkpointed = min(enable, len(self))
        else:
            raise ValueError(f"grad checkpointing takes a bool or a block count >= 0, got {enable!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.checkpointed if torch.is_grad_enabled() else 0
        for i, blk in enumerate(self):
            x = checkpoint(blk, x, use_reentrant=False) if i < ckpt else blk(x)
        return x


def make_blocks(dim, depth, num_heads, mlp_hidden, qkv_bias, drop_path_rate, init_values, backend) -> Blocks:
    # float32 linspace as the official code, on the CPU even under a meta-device context
    dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
    return Blocks(Block(dim, num_heads, mlp_hidden, qkv_bias, dpr[i], init_values, backend)
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
