"""The plan of the GPU check: its parts in order, each with the share of the 8-minute slot that
stops it, and the sizes every part runs at (full on a GPU, toy with ``--dry-run``)."""
from __future__ import annotations

from dataclasses import dataclass

# The bound: every GPU claim proved or disproved within 8 minutes on one H100.
BUDGET_S = 480.0
# Python, torch, the CUDA context and the device description before the first part starts
# (assumed; the JSON records what it took).
STARTUP_S = 20.0


@dataclass(frozen=True)
class Part:
    """One part: ``name`` (its key in the JSON and for ``--parts``), what it runs, and
    ``share_s``, the seconds after which it is stopped (the rest of the plan still runs)."""

    name: str
    what: str
    share_s: float


# The parts that judge a goal come first, the goals' row first of all: a slot cut short (or a
# command killed at its limit) keeps the numbers that matter most (the JSON is written after
# every part).
PLAN: tuple[Part, ...] = (
    Part("dual_masking_vit_b", "bench.dual_masking preset gpu, its ViT-B 16x224 b32 setup (the goals' row): "
                               "clips/s, MFU, memory; vmae_fast against reference; dual against encoder-only", 90),
    Part("kernels", "bench.kernels: fused ops against eager references, GB/s against the measured copy "
                    "bandwidth and the datasheet HBM bandwidth", 40),
    Part("memory_count", "the exact count (vmae_fast's memory count) of one ViT-B b32 bf16 train step against "
                         "torch.cuda.max_memory_allocated of the same step", 25),
    Part("cuda_tests", "pytest -m 'gpu and not interpret' in a subprocess (killed when its share is spent)", 90),
    Part("pretrain", "20 bf16 steps of train.pretrain (ViT-B 16x224) on synthetic videos from "
                     "train.make_synthetic, through its command line", 60),
    Part("dual_masking_vit_g", "bench.dual_masking preset gpu, its ViT-g 16x224 b8 checkpointed setup, "
                               "encoder-only and dual 0.5 (the paper's Table 2 rows)", 80),
    Part("attention", "bench.attention at ViT-B's encoder and decoder shapes: SDPA kernels, flash-attn and "
                      "xformers rows where installed", 20),
    Part("torchcodec_cuda", "torchcodec decoding of an H.264 clip on the GPU against the CPU", 15),
)
PARTS = {p.name: p for p in PLAN}

# What each part runs: full on the GPU, toy on the CPU for --dry-run. Few repeats: the slot is
# short, and a median of 5 steps already separates a 2x from a 1.5x.
DUAL_MASKING = {"warmup": 2, "repeats": 5}
DUAL_MASKING_VIT_G_MASKINGS = (0.0, 0.5)
KERNELS = {"warmup": 3, "repeats": 20}
ATTENTION = {"warmup": 3, "repeats": 10, "batch": 32}
# 72 training videos: 9 steps an epoch, so the loader's workers start 3 times, not 10
PRETRAIN = {"steps": 20, "batch": 8, "num_sample": 2, "videos": 96, "frames": 40, "height": 64, "width": 80}
TORCHCODEC_FRAMES = 100  # 4 s at 25 fps, 340x256

DRY = {
    "dual_masking": {"warmup": 0, "repeats": 1},
    "kernels": {"warmup": 0, "repeats": 1, "batch": 1},
    "attention": {"warmup": 0, "repeats": 1},
    "pretrain": {"steps": 20, "batch": 2, "num_sample": 1, "videos": 6, "frames": 12, "height": 32, "width": 40},
    "torchcodec_frames": 10,
}
