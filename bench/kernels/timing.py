"""The timed run: each op's variants (eager reference, ``torch.compile`` of it, the fused op
the dispatch picks, the native CPU op) on ``ROTATE`` input sets, and its Markdown table."""
from __future__ import annotations

import functools
import itertools
import sys
from typing import Callable

import torch

from vmae_fast import ops

from ..common import device as devmod
from ..common.output import result_header, save_result
from ..common.timing import time_fn
from .cases import OpCase, make_inputs, op_cases, shapes

ROTATE = 4  # input sets cycled through, so repeated calls do not time a warm cache


def _cycled(fns: list[Callable]) -> Callable:
    """One call of the next function in ``fns``, round-robin: each call meets other inputs."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def _run(fn: Callable, device, warmup, repeats) -> dict:
    st = time_fn(fn, device, warmup=warmup, repeats=repeats)
    return {"ok": True, "seconds": st.to_dict()}


def bench_op(name: str, cases_by_set: list[dict[str, OpCase]], device, warmup, repeats, compile_: bool,
             copy_gbps: float, fused_path: str) -> list[dict]:
    """All variants of one op; each call cycles over ``ROTATE`` input sets. ``fused_path``: what
    the public op runs on ``device`` (``device_info``'s ``fused_ops``, from the dispatch)."""
    c0 = cases_by_set[0][name]
    rows = []

    variants: list[tuple[str, Callable | None, str | None]] = [
        ("eager ref", _cycled([c[name].ref for c in cases_by_set]), None)]
    if compile_:
        try:
            compiled = [torch.compile(c[name].ref, dynamic=False) for c in cases_by_set]
            variants.append(("torch.compile(ref)", _cycled(compiled), None))
        except Exception as exc:
            variants.append(("torch.compile(ref)", None, f"{type(exc).__name__}: {exc}"[:200]))
    if fused_path.startswith("reference"):
        variants.append(("fused (dispatch)", None, f"the dispatch runs the {fused_path} here"))
    else:
        variants.append((f"fused (dispatch: {fused_path})", _cycled([c[name].fused for c in cases_by_set]), None))
    if device.type == "cpu":
        from vmae_fast.ops._dispatch import native_op

        f = native_op(c0.native)
        if f is None:
            variants.append(("native ext", None, "vmae_fast._C: " + devmod.native_status()))
        else:
            variants.append(("native ext", _cycled([functools.partial(c[name].native_call, f)
                                                    for c in cases_by_set]), None))
    for label, fn, why in variants:
        row = {"op": name, "variant": label, "shape": c0.shape, "bytes": c0.bytes}
        if fn is None:
            row.update(ok=False, why=why)
        else:
            try:
                with torch.no_grad(), ops.use_kernels(True):
                    row.update(_run(fn, device, warmup, repeats))
                med = row["seconds"]["median"]
                row["gbps"] = c0.bytes / med / 1e9
                row["pct_copy_bw"] = row["gbps"] / copy_gbps
            except Exception as exc:
                row.update(ok=False, why=f"{type(exc).__name__}: {exc}"[:200])
        rows.append(row)
    return rows


def run_timed(ns, dev: torch.device, argv: list[str] | None) -> dict:
    """Every op at every shape on ``dev``; prints the table, saves and returns the result."""
    repeats = ns.repeats or (50 if dev.type == "cuda" else 10)
    act_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    info = devmod.device_info(dev)
    copy = devmod.copy_bandwidth(dev)
    wanted = set(ns.only.split(",")) if ns.only else None
    rows = []
    for shp in shapes(dev, ns.batch):
        if ns.arch not in ("both", shp.arch):
            continue
        sets = [op_cases(make_inputs(shp, dev, act_dtype, seed)) for seed in range(ROTATE)]
        for name in sets[0]:
            if wanted and name not in wanted:
                continue
            for r in bench_op(name, sets, dev, ns.warmup, repeats, not ns.no_compile, copy["gbps"],
                              info["fused_ops"][name]):
                r["setup"] = shp.name
                rows.append(r)
                print(f"  {shp.name} | {name} | {r['variant']}: " +
                      (f"{r['seconds']['median'] * 1e3:.3f} ms" if r.get("ok") else f"skipped ({r['why']})"),
                      file=sys.stderr, flush=True)
        del sets
    result = {**result_header("kernels", argv, device=info), "copy_bandwidth": copy,
              "config": {"repeats": repeats, "warmup": ns.warmup, "rotate_inputs": ROTATE,
                         "activation_dtype": str(act_dtype), "video_dtype": "float32",
                         "bytes": "fewest bytes: inputs read once, outputs written once"},
              "rows": rows}
    print("\n".join(timing_table(rows, info, copy, repeats)))
    save_result(result, ns, "kernels")
    return result


def timing_table(rows: list[dict], info: dict, copy: dict, repeats: int) -> list[str]:
    """Markdown: one row per (setup, op, variant), with its speed-up over the eager reference."""
    lines = [f"## Fused ops: {info['name']} (torch {info['torch']}, triton {info['triton']}, "
             f"native ext: {info['native_ext'].split(' (')[0]})",
             f"copy bandwidth {copy['gbps']:.1f} GB/s (read + write); forward only, median of {repeats}", "",
             "| setup | op | shape | variant | ms median (min–max) | GB/s | % of copy BW | vs eager ref |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['setup']} | {r['op']} | {r['shape']} | {r['variant']} | n/a: {r['why'][:70]} | | | |")
            continue
        ref = next((x for x in rows if x["setup"] == r["setup"] and x["op"] == r["op"]
                    and x["variant"] == "eager ref" and x.get("ok")), None)
        s = r["seconds"]
        vs = f"{ref['seconds']['median'] / s['median']:.2f}x" if ref else "–"  # the reference failed (e.g. OOM)
        lines.append(f"| {r['setup']} | {r['op']} | {r['shape']} | {r['variant']} | {s['median'] * 1e3:.3f} "
                     f"({s['min'] * 1e3:.3f}–{s['max'] * 1e3:.3f}) | {r['gbps']:.1f} | {r['pct_copy_bw']:.0%} | {vs} |")
    return lines
