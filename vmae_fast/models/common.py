"""Pieces shared by the pretrain model and the classifier: cube embedding and positions."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import VideoMAEConfig
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
