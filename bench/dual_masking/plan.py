"""The presets, and the plan a command line makes of them: setups x maskings x implementations."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch

import vmae_fast
from vmae_fast.config import arch_spec
from vmae_fast.device import select_device
from vmae_fast.errors import flag_of
from vmae_fast.masking import running_cell_patterns

from ..runner import DTYPES, IMPLS, Setup

CPU_IMPLS = ["vmae_fast", "vmae_fast-unfused", "reference"]
@dataclass(frozen=True)
class Preset:
    """A named grid: ``setups`` (each with its decoder ratios), the implementations, and the
    warmup and timed steps per cell."""

    setups: list[tuple[Setup, list[float]]]
    impls: list[str]
    warmup: int
    repeats: int


@dataclass(frozen=True)
class Plan:
    """What one run measures, resolved from a preset and the command line (``plan_from_args``).

    ``preset``: its name; ``device``/``dtype``: where and in what the steps run; ``setups``: each
    setup with its decoder ratios; ``impls``: the implementations; ``smoke``: toy sizes (code
    paths only); ``warmup``/``repeats``: steps per cell; ``max_batch``: search the largest batch
    that fits; ``max_batch_cap``: the search's bound (``None``: unbounded)."""

    preset: str
    device: torch.device
    dtype: torch.dtype
    setups: list[tuple[Setup, list[float]]]
    impls: list[str]
    smoke: bool
    warmup: int
    repeats: int
    max_batch: bool
    max_batch_cap: int | None


PRESETS = {
    # 42-52 s on the 2-core Xeon (wall_s of bench/results/cpu-intel-xeon-2t-2026-11-22*.json): ViT-S on 16x160 clips (8x10x10 = 800 tokens, 80
    # encoder-visible at 0.9, the paper's 16 frames), both maskings, the three implementations.
    # At 8x128 (28 visible tokens) the AdamW step dominates and every row looks alike.
    "cpu": Preset(setups=[(Setup("vit_small_patch16_224", 16, 160, 2), [0.0, 0.5])],
                  impls=CPU_IMPLS, warmup=2, repeats=7),
    "gpu": Preset(setups=[(Setup("vit_base_patch16_224", 16, 224, 32), [0.0, 0.25, 0.5, 0.75]),
                          (Setup("vit_giant_patch14_224", 16, 224, 8, ckpt=True), [0.0, 0.25, 0.5, 0.75])],
                  impls=CPU_IMPLS, warmup=3, repeats=10),
    # The paper's Table 2 rows: ViT-B (decoder 384) with the decoder-ratio ablation, ViT-g
    # (decoder 512, activation checkpointing as the official recipe); 16x224, tube 0.9.
    "table2": Preset(setups=[(Setup("vit_base_patch16_224", 16, 224, 32), [0.0, 0.25, 0.5, 0.75]),
                             (Setup("vit_giant_patch14_224", 16, 224, 8, ckpt=True), [0.0, 0.5])],
                     impls=CPU_IMPLS, warmup=3, repeats=10),
}
SMOKE = {"frames": 4, "batch": 2, "depth": 1, "decoder_depth": 1}
SMOKE_MAX_BATCH_CAP = 4
# The setup options a command line may override, as named in Setup and on the Namespace.
SETUP_OVERRIDES = ("batch", "frames", "img_size", "depth", "decoder_depth")


def parse_maskings(text: str) -> list[float]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok in ("enc", "encoder", "encoder-only", "0", "0.0", "none"):
            out.append(0.0)
            continue
        try:
            r = float(tok)
        except ValueError:
            r = None
        if r not in (0.25, 0.5, 0.75):
            raise ValueError(f"--masking takes 'enc' or a running-cell decoder ratio 0.25, 0.5, 0.75; got {tok!r}")
        out.append(r)
    if not out:
        raise ValueError("--masking is empty")
    return list(dict.fromkeys(out))


def parse_impls(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in IMPLS]
    if bad or not out:
        raise ValueError(f"--impl takes a comma list of {list(IMPLS)}; got {text!r}")
    return list(dict.fromkeys(out))


def smoke_setup(s: Setup) -> Setup:
    """``s`` at toy size: the smallest grid the running-cell masks take (2x2 patches), head
    width 8 with the arch's head counts (a full-width ViT-g block alone is 25M parameters for
    every AdamW step to update)."""
    a = arch_spec(s.arch)
    return Setup(**{**s.__dict__, **SMOKE, "img_size": 2 * a.patch_size, "embed_dim": 8 * a.num_heads,
                    "decoder_embed_dim": 8 * a.decoder_num_heads})


def _check_ranges(ns: argparse.Namespace) -> None:
    for name in (*SETUP_OVERRIDES, "warmup", "repeats", "max_batch_cap"):
        v = getattr(ns, name)
        lo = 0 if name in ("warmup", "decoder_depth") else 1
        if v is not None and v < lo:
            raise ValueError(f"{flag_of(name)} must be >= {lo}, got {v}")
    if not 0.0 <= ns.encoder_ratio < 1.0:
        raise ValueError(f"--encoder-ratio must be in [0, 1), got {ns.encoder_ratio}")


def _setups(ns: argparse.Namespace, preset: Preset, device: torch.device,
            maskings: list[float] | None) -> list[tuple[Setup, list[float]]]:
    """The preset's setups (or one per ``--arch``), at toy size with ``--smoke``, with the
    command line's overrides, once per ``--ckpt`` choice."""
    setups = list(preset.setups)
    if ns.arch:
        default_batch = 2 if device.type == "cpu" else 32
        setups = [(Setup(a, 16, 224, default_batch if "giant" not in a else 8, ckpt="giant" in a
                         and device.type == "cuda"), maskings or [0.0, 0.5]) for a in ns.arch]
    if ns.smoke:
        setups = [(smoke_setup(s), m) for s, m in setups]
    override = {k: getattr(ns, k) for k in SETUP_OVERRIDES if getattr(ns, k) is not None}
    ckpts = {"off": [False], "on": [True], "both": [False, True]}.get(ns.ckpt)
    return [(Setup(**{**s.__dict__, **override, "ckpt": c}), maskings or m)
            for s, m in setups for c in (ckpts or [s.ckpt])]


def _check_masks(setups: list[tuple[Setup, list[float]]], encoder_ratio: float) -> None:
    """Every setup's grid takes its masks (sampled once here, so a bad size fails before a run)."""
    for s, m in setups:
        try:
            cfg = s.config()
            for r in m:
                vmae_fast.DualMask.sample(1, cfg.grid, encoder_ratio, r)
                if r:
                    running_cell_patterns(cfg.grid, r)
        except ValueError as exc:
            raise ValueError(f"setup {s.label()}: {exc}") from None


def _dtype(text: str, device: torch.device) -> torch.dtype:
    dtype = DTYPES[text] if text != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("--dtype fp16 is not supported on CPU; use fp32 or bf16")
    return dtype


def plan_from_args(ns: argparse.Namespace) -> Plan:
    """Resolve presets and overrides into a plan; bad values raise ``ValueError``."""
    device = select_device(ns.device)  # a cuda:N device becomes the current one
    preset = ns.preset if ns.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    base = PRESETS[preset]
    _check_ranges(ns)
    setups = _setups(ns, base, device, parse_maskings(ns.masking) if ns.masking else None)
    _check_masks(setups, ns.encoder_ratio)
    impls = parse_impls(ns.impl) if ns.impl else list(base.impls)
    if ns.compile and "reference+compile" not in impls:
        impls.append("reference+compile")
    smoke = ns.smoke
    # The search needs a bound on CPU, where an out-of-memory kills the process instead of raising.
    cap = ns.max_batch_cap if ns.max_batch_cap is not None else (
        SMOKE_MAX_BATCH_CAP if smoke else (4096 if device.type == "cuda" else None))
    return Plan(preset=preset, device=device, dtype=_dtype(ns.dtype, device), setups=setups, impls=impls,
                smoke=smoke,
                warmup=1 if smoke and ns.warmup is None else (base.warmup if ns.warmup is None else ns.warmup),
                repeats=2 if smoke and ns.repeats is None else (base.repeats if ns.repeats is None else ns.repeats),
                max_batch=ns.max_batch or smoke, max_batch_cap=cap)


def plan_slug(plan: Plan, ns: argparse.Namespace) -> str:
    """The preset's name, or for a customized grid its setups (so that runs of one day don't
    overwrite each other's files)."""
    smoke = "-smoke" if plan.smoke else ""  # a smoke run's files say so in their names
    if not any(getattr(ns, k) is not None for k in ("arch", *SETUP_OVERRIDES, "masking", "impl")):
        return plan.preset + smoke
    labels = sorted({s.label() for s, _ in plan.setups})
    return "custom-" + "_".join(re.sub(r"[^A-Za-z0-9]+", "-", x).strip("-").lower() for x in labels) + smoke
