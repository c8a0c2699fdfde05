"""Measure a plan: every cell (setup x masking x implementation) becomes one row.

Implementations of a setup are timed either round-robin, all alive at once (``interleaved``, the
default on CPU, where other load would otherwise fall on one row), or one at a time, alone in
memory (``sequential``, the default on GPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from vmae_fast.flops import count_macs

from ..common import device as devmod
from ..common.output import result_header
from ..common.timing import free_memory, is_oom, pin_malloc_mmap_threshold
from ..runner import (CellOptions, Setup, build, make_optimizer, masking_label, master_state, measure_cell,
                      measure_cells_interleaved, param_count, unsupported)
from .metrics import derive, goals
from .plan import Plan

Error = tuple[str, str]  # (status "oom" or "error", description)


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=disable, file=sys.stderr, unit="cell", dynamic_ncols=True)
    except ImportError:
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                if not disable:
                    print(f"[{self.n}/{total}]", file=sys.stderr, flush=True)

            def set_description(self, s):
                if not disable:
                    print(s, file=sys.stderr, flush=True)

            def close(self):
                pass
        return _Plain()


def _attempt(fn, *args) -> tuple[dict, Error | None]:
    """``(fn(*args), None)``, or ``({}, error)`` when it raises. Only a description is kept: the
    exception's traceback holds the failed step's tensors, so memory is freed by the caller,
    after the except block, once they are gone."""
    try:
        return fn(*args), None
    except Exception as exc:
        return {}, ("oom" if is_oom(exc) else "error", f"{type(exc).__name__}: {exc}"[:300])


class SetupCells:
    """One setup: its master weights (the same for every implementation), the implementations
    built from them, and the part of a row every cell of it shares."""

    def __init__(self, setup: Setup, opt: CellOptions):
        self.setup, self.opt = setup, opt
        self.state = master_state(setup, opt.seed)
        self.params = param_count(setup)
        self.cfg = setup.config()

    def build(self, impl: str):
        """``(module, optimizer, None)``, or ``(None, None, error)`` where it cannot be built."""
        try:
            module = build(impl, self.setup, self.state, self.opt.device)
            return module, (make_optimizer(module, self.opt.device) if self.opt.optimizer else None), None
        except Exception as exc:  # e.g. OOM for the weights, a missing compiler
            return None, None, f"{type(exc).__name__}: {exc}"[:300]

    def row(self, impl: str, r: float, build_error: str | None, error: Error | None, measured: dict) -> dict:
        """The cell's row: the build's error, no support for the masking, the step's error, or
        what was measured, in that order."""
        s, enc = self.setup, self.opt.encoder_ratio
        row = {"setup": s.__dict__ | {"label": s.label()}, "arch": s.arch,
               "decoder_ratio": r, "encoder_ratio": enc, "masking": masking_label(r),
               "impl": impl, "params": self.params, "dtype": str(self.opt.dtype).replace("torch.", ""),
               "gmacs_official": count_macs(self.cfg, enc, r, "official")["total"] / 1e9,
               "gmacs_vmae_fast": count_macs(self.cfg, enc, r, "vmae_fast")["total"] / 1e9,
               "status": "ok"}
        if build_error:
            row.update(status="error", error=build_error)
        elif unsupported(impl, r):
            row.update(status="unsupported", error=unsupported(impl, r))
        elif error:
            row.update(status=error[0], error=error[1])
        else:
            row.update(measured)
        return row


def measure_sequential(cells: SetupCells, maskings: list[float], impls: list[str], bar) -> list[dict]:
    """One implementation at a time, alone in memory: its maskings, then it is freed."""
    rows = []
    for impl in impls:
        module, optimizer, build_error = cells.build(impl)
        for r in maskings:
            bar.set_description(f"{cells.setup.label()} | {masking_label(r)} | {impl}")
            measured, error = {}, None
            if not build_error and not unsupported(impl, r):
                measured, error = _attempt(measure_cell, impl, module, cells.setup, r, cells.opt, optimizer)
            if error:
                module.zero_grad(set_to_none=True)
                free_memory(cells.opt.device)
            rows.append(cells.row(impl, r, build_error, error, measured))
            bar.update(1)
        del module, optimizer
        free_memory(cells.opt.device)
    return rows


def _round_robin(cells: SetupCells, mods: dict, r: float) -> tuple[dict, Error | None]:
    """One masking of every built implementation that takes it, timed round-robin."""
    active = {impl: m for impl, m in mods.items() if not unsupported(impl, r)}
    if not active:
        return {}, None
    measured, error = _attempt(measure_cells_interleaved, active, cells.setup, r, cells.opt)
    if error:
        for module, _ in mods.values():
            module.zero_grad(set_to_none=True)
        free_memory(cells.opt.device)
    return measured, error


def measure_interleaved(cells: SetupCells, maskings: list[float], impls: list[str], bar) -> list[dict]:
    """Every implementation alive at once, timed round-robin per masking."""
    built = {impl: cells.build(impl) for impl in impls}
    mods = {impl: (module, optimizer) for impl, (module, optimizer, err) in built.items() if not err}
    rows = []
    for r in maskings:
        bar.set_description(f"{cells.setup.label()} | {masking_label(r)} | all (interleaved)")
        measured, error = _round_robin(cells, mods, r)
        for impl in impls:
            rows.append(cells.row(impl, r, built[impl][2], error, measured.get(impl, {})))
            bar.update(1)
    del built, mods
    free_memory(cells.opt.device)
    return rows


def _loadavg():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def run(plan: Plan, ns: argparse.Namespace) -> dict:
    device, dtype, smoke = plan.device, plan.dtype, plan.smoke
    t_start, load_start = time.time(), _loadavg()
    if device.type == "cpu":
        pin_malloc_mmap_threshold()  # before any model exists, so RSS tracks live tensors
    info = devmod.device_info(device)
    ceiling = devmod.matmul_ceiling(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                    **({"n": 256, "repeats": 3} if smoke else {}))
    opt = CellOptions(device=device, dtype=dtype, warmup=plan.warmup, repeats=plan.repeats,
                      encoder_ratio=ns.encoder_ratio, optimizer=not ns.no_optimizer,
                      max_batch=plan.max_batch, max_batch_cap=plan.max_batch_cap,
                      count_flops=not ns.no_flops, seed=ns.seed)
    interleave = ns.interleave if ns.interleave is not None else device.type == "cpu"
    measure = measure_interleaved if interleave else measure_sequential
    bar = _progress(sum(len(m) for _, m in plan.setups) * len(plan.impls), ns.no_progress)
    rows = []
    for setup, maskings in plan.setups:
        rows += measure(SetupCells(setup, opt), maskings, plan.impls, bar)
    bar.close()
    derive(rows, info, ceiling)
    return {**result_header("dual_masking", ns._argv, schema=2, preset=plan.preset, device=info),
            "matmul_ceiling": ceiling,
            "config": {"dtype": str(dtype).replace("torch.", ""), "warmup": plan.warmup,
                       "repeats": plan.repeats, "encoder_ratio": ns.encoder_ratio, "smoke": smoke,
                       "max_batch_cap": opt.max_batch_cap if opt.max_batch else None,
                       "optimizer": "none (forward+backward)" if ns.no_optimizer else
                       "AdamW lr=0 (full update cost, weights unchanged)",
                       "impls": plan.impls, "seed": ns.seed,
                       "timing": "interleaved (round-robin over implementations)" if interleave else
                       "sequential (one implementation alive at a time)",
                       "setups": [{**s.__dict__, "maskings": m} for s, m in plan.setups],
                       "clips": "vmae_fast: uint8 (normalized on the device, as train/pretrain.py feeds it); "
                                "reference: ImageNet-normalized float32 of the same pixels",
                       "flops": "torch.utils.flop_counter; attention from q/k/v shapes by the analytic rule "
                                "(backward = 2x forward) on every torch build, also where the counter counts 0 "
                                "(flop_counter_missed names those ops). model FLOPs: forward + backward of "
                                "the vmae_fast row, no recomputation (MFU); hardware FLOPs: what the row's "
                                "step ran, recomputation of checkpointed blocks included (HFU)",
                       "memory": "GPU: torch.cuda.max_memory_allocated; CPU: RSS high-water (VmHWM) after "
                                 "resetting it via /proc/self/clear_refs; act/clip = (peak - memory in use "
                                 "before the step) / batch"},
            "rows": rows, "goals": goals(rows, info), "wall_s": time.time() - t_start,
            # other load on the machine (1/5/15-minute load averages) at start and end of the run
            "loadavg": {"start": load_start, "end": _loadavg()}}
