"""--compile-only, the run: capture, dedupe, compile every key for every target (in parallel
processes), and write the JSON and the Markdown tables (per kernel, per compile, the issues)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..common import device as devmod
from ..common.output import result_header, write_json
from ..common.paths import results_dir
from .aot_capture import AOT_ARCHS, AOT_BATCHES, AOT_OPS, aot_variants, dedupe
from .aot_compile import SM_LIMITS, compile_variant

AOT_DEFAULT_NAME = "kernels_compile.json"


def _compile_job(job):
    v, cc = job
    return compile_variant(v, cc)


def _settings(attrs: list[dict]) -> dict:
    """The settings that share one compile, as {attribute: [values]} (first-seen order)."""
    keys = list(dict.fromkeys(k for a in attrs for k in a))
    return {k: list(dict.fromkeys(a.get(k, "-") for a in attrs)) for k in keys}


def _label(settings: dict, skip=()) -> str:
    parts = []
    for k, vals in settings.items():
        if k in skip:
            continue
        text = ",".join(map(str, vals))
        parts.append(text if k in ("arch", "pass") else f"{k}={text}")
    return " ".join(parts)



def _cell(r: dict) -> str:
    if not r.get("ok"):
        return f"**failed**: {r.get('error', '?')[:80]}"
    return (f"{r['regs']} / {r['spill_bytes']} / {r['shared']} / {r['blocks']}x{r['num_warps']}w = "
            f"{r['occupancy']:.0%} ({r['limiter']})")


def _issues(row: dict) -> str | None:
    """One line per compile with a problem: failure, spills, approximate division or sqrt, or
    occupancy under 50%, for every target."""
    found = []
    for t, r in row["targets"].items():
        if not r.get("ok"):
            found.append(f"{t} failed: {r.get('error', '?')[:120]}")
            continue
        if r["spill_bytes"]:
            found.append(f"{t} {r['spill_bytes']} B/thread local memory (spills)")
        if r["approx_div_f32"] or r["approx_sqrt_f32"]:
            found.append(f"{t} {r['approx_div_f32']} approximate fp32 div, {r['approx_sqrt_f32']} approximate sqrt")
        if r["occupancy"] < 0.5:
            found.append(f"{t} occupancy {r['occupancy']:.0%} ({r['regs']} regs, {r['limiter']}-limited)")
    if not found:
        return None
    return f"{row['kernel']} {_label(row['settings'], skip=('B', 'n', 'rows', 'D'))}: " + "; ".join(found)


def run_compile_only(ns) -> dict:
    """``--compile-only``: prints the tables, writes the JSON, returns the result."""
    import time

    from vmae_fast.ops import _dispatch

    if not _dispatch.HAS_TRITON:
        raise SystemExit("--compile-only needs the 'triton' package, which is not installed")
    if _dispatch.INTERPRETED:
        raise SystemExit("--compile-only: Triton was imported with TRITON_INTERPRET=1 (interpreter "
                         "kernels cannot be compiled); run it without that variable")
    import triton

    archs = [a for a in AOT_ARCHS if ns.arch in ("both", a[1])]
    ops_wanted = tuple(ns.only.split(",")) if ns.only else AOT_OPS
    bad = set(ops_wanted) - set(AOT_OPS)
    if bad:
        raise SystemExit(f"--only: unknown op(s) {sorted(bad)}; expected some of {list(AOT_OPS)}")
    try:
        targets = [int(x) for x in ns.targets.split(",")]
    except ValueError:
        targets = []
    if not targets or set(targets) - set(SM_LIMITS):
        raise SystemExit(f"--targets: a comma list of {sorted(SM_LIMITS)}, got {ns.targets!r}")
    batches = (ns.batch,) if ns.batch else AOT_BATCHES
    t0 = time.perf_counter()
    variants, notes = aot_variants(archs, batches, ops_wanted)
    groups = dedupe(variants)
    print(f"{len(variants)} launches captured, {len(groups)} distinct compile keys, "
          f"{len(groups) * len(targets)} compilations", file=sys.stderr, flush=True)
    jobs = [(v, cc) for v, _ in groups for cc in targets]
    if ns.jobs > 1 and len(jobs) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        # spawn: fresh interpreters, nothing inherited from this process's torch/triton state
        with cf.ProcessPoolExecutor(max_workers=ns.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = []
            for i, r in enumerate(pool.map(_compile_job, jobs, chunksize=1)):
                results.append(r)
                if (i + 1) % 20 == 0:
                    print(f"  {i + 1}/{len(jobs)} compiled", file=sys.stderr, flush=True)
    else:
        results = [_compile_job(j) for j in jobs]
    rows = []
    for gi, (v, attrs) in enumerate(groups):
        per = {r["target"]: r for r in results[gi * len(targets):(gi + 1) * len(targets)]}
        rows.append({"op": v.op, "kernel": v.kernel, "settings": _settings(attrs),
                     "variants": [_label({k: [x] for k, x in a.items()}) for a in attrs],
                     "grid_example": list(v.grid),
                     # param:type, "/16" where specialized as divisible by 16 (tt.divisibility)
                     "signature": " ".join(f"{k}:{t}" + ("/16" if k in v.divisible16 else "")
                                           for k, t in v.signature.items()),
                     "constexprs": " ".join(f"{k}={x!r}" for k, x in v.constexprs.items()),
                     "options": v.options, "targets": per})
    wall = time.perf_counter() - t0
    info = devmod.device_info(torch.device("cpu"))
    result = {**result_header("kernels", ns._argv, host=info), "triton": triton.__version__, "torch": torch.__version__,
              "compiled_on": "compiled on a CPU-only machine, not run",
              "shapes": {"frames": 16, "img_size": 224, "tubelet": 2, "encoder_ratio": 0.9, "decoder_ratio": 0.5,
                         "batches": list(batches), "archs": [a[1] for a in archs], "ops": list(ops_wanted)},
              "sm_limits": SM_LIMITS, "wall_s": wall, "n_launches": len(variants), "notes": notes,
              "issues": [i for i in map(_issues, rows) if i], "rows": rows}
    print("\n".join(compile_tables(result)))
    path = Path(ns.out) if ns.out else results_dir() / AOT_DEFAULT_NAME
    write_json(result, path)
    print(f"\nraw results: {path}  ({wall:.0f} s)")
    return result


def compile_tables(result: dict) -> list[str]:
    """Markdown: a summary per kernel and arch, every compile, then the issues found."""
    rows = result["rows"]
    targets = list(dict.fromkeys(t for r in rows for t in r["targets"]))
    gpus = " / ".join(f"{SM_LIMITS[int(t[3:])]['gpu']} ({t})" for t in targets)
    lines = [f"### Kernels compiled for {gpus}", "",
             f"`{result['command']}`: triton {result['triton']}, torch {result['torch']}, "
             f"{result['created'][:10]}, {result['compiled_on']}. {result['n_launches']} launches captured "
             f"from the launchers at the pretraining shapes, {len(rows)} distinct compiles per target.", "",
             "Summary per kernel (max over its variants; occupancy: the lowest, as resident blocks x warps "
             "per block per SM, and what limits it):", "",
             "| kernel | arch | compiles | " + " | ".join(
                 f"{t}: compiled, regs, spill B, smem B, occupancy" for t in targets)
             + " | approx fp32 div (all targets) |",
             "|---|---|---|" + "---|" * (len(targets) + 1)]
    summary: dict = {}
    for r in rows:
        label = r["kernel"] + (f" ({r['settings']['pass'][0]})" if "pass" in r["settings"] else "")
        summary.setdefault((label, ",".join(r["settings"]["arch"])), []).append(r)
    order = list(dict.fromkeys(label for label, _ in summary))
    for (label, arch), rs in sorted(summary.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        cells, approx = [], 0
        for t in targets:
            ok = [r["targets"][t] for r in rs if r["targets"][t].get("ok")]
            approx += sum(x["approx_div_f32"] for x in ok)
            if not ok:
                cells.append(f"0/{len(rs)}")
                continue
            worst = min(ok, key=lambda x: x["occupancy"])
            cells.append(f"{len(ok)}/{len(rs)}, {max(x['regs'] for x in ok)}, {max(x['spill_bytes'] for x in ok)}, "
                         f"{max(x['shared'] for x in ok)}, {worst['occupancy']:.0%} "
                         f"({worst['blocks']}x{worst['num_warps']}w, {worst['limiter']})")
        lines.append(f"| {label} | {arch} | {len(rs)} | " + " | ".join(cells) + f" | {approx} |")
    lines += ["", "Every compile: registers per thread / spill (local) bytes per thread / shared bytes per "
              "block / resident blocks x warps per block per SM = occupancy (limiter):", "",
              "| kernel | settings giving this compile | constexprs | " + " | ".join(targets)
              + " | approx fp32 div |", "|---|---|---|" + "---|" * (len(targets) + 1)]
    for r in rows:
        ce = r["constexprs"]
        approx = sum(x.get("approx_div_f32", 0) for x in r["targets"].values())
        lines.append(f"| {r['kernel']} | {_label(r['settings'])} | {ce} | "
                     + " | ".join(_cell(r["targets"][t]) for t in targets) + f" | {approx} |")
    for n in result["notes"][:1]:
        lines += ["", f"decoder_input backward with a fixed table: {n['note']}."]
    lines += ["", "Issues (compile failures, spills, approximate fp32 division or sqrt, occupancy < 50%):"]
    lines += [f"- {i}" for i in result["issues"]] or ["- none"]
    return lines
