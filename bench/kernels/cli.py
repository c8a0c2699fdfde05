"""Each fused op against its eager reference, ``torch.compile`` of the reference, and the native
CPU extension, at the shapes of ViT-B and ViT-g pretraining (smaller batches on CPU).

    python -m bench.kernels [--device cpu|cuda] [--batch N] [--repeats N] [--no-compile]

Reports ms (median, min-max), GB/s over the fewest bytes each op must move (every input read
once, every output written once) and that as a % of the measured device copy bandwidth.
Variants that cannot run here (no native build, no compiler, no GPU) are listed with why.

    python -m bench.kernels --compile-only [--targets 80,90] [--jobs N] [--out FILE]

compiles, without a GPU, every kernel variant the launchers make at the ViT-B/ViT-g pretraining
shapes for sm_80 (A100) and sm_90 (H100), and reports per variant registers, spill bytes, shared
memory, the occupancy they allow and approximate fp32 divisions in the PTX (JSON: --out, default
bench/results/kernels_compile.json).
"""
from __future__ import annotations

import os

import torch

from vmae_fast.device import select_device
from vmae_fast.errors import check_at_least

from ..common.cli import add_arch_arg, add_device_arg, add_output_args, check_timing_counts, make_parser, parse_plan
from ..common.paths import results_help
from .aot_capture import AOT_ARCHS
from .aot_compile import AOT_TARGETS
from .aot_report import AOT_DEFAULT_NAME, run_compile_only
from .timing import run_timed


def _parser():
    ap = make_parser("kernels", __doc__)
    add_device_arg(ap)
    ap.add_argument("--batch", type=int, help="clips (default: 32 / 8 on GPU, 2 / 1 on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, help="default 50 on GPU, 10 on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    ap.add_argument("--only", help="comma list of ops")
    add_arch_arg(ap, "the pretraining shapes of", "both", only=[name for _, name in AOT_ARCHS], extra=["both"])
    add_output_args(ap, "kernels-<device>-<date>",
                    out_help=f"results folder (default: {results_help()}); with --compile-only the JSON "
                         f"file (default: {AOT_DEFAULT_NAME} in that folder)")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile every kernel variant for --targets without a GPU and report "
                         "registers, spills, shared memory, occupancy; runs nothing")
    ap.add_argument("--targets", default=",".join(map(str, AOT_TARGETS)),
                    help="--compile-only: compute capabilities (default 80,90 = A100, H100)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="--compile-only: parallel compiler processes (default: CPU count)")
    return ap


def plan(ns) -> torch.device | None:
    """The device to measure on (None with --compile-only, which runs nothing on any device and
    leaves CUDA uninitialized); bad values raise ``ValueError``."""
    check_at_least(ns, {"batch": 1})
    check_timing_counts(ns)
    if ns.compile_only:
        check_at_least(ns, {"jobs": 1})
        return None
    return select_device(ns.device)  # cuda:N also becomes the current device


def main(argv: list[str] | None = None) -> dict:
    """The command line's run; returns the result it saved (JSON-able dict)."""
    ns, dev = parse_plan(_parser(), argv, plan)
    if ns.compile_only:
        return run_compile_only(ns)
    return run_timed(ns, dev, argv)
