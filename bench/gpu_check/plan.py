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


PLAN: tuple[Part, ...] = (
    Part("cuda_tests", "pytest -m 'gpu and not interpret' in a subprocess (killed when its share is spent)", 90),
    Part("kernels", "bench.kernels: fused ops against eager references, GB/s against the measured copy "
                    "bandwidth and the datasheet HBM bandwidth", 40),
    Part("dual_masking_vit_b", "bench.dual_masking preset gpu, its ViT-B 16x224 b32 setup (the goals' row): "
                               "clips/s, MFU, memory; vmae_fast against reference; dual against encoder-only", 90),
    Part("dual_masking_vit_g", "bench.dual_masking preset gpu, its ViT-g 16x224 b8 checkpointed setup, "
                               "encoder-only and dual 0.5 (the paper's Table 2 rows)", 80),
    Part("memory_count", "vmae_fast.memory's exact count of one ViT-B b32 bf16 train step against "
                         "torch.cuda.max_memory_allocated of the same step", 25),
    Part("pretrain", "20 bf16 steps of train.pretrain (ViT-B 16x224) on synthetic videos from "
                     "train.make_synthetic, through its command line", 60),
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
PRETRAIN = {"steps": 20, "batch": 8, "num_sample": 2, "videos": 24, "frames": 40, "height": 64, "width": 80}
TORCHCODEC_SECONDS = 4.0  # a 4 s 25 fps clip

DRY = {
    "dual_masking": {"warmup": 0, "repeats": 1},
    "kernels": {"warmup": 0, "repeats": 1, "batch": 1},
    "attention": {"warmup": 0, "repeats": 1},
    "pretrain": {"steps": 20, "batch": 2, "num_sample": 1, "videos": 6, "frames": 12, "height": 32, "width": 40},
    "torchcodec_seconds": 0.4,
}
