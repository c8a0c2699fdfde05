"""Analytic FLOP counting: forward multiply-accumulates per clip (SPEC section 6).

``convention="official"`` counts what the official code computes, as fvcore counts it (the
paper's Table 2): the patch embedding on all ``N`` tokens, every Linear and attention matmul,
and LayerNorm at 5 per element (fvcore's estimate; softmax, GELU, adds are not counted).
``convention="vmae_fast"`` counts what our forward pass computes: the same, but the patch
embedding only on encoder-visible cubes.
"""
from __future__ import annotations

from .config import VideoMAEConfig, config_for
from .masking import num_encoder_masked, running_cell_patterns

CONVENTIONS = ("official", "vmae_fast")
LN_MACS_PER_ELEMENT = 5


def _blocks(n_tokens: int, dim: int, hidden: int, depth: int) -> dict[str, int]:
    linear = n_tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)
    attn = 2 * n_tokens * n_tokens * dim  # q @ k^T and attn @ v over all heads
    norm = 2 * n_tokens * dim * LN_MACS_PER_ELEMENT
    return {"linear": depth * linear, "attn": depth * attn, "norm": depth * norm}


def count_macs(cfg: VideoMAEConfig, encoder_ratio: float = 0.9, decoder_ratio: float = 0.5,
               convention: str = "official", encoder_mask_type: str = "tube") -> dict[str, int]:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    n = cfg.num_tokens
    n_masked = num_encoder_masked(cfg.grid, encoder_ratio, encoder_mask_type)
    n_vis = n - n_masked
    if decoder_ratio == 0:
        n_dec = n_masked
    else:
        n_dec = int((~running_cell_patterns(cfg.grid, float(decoder_ratio))[0]).sum())  # checks the grid too
    D, Dd, P = cfg.embed_dim, cfg.decoder_embed_dim, cfg.cube_numel
    enc = _blocks(n_vis, D, cfg.mlp_hidden, cfg.depth)
    dec = _blocks(n_vis + n_dec, Dd, cfg.decoder_mlp_hidden, cfg.decoder_depth)
    embedded = n if convention == "official" else n_vis
    parts = {
        "patch_embed": embedded * P * D,
        "encoder_linear": enc["linear"],
        "encoder_attn": enc["attn"],
        "encoder_norm": enc["norm"] + n_vis * D * LN_MACS_PER_ELEMENT,
        "encoder_to_decoder": n_vis * D * Dd,
        "decoder_linear": dec["linear"],
        "decoder_attn": dec["attn"],
        "decoder_norm": dec["norm"] + n_dec * Dd * LN_MACS_PER_ELEMENT,
        "head": n_dec * Dd * P,
    }
    parts["total"] = sum(parts.values())
    return parts


def pretrain_macs(arch: str, *, num_frames: int = 16, img_size: int = 224, encoder_ratio: float = 0.9,
                  decoder_ratio: float = 0.5, decoder_depth: int = 4, convention: str = "official",
                  encoder_mask_type: str = "tube", **overrides) -> dict[str, int]:
    """Forward MACs per clip of pretraining ``arch``: ``{'total': ..., 'patch_embed': ..., ...}``.

    ``decoder_ratio=0`` is encoder-only masking (the decoder sees every encoder-masked token).
    """
    cfg = config_for(arch, num_frames=num_frames, img_size=img_size, decoder_depth=decoder_depth, **overrides)
    return count_macs(cfg, encoder_ratio, decoder_ratio, convention, encoder_mask_type)


def encoder_macs(cfg: VideoMAEConfig) -> int:
    """Forward MACs per clip of the fine-tuning encoder on all tokens (no head)."""
    n = cfg.num_tokens
    b = _blocks(n, cfg.embed_dim, cfg.mlp_hidden, cfg.depth)
    return n * cfg.cube_numel * cfg.embed_dim + b["linear"] + b["attn"] + b["norm"]


def format_table(rows: list[tuple[str, dict[str, int]]]) -> str:
    lines = ["| config | total GMACs | patch_embed | encoder | decoder |", "|---|---|---|---|---|"]
    for name, p in rows:
        enc = p["encoder_linear"] + p["encoder_attn"] + p["encoder_norm"]
        dec = p["decoder_linear"] + p["decoder_attn"] + p["decoder_norm"] + p["head"]
        lines.append(f"| {name} | {p['total'] / 1e9:.2f} | {p['patch_embed'] / 1e9:.2f} | "
                     f"{enc / 1e9:.2f} | {dec / 1e9:.2f} |")
    return "\n".join(lines)
