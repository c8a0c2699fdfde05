"""What each fused op is timed on: the pretraining shapes, one input set, and per op a setup
function that gives its reference, its fused entry point, its native CPU op and the fewest bytes
it must move (``OpCase``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from vmae_fast import ops
from vmae_fast.config import VideoMAEConfig, config_for
from vmae_fast.masking import DualMask


@dataclass
class Shape:
    name: str
    arch: str
    batch: int


def shapes(device: torch.device, batch: int | None) -> list[Shape]:
    gpu = device.type == "cuda"
    return [Shape("ViT-B 16x224 dual 0.9/0.5", "vit_base_patch16_224", batch or (32 if gpu else 2)),
            Shape("ViT-g 16x224 dual 0.9/0.5", "vit_giant_patch14_224", batch or (8 if gpu else 1))]


@dataclass
class KernelInputs:
    """One input set at one shape: a 16x224 float clip, its dual masks (0.9 / 0.5), the visible
    tokens ``z`` and the decoder's positional table and mask token (activation dtype), the
    decoder's predictions ``pred`` and the loss weights."""

    cfg: VideoMAEConfig
    video: torch.Tensor
    masks: DualMask
    z: torch.Tensor
    pos: torch.Tensor
    mask_token: torch.Tensor
    pred: torch.Tensor
    weight: torch.Tensor


def make_inputs(shape: Shape, device, act_dtype, seed) -> KernelInputs:
    cfg = config_for(shape.arch, num_frames=16, img_size=224)
    g = torch.Generator().manual_seed(seed)
    B = shape.batch
    video = torch.randn(B, 3, 16, 224, 224, generator=g).to(device)
    m = DualMask.sample(B, cfg.grid, 0.9, 0.5, generator=g).to(device)
    nv, nd, D, P = m.n_visible, m.n_decoder, cfg.decoder_embed_dim, cfg.cube_numel
    z = torch.randn(B, nv, D, generator=g).to(device, act_dtype)
    pos = torch.randn(cfg.num_tokens, D, generator=g).to(device)
    tok = torch.randn(1, 1, D, generator=g).to(device)
    pred = torch.randn(B, nd, P, generator=g).to(device, act_dtype)
    return KernelInputs(cfg=cfg, video=video, masks=m, z=z, pos=pos, mask_token=tok, pred=pred,
                        weight=m.loss_weight())


@dataclass
class OpCase:
    """One op on one input set. ``ref``/``fused``: calls of the reference and of the public op
    (the dispatch); ``native``: the name of the native CPU op, ``native_call(f)`` calls it;
    ``bytes``: the fewest bytes the op must move (every input read once, every output written
    once); ``shape``: what it maps, for the table."""

    ref: Callable[[], Any]
    fused: Callable[[], Any]
    native: str
    native_call: Callable[[Callable], Any]
    bytes: int
    shape: str


def _index_bytes(x: KernelInputs, n: int) -> int:
    return x.masks.batch_size * n * 8  # int64 indices


def gather_cubes_case(x: KernelInputs) -> OpCase:
    cfg, video, m = x.cfg, x.video, x.masks
    t, p, P = cfg.tubelet_size, cfg.patch_size, cfg.cube_numel
    B, nv = m.batch_size, m.n_visible
    return OpCase(
        ref=lambda: ops.gather_cubes_ref(video, m.visible_idx, tubelet=t, patch=p, layout="cthw"),
        fused=lambda: ops.gather_cubes(video, m.visible_idx, tubelet=t, patch=p, layout="cthw"),
        native="gather_cubes_cpu", native_call=lambda f: f(video, m.visible_idx, t, p, False),
        bytes=B * nv * P * video.element_size() * 2 + _index_bytes(x, nv),
        shape=f"video {tuple(video.shape)} -> ({B}, {nv}, {P})")


def decoder_input_case(x: KernelInputs) -> OpCase:
    m, z, pos, tok = x.masks, x.z, x.pos, x.mask_token
    B, nv, nd = m.batch_size, m.n_visible, m.n_decoder
    D, N = z.shape[-1], x.cfg.num_tokens
    out_es = torch.promote_types(z.dtype, pos.dtype).itemsize
    return OpCase(
        ref=lambda: ops.decoder_input_ref(z, pos, tok, m.visible_idx, m.decoder_idx),
        fused=lambda: ops.decoder_input(z, pos, tok, m.visible_idx, m.decoder_idx),
        native="decoder_input_fwd_cpu",
        native_call=lambda f: f(z, pos, tok.reshape(-1), m.visible_idx, m.decoder_idx),
        bytes=z.numel() * z.element_size() + N * D * pos.element_size() + _index_bytes(x, nv + nd)
        + B * (nv + nd) * D * out_es,
        shape=f"z {tuple(z.shape)}, pos ({N}, {D}) -> ({B}, {nv + nd}, {D})")


def masked_mse_loss_case(x: KernelInputs) -> OpCase:
    cfg, video, m, pred, w = x.cfg, x.video, x.masks, x.pred, x.weight
    t, p, P = cfg.tubelet_size, cfg.patch_size, cfg.cube_numel
    B, nd = m.batch_size, m.n_decoder
    return OpCase(
        ref=lambda: ops.masked_mse_loss_ref(pred, video, m.decoder_idx, w, tubelet=t, patch=p),
        fused=lambda: ops.masked_mse_loss(pred, video, m.decoder_idx, w, tubelet=t, patch=p),
        native="masked_mse_fwd_cpu", native_call=lambda f: f(pred, video, m.decoder_idx, w, t, p, True, 1e-6),
        bytes=pred.numel() * pred.element_size() + B * nd * P * video.element_size() + _index_bytes(x, nd) + B * nd * 4,
        shape=f"pred {tuple(pred.shape)}, video {tuple(video.shape)} -> ()")


# the ops timed, in the table's order
CASES: dict[str, Callable[[KernelInputs], OpCase]] = {
    "gather_cubes": gather_cubes_case,
    "decoder_input": decoder_input_case,
    "masked_mse_loss": masked_mse_loss_case,
}


def op_cases(x: KernelInputs) -> dict[str, OpCase]:
    """Every op's case on one input set."""
    return {name: setup(x) for name, setup in CASES.items()}
