"""The first GPU hour in one command: every GPU claim of vmae-fast proved or disproved on one CUDA
device within 8 minutes on an H100.

    python -m bench.gpu_check                  # make gpu-check: the whole plan on the current CUDA device
    python -m bench.gpu_check --dry-run        # the same plan at toy sizes on the CPU (CI): code paths only
    python -m bench.gpu_check --parts kernels,memory_count --out DIR

Parts, in order, each stopped when its time share is spent (a part that fails is recorded and the
rest still run): the CUDA tests (pytest -m gpu), the fused-kernel bench (GB/s against the measured
copy bandwidth and the datasheet HBM bandwidth), bench.dual_masking preset gpu (clips/s, MFU,
memory; ours against the reference; dual against encoder-only), the exact memory count against
torch.cuda.max_memory_allocated, a 20-step bf16 pretraining run on synthetic videos, the
flash-attn / xformers attention rows, torchcodec's CUDA decoding. Writes
gpu-check-<device>-<date>.json (after every part, so a killed run keeps what it measured) and a
Markdown summary (.md) listing every GPU goal as met, missed or not run, with why.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from vmae_fast.errors import UsageError
from vmae_fast.cli import run_cli

from ..common import cli as common_cli
from ..common.cli import make_parser
from ..common.output import result_header, write_json
from ..common.paths import results_dir, results_help
from . import plan
from .estimate import H100, estimate, rates_for

PROG = "python -m bench.gpu_check"
EXIT_PART_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("gpu_check", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="parts (share of the slot in seconds):\n" + "\n".join(
                        f"  {x.name} ({x.share_s:.0f}): {x.what}" for x in plan.PLAN))
    p.add_argument("--dry-run", action="store_true",
                   help="run the plan at toy sizes on the CPU (every part's real code path; its numbers mean "
                        "nothing) and print the plan's H100 time estimate")
    p.add_argument("--out", help=f"folder for the results (default: {results_help()}; with --dry-run a new "
                                 "temporary folder)")
    p.add_argument("--parts", help="comma list of the parts to run (default: all, in the plan's order)")
    p.add_argument("--debug", action="store_true", help="a traceback with an error")
    return p


def _parts(text: str | None) -> list[plan.Part]:
    if not text:
        return list(plan.PLAN)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in plan.PARTS]
    if bad or not names:
        raise UsageError(f"--parts takes a comma list of {', '.join(plan.PARTS)}; got {text!r}")
    return [p for p in plan.PLAN if p.name in names]


def _device(dry_run: bool):
    import torch

    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("no CUDA device (torch.cuda.is_available() is False); --dry-run runs the plan at toy "
                         "sizes on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def _print_estimate(est: dict) -> None:
    print(f"H100 estimate of the full plan: {est['total_s']:.0f} s "
          f"({'under' if est['under_budget'] else 'OVER'} the {est['budget_s']:.0f} s budget; "
          f"time shares {est['shares_total_s']:.0f} s): " + ", ".join(
              f"{k} {v['estimate_s']:.0f} s" for k, v in est["parts"].items()), flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the plan; returns the result (what the JSON holds). Without CUDA and without
    ``--dry-run``: ``UsageError``."""
    ns = build_parser().parse_args(argv)
    parts = _parts(ns.parts)
    device = _device(ns.dry_run)
    import torch

    from ..common import device as devmod
    from .parts import FUNCTIONS, Context
    from .report import judge_goals, markdown
    from .run import run_part

    t0 = time.time()
    est = estimate(H100)
    _print_estimate(est)
    info = devmod.device_info(device)
    out = Path(ns.out) if ns.out else (Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-")) if ns.dry_run
                                       else results_dir())
    stem = f"gpu-check{'-dry-run' if ns.dry_run else ''}-{devmod.device_slug(info)}-{_dt.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    ctx = Context(device=device, dry_run=ns.dry_run, parts_dir=out / f"{stem}-parts", info=info)
    own = rates_for(info)
    result = {**result_header("gpu_check", argv, device=info), "dry_run": ns.dry_run, "estimate": est,
              "estimate_this_device": estimate(own) if own else None,
              "plan": [{"name": p.name, "what": p.what, "share_s": p.share_s} for p in parts],
              "parts": {}, "goals": [], "wall_s": 0.0, "files": {"json": str(json_path)}}
    threads = torch.get_num_threads()
    if ns.dry_run:  # toy models: one thread is as fast, and 4x faster than two on a loaded 2-core CI box
        torch.set_num_threads(1)
    try:
        for p in parts:
            result["parts"][p.name] = run_part(p, FUNCTIONS[p.name], ctx)
            result["wall_s"] = time.time() - t0
            write_json(result, json_path)  # after every part: a run killed mid-plan keeps what it measured
    finally:
        torch.set_num_threads(threads)
    result["goals"] = judge_goals(result["parts"], gpu=device.type == "cuda")
    result["wall_s"] = time.time() - t0
    md_path = json_path.with_suffix(".md")
    result["files"]["markdown"] = str(md_path)
    text = markdown(result)
    write_json(result, json_path)
    md_path.write_text(text, encoding="utf-8")
    print("\n" + text)
    _print_estimate(est)
    print(f"results: {json_path}, {md_path} ({result['wall_s']:.0f} s)", flush=True)
    return result


def status_of(result: dict) -> int:
    """1 when a part failed, raised or ran out of its share; 0 otherwise (a missed goal is a
    result, not a failure of the check)."""
    bad = any(p["status"] in ("failed", "error", "timeout") for p in result["parts"].values())
    return EXIT_PART_FAILED if bad else 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.gpu_check`` / ``vmae-bench gpu-check`` / ``make gpu-check``."""
    # INVOKED_AS read at call time: under vmae-bench the line names `vmae-bench gpu-check`
    return run_cli(lambda a: status_of(main(a)), common_cli.INVOKED_AS or PROG, argv)


if __name__ == "__main__":
    sys.exit(cli())
