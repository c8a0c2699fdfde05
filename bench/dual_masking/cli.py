"""Dual masking vs encoder-only masking, and vmae_fast vs the official computation, on this machine.

    python -m bench.dual_masking                      # --preset auto: what fits this machine
    python -m bench.dual_masking --preset table2      # ViT-B and ViT-g at 16x224, as the paper's Table 2
    python -m bench.dual_masking --arch vit_b --batch 8 --frames 16 --img-size 224 --masking enc,0.5
    python -m bench.dual_masking --preset table2 --smoke --device cpu --out /tmp/smoke   # code paths only

Per cell (setup x masking x implementation): parameters, forward GMACs in both conventions
(``vmae_fast.flops``), the FLOPs ``torch.utils.flop_counter`` counts for one forward+backward
(attention by the analytic rule; kernels the counter misses are named), train-step time
(median/min/max/IQR), clips/s, achieved TFLOP/s, MFU (model FLOPs: forward + backward, no
recomputation) and HFU (hardware FLOPs: with the recomputation of activation checkpointing),
peak and per-clip activation memory, optionally the largest batch that fits. Prints Markdown
tables (one in the shape of the paper's Table 2, beside its numbers), writes every raw number to
a JSON file under ``bench/results/`` (installed: ``./bench-results``) and a PNG plot beside it.
``--smoke`` runs a preset's plan at toy sizes, to check its code paths (search, FLOPs, tables,
plot) on any machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..common.cli import add_arch_arg, add_device_arg, add_output_args, make_parser, parse_plan
from ..common.output import result_path, write_json
from ..runner import DTYPES, IMPL_HELP, IMPLS
from .markdown import render
from .plan import PRESETS, plan_from_args, plan_slug
from .run import run


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("dual_masking", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="implementations:\n" + "\n".join(f"  {k}: {v}" for k, v in IMPL_HELP.items()))
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="auto: 'gpu' on a CUDA device, else 'cpu' (default: auto)")
    add_device_arg(p)
    add_arch_arg(p, "model (repeatable; replaces the preset's)", many="append")
    p.add_argument("--batch", type=int, help="clips per step (all setups)")
    p.add_argument("--frames", type=int, help="frames per clip (multiple of the tubelet, 2)")
    p.add_argument("--img-size", type=int, help="frame size in pixels (H = W)")
    p.add_argument("--depth", type=int, help="encoder depth override (for tiny smoke runs)")
    p.add_argument("--decoder-depth", type=int, help="decoder depth (paper: 4)")
    p.add_argument("--masking", help="comma list of decoder masks: enc (encoder-only), 0.25, 0.5, 0.75")
    p.add_argument("--encoder-ratio", type=float, default=0.9, help="tube masking ratio (default 0.9)")
    p.add_argument("--impl", help=f"comma list of implementations: {', '.join(IMPLS)}")
    p.add_argument("--compile", action="store_true", help="add reference+compile to the implementations")
    p.add_argument("--ckpt", choices=["preset", "off", "on", "both"], default="preset",
                   help="activation checkpointing of every block (default: as the preset)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, help="timed steps per cell")
    p.add_argument("--no-optimizer", action="store_true", help="time forward+backward only (no AdamW step)")
    p.add_argument("--max-batch", action="store_true",
                   help="find the largest batch that fits (doubling, then bisection; on CPU only with --max-batch-cap)")
    p.add_argument("--max-batch-cap", type=int,
                   help="largest batch --max-batch tries (default 4096 on GPU; on CPU the search runs "
                        "only with a cap, since an out-of-memory there kills the process)")
    p.add_argument("--smoke", action="store_true",
                   help="the preset's plan at toy sizes, to check its code paths (not its numbers): per setup "
                        "depth 1, decoder depth 1, head width 8, 4 frames, a 2x2 patch grid, batch 2; 1 warm-up, "
                        "2 repeats, --max-batch up to 4, a small matmul ceiling; explicit overrides still apply")
    p.add_argument("--interleave", dest="interleave", action="store_true", default=None,
                   help="time the implementations of a cell round-robin, all alive at once "
                        "(default on CPU, where other load would otherwise fall on one row)")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="one implementation at a time, alone in memory (default on GPU)")
    p.add_argument("--no-flops", action="store_true", help="skip torch.utils.flop_counter")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p, "<preset or custom-setups>-<device>-<date>")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _plot(result: dict, png: Path) -> str | None:
    """The PNG beside the JSON; none (and why, on stderr) without matplotlib."""
    try:
        from ..plot import plot_dual_masking

        png.parent.mkdir(parents=True, exist_ok=True)
        plot_dual_masking(result, png)  # imports matplotlib
    except ImportError as exc:
        print(f"no plot: {exc} (pip install 'vmae-fast[bench]')", file=sys.stderr)
        return None
    return str(png)


def main(argv: list[str] | None = None) -> dict:
    ns, plan = parse_plan(build_parser(), argv, plan_from_args)
    result = run(plan, ns)
    json_path = result_path(ns.out, ns.name, plan_slug(plan, ns), result["device"])
    result["files"] = {"json": str(json_path)}
    png = None if ns.no_plot else _plot(result, json_path.with_suffix(".png"))
    if png:
        result["files"]["png"] = png
    write_json(result, json_path)
    print(render(result))
    print(f"\nraw results: {json_path}" + (f", plot: {png}" if png else "") + f" ({result['wall_s']:.0f} s)")
    return result


def cli(argv: list[str] | None = None) -> int:
    """``python -m bench.dual_masking`` / ``vmae-bench dual-masking``: exit status 1 when a cell
    failed with an error (an out-of-memory cell is a result, not a failure)."""
    result = main(argv)
    return 1 if any(x["status"] == "error" for x in result["rows"]) else 0
