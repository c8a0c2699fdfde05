"""Exact train-step memory per checkpointing policy, and the largest batch per GPU it implies.

    python -m bench.memory --arch vit_b                                   # policies side by side
    python -m bench.memory --arch vit_b --impl vmae_fast,reference --policies none,full,selective
    python -m bench.memory --arch vit_giant_patch14_224 --gpu-mem 40,80,141 [--dist ddp|fsdp --world N]

Every number is an exact count of live tensor bytes during one train step (forward, backward,
AdamW step; ``vmae_fast.memory_count.measure_train_step``), the same on every device for the same ops
and dtypes: on a CPU under bf16 autocast with CUDA's autocast op lists (the default
``--autocast-rules cuda``) the counts are those a GPU holds (on a GPU,
``torch.cuda.max_memory_allocated`` of the same step is reported beside them). Each step is
measured at two batch sizes; op by op the bytes are a line in the batch, so the peak at any
batch follows exactly, and the bytes per clip are the slope of the peak as the batch grows.
Deep encoders are measured at two reduced depths, full width, and scaled by depth, exactly
(``--depth-scale``; ``tests/test_memory.py`` checks both extrapolations against measurements).

The planner (``--gpu-mem``) is an estimate: the exact bytes at each batch, the parameters,
gradients and AdamW state as the ``--dist`` mode holds them, and an allocator margin
(``--margin``) for what no tensor count sees (allocator rounding and fragmentation, cuBLAS/cuDNN
workspaces, NCCL buffers, kernels' own scratch).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch

from vmae_fast.device import select_device
from vmae_fast.flops import counted_flops
from vmae_fast.memory_count import CATEGORIES

from .common import device as devmod
from .common.cli import add_arch_arg, add_device_arg, add_output_args, make_parser, parse_plan
from .common.output import result_header, save_result
from .runner import (DTYPES, Setup, build, checkpointing_disabled, clip_dtype, count_train_step, kernels_of,
                     make_inputs, make_step, master_state, short_arch, split_policy)

POLICIES = {"none": False, "full": True, "selective": "selective"}
MEMORY_IMPLS = ("vmae_fast", "vmae_fast-unfused", "reference")  # counted in eager mode (no compile)
GiB = 2 ** 30
MiB = 2 ** 20
# What a tensor count cannot see, as a share of the GPU's memory: the caching allocator's
# rounding and fragmentation, cuBLAS/cuDNN workspaces, NCCL buffers, kernels' scratch. The
# CUDA context itself lives outside the device memory torch reports, so it is not in here.
DEFAULT_MARGIN = 0.10


def parse_policy_arg(text: str):
    """``none``/``full``/``selective``, a block count, or ``<encoder>/<decoder>`` of those."""
    text = text.strip().lower()
    if text in POLICIES:
        return POLICIES[text]
    if "/" in text:
        split_policy(text)  # validates the shape
        for part in text.split("/"):
            parse_policy_arg(part)
        return text
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"policy must be one of {sorted(POLICIES)} or a block count, got {text!r}") from None
    if n < 0:
        raise ValueError(f"a block count must be >= 0, got {n}")
    return n


def policy_name(policy) -> str:
    return {False: "none", True: "full"}.get(policy, str(policy)) if isinstance(policy, bool) else str(policy)


def make_optimizer(module: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as a GPU run steps it: fused (no temporaries; on the CPU too where this torch has the
    fused CPU kernel, >= 2.4), else one tensor at a time (temporaries of one parameter)."""
    kw = dict(lr=0.0, betas=(0.9, 0.95), weight_decay=0.05)
    try:
        return torch.optim.AdamW(module.parameters(), fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(module.parameters(), foreach=False, **kw)


def measure(setup: Setup, impl: str, policy, decoder_ratio: float, *, dtype: torch.dtype,
            device: torch.device, encoder_ratio: float = 0.9, seed: int = 0, flops: bool = True,
            cuda_rules: bool | None = None) -> dict:
    """Exact memory (and FLOPs) of one train step of ``impl`` on ``setup`` (its batch and depth)
    under ``policy``: ``step_memory`` (``StepMemory.to_dict()``), ``timeline`` (its live bytes
    event by event), ``flops_step`` / ``flops_model`` (forward + backward as run, and with
    checkpointing off: the difference is the recomputation), ``seconds``."""
    setup = replace(setup, ckpt=policy)
    state = master_state(setup, seed)
    module = build(impl, setup, state, device)
    optimizer = make_optimizer(module, device)
    video, masks = make_inputs(setup, setup.batch, decoder_ratio, encoder_ratio, device, seed, clip_dtype(impl))
    t0 = time.perf_counter()
    enc = getattr(module, "encoder", module)
    marks = [(i, list(blk.parameters())) for i, blk in enumerate(enc.blocks)]
    m = count_train_step(impl, module, video, masks, decoder_ratio, optimizer, dtype, warmup_steps="prime",
                         cuda_rules=cuda_rules, marks=marks)
    out = {"step_memory": m.to_dict(), "timeline": m.timeline}
    if flops:
        fwd_bwd = make_step(impl, module, video, masks, decoder_ratio, device, dtype, None)
        with kernels_of(impl):
            out["flops_step"], _ = counted_flops(fwd_bwd)
            if any(split_policy(policy)):  # checkpointing recomputes: count the step without it too
                with checkpointing_disabled(module):
                    out["flops_model"], _ = counted_flops(fwd_bwd)
            else:
                out["flops_model"] = out["flops_step"]
    out["seconds"] = time.perf_counter() - t0
    module.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------ extrapolation
_I = {c: i for i, c in enumerate(CATEGORIES)}  # the columns of a timeline row, after (phase, op, mark)
ACT_PHASES = ("forward", "backward")


class Lines:
    """A step's live bytes as lines in the batch: after op ``t``, category ``c`` holds
    ``const[t, c] + per_clip[t, c] * batch`` bytes.

    Built from the timelines of two measured steps at different batch sizes: the same model and
    policy run the same ops in the same order at any batch, so op ``t`` is the same moment of
    both steps (checked: same ops, same phases) and every tensor's bytes are either per clip or
    per step. The peak at any batch is then the largest of the lines there, exact, also where
    the moment of the peak moves with the batch (a small batch peaks where the weights and
    gradients dominate, a large one where activations do). Steps that do not align (``aligned``
    False) fall back to one line through the two measured peaks.

    ``segments``: each op's place in the step relative to the ``depth`` encoder blocks (from the
    block whose parameters the op last read): ``pre`` (before the encoder), ``fwd_last`` (the
    last block's forward and everything up to backward), ``bwd_first`` (backward up to the end
    of the last block's), ``bwd_last`` (the first block's backward and after), ``opt``. The
    peak of each segment moves linearly with the depth; the blocks in between never hold more
    than one of these (see ``estimate_peak``)."""

    SEGMENTS = ("pre", "fwd_last", "bwd_first", "bwd_last", "opt")

    def __init__(self, m0, m1, b0: int, b1: int, depth: int | None = None):
        t0, t1 = m0["timeline"], m1["timeline"]
        self.aligned = len(t0) == len(t1) and all(x[:3] == y[:3] for x, y in zip(t0, t1))
        if self.aligned:
            self.phases = [x[0] for x in t0]
            marks = [x[2] for x in t0]
            v0 = torch.tensor([x[3:] for x in t0], dtype=torch.float64)
            v1 = torch.tensor([x[3:] for x in t1], dtype=torch.float64)
        else:
            sm0, sm1 = m0["step_memory"], m1["step_memory"]
            v0 = torch.tensor([[sm0[k][c] for c in CATEGORIES] for k in ("at_peak", "at_activation_peak")],
                              dtype=torch.float64)
            v1 = torch.tensor([[sm1[k][c] for c in CATEGORIES] for k in ("at_peak", "at_activation_peak")],
                              dtype=torch.float64)
            self.phases, marks = ["backward", "backward"], [None, None]
        self.per_clip = (v1 - v0) / (b1 - b0)
        self.const = v0 - self.per_clip * b0
        self.act_rows = torch.tensor([p in ACT_PHASES for p in self.phases])
        last = (depth - 1) if depth else None
        seg = {k: torch.zeros(len(self.phases), dtype=torch.bool) for k in self.SEGMENTS}
        for i, (p, m) in enumerate(zip(self.phases, marks)):
            if p == "optimizer" or p == "end":
                seg["opt"][i] = True
            elif p == "backward":
                seg["bwd_first"][i] = m == last
                seg["bwd_last"][i] = m == 0
            elif m is None:
                seg["pre"][i] = True
            elif m == last:
                seg["fwd_last"][i] = True
        self.segments = seg

    def at(self, batch: float) -> torch.Tensor:
        return self.const + self.per_clip * batch

    def activation_peak(self, batch: float) -> float:
        v = self.at(batch)[:, _I["activations"]]
        return float(v[self.act_rows].max()) if bool(self.act_rows.any()) else float(v.max())

    def totals(self, batch: float, dist: str = "single", world: int = 1, extra: float = 0.0) -> torch.Tensor:
        """Live bytes per GPU after every op at ``batch`` under ``dist``: parameters + buffers +
        gradients + AdamW state + inputs + activations, with parameters, gradients and AdamW state
        divided by ``world`` for ``fsdp``, DDP's gradient buckets (the final gradients' bytes)
        added for ``ddp``, and ``extra`` bytes."""
        v = self.at(batch)
        shard = world if dist == "fsdp" else 1
        total = (v[:, _I["parameters"]] + v[:, _I["gradients"]] + v[:, _I["optimizer_state"]]) / shard \
            + v[:, _I["buffers"]] + v[:, _I["inputs"]] + v[:, _I["activations"]] + extra
        if dist == "ddp":
            total = total + v[-1, _I["gradients"]]
        return total

    def total_peak(self, batch: float, dist: str = "single", world: int = 1, extra: float = 0.0) -> dict:
        """The step's peak per GPU at ``batch`` (exact for this model, see ``totals``), the phase
        where it is, and the peak of each of ``segments``."""
        total = self.totals(batch, dist, world, extra)
        i = int(total.argmax())
        segs = {k: float(total[m].max()) for k, m in self.segments.items() if bool(m.any())}
        return {"peak": float(total[i]), "phase": self.phases[i], "segments": segs}

    def segment_activation_peaks(self, batch: float) -> dict:
        act = self.at(batch)[:, _I["activations"]]
        return {k: float(act[m & self.act_rows].max()) for k, m in self.segments.items()
                if bool((m & self.act_rows).any())}


def depth_extrapolate(f, depths: tuple[int, int] | None, full_depth: int, by_depth: dict):
    """``f(obj)`` at ``full_depth`` from the objects measured at two reduced encoder depths, on the
    line through them (the encoder's blocks are identical: every byte count is an affine function
    of the depth); the value itself without ``depths``."""
    if not depths:
        return f(by_depth[full_depth])
    d0, d1 = depths
    y0, y1 = f(by_depth[d0]), f(by_depth[d1])
    return y0 + (full_depth - d0) * (y1 - y0) / (d1 - d0)


def profile(setup: Setup, impl: str, policy, decoder_ratio: float, *, batches=(2, 3), depths=None,
            full_depth: int, **kw) -> dict:
    """Measure ``policy`` at two ``batches`` (at two reduced encoder ``depths``, if given) and
    keep the ``Lines`` of each depth."""
    flops = kw.pop("flops", True)
    b0, b1 = batches
    lines, runs, scalars = {}, [], {}
    for d in (depths or (full_depth,)):
        ms = []
        for i, b in enumerate(batches):
            s = replace(setup, batch=b, depth=d if depths else setup.depth)
            # FLOPs are counted at the first batch only: every FLOP of a step is per clip
            r = measure(s, impl, policy, decoder_ratio, flops=flops and i == 0, **kw)
            ms.append(r)
            sm = r["step_memory"]
            runs.append({"batch": b, "depth": d, "seconds": r["seconds"],
                         **{k: sm[k] for k in ("peak_total", "peak_phase", "at_peak", "peak_activations",
                                               "held_after_forward", "phase_peaks", "cuda_max_allocated",
                                               "cuda_base_allocated")},
                         **({k: r[k] for k in ("flops_step", "flops_model")} if i == 0 and flops else {})})
        lines[d] = Lines(ms[0], ms[1], b0, b1, depth=d)
        held = [m["step_memory"]["held_after_forward"] for m in ms]
        scalars[d] = {"held_per_clip": (held[1] - held[0]) / (b1 - b0),
                      "flops_step_per_clip": ms[0].get("flops_step", 0) / b0 if flops else None,
                      "flops_model_per_clip": ms[0].get("flops_model", 0) / b0 if flops else None}
    return {"impl": impl, "policy": policy_name(policy), "lines": lines, "scalars": scalars, "runs": runs,
            "full_depth": full_depth, "depths": tuple(depths) if depths else None, "batches": (b0, b1),
            "aligned": all(x.aligned for x in lines.values())}


def _at_depth(prof: dict, f):
    return depth_extrapolate(f, prof["depths"], prof["full_depth"], prof["lines"])


def _scalar(prof: dict, key: str):
    if prof["scalars"][next(iter(prof["scalars"]))][key] is None:
        return None
    return depth_extrapolate(lambda sc: sc[key], prof["depths"], prof["full_depth"], prof["scalars"])


_BIG = 1 << 20  # a batch where the steepest line is the peak: the slope there is bytes per clip


def summary(prof: dict, batch: int | None = None) -> dict:
    """The numbers of a profile at the full depth: activation bytes per clip (the peak's slope as
    the batch grows), the activation peak and the total peak at ``batch`` (default: the first
    measured one), bytes held from forward to backward per clip, parameters/gradients/AdamW state,
    and the FLOPs of recomputation."""
    b = batch or prof["batches"][0]
    fs, fm = _scalar(prof, "flops_step_per_clip"), _scalar(prof, "flops_model_per_clip")
    rec = None if fs is None or fm is None else fs - fm
    end = {c: _at_depth(prof, lambda ln, c=c: float(ln.at(b)[-1, _I[c]])) for c in CATEGORIES}
    return {"impl": prof["impl"], "policy": prof["policy"], "batch": b,
            "act_per_clip": (activation_peak(prof, 2 * _BIG) - activation_peak(prof, _BIG)) / _BIG,
            "act_peak": activation_peak(prof, b),
            "total_peak": estimate_peak(prof, b),
            "held_per_clip": _scalar(prof, "held_per_clip"),
            "parameters": end["parameters"], "gradients": end["gradients"], "optimizer_state": end["optimizer_state"],
            "flops_per_clip": fs, "recompute_flops_per_clip": rec,
            "recompute_share": None if rec is None or not fs else rec / fs,
            "extra_flops": None if rec is None or not fm else rec / fm, "aligned": prof["aligned"]}


# ------------------------------------------------------------------------------------ planner
def fsdp_working_set(setup: Setup) -> float:
    """Unsharded bytes FSDP2 (``fully_shard`` per block, bf16 parameters, fp32 reduction, as
    train/distributed.py wraps) adds per GPU: the bf16 parameters of two blocks (the one running
    and the one prefetched) and one block's gradients in bf16 and in fp32 for the reduce-scatter,
    plus the root's (non-block) parameters in bf16."""
    cfg = setup.config()
    d, h = cfg.embed_dim, cfg.mlp_hidden
    block = 4 * d * d + 2 * d * h + h + 9 * d  # qkv, proj, fc1, fc2, biases, norms
    return block * (2 * 2 + 2 + 4)


def estimate_peak(prof: dict, batch: int, dist: str = "single", world: int = 1, extra: float = 0.0) -> float:
    """Estimated peak bytes per GPU of a train step at ``batch`` clips per GPU (full depth).

    Measured at the full depth: the step's peak, exact for the measured model at any batch
    (``Lines``). Scaled from reduced depths: the largest of the segments' peaks (``Lines``),
    each extrapolated on its line in the depth. The encoder's identical blocks make every
    segment's peak move linearly with the depth, and the blocks between the first and the last
    hold no more than these: in forward the live bytes grow block by block (the last block's
    forward is the largest), in backward they move linearly from the first block to the last
    (each frees its activations and adds its gradients)."""
    if not prof["depths"]:
        return prof["lines"][prof["full_depth"]].total_peak(batch, dist, world, extra)["peak"]
    d0, d1 = prof["depths"]
    segs = [ln.total_peak(batch, dist, world, extra)["segments"] for ln in (prof["lines"][d0], prof["lines"][d1])]
    return max(_line(prof, segs[0][k], segs[1][k]) for k in segs[0] if k in segs[1])


def _line(prof: dict, y0: float, y1: float) -> float:
    d0, d1 = prof["depths"]
    return y0 + (prof["full_depth"] - d0) * (y1 - y0) / (d1 - d0)


def activation_peak(prof: dict, batch: int) -> float:
    """Peak activation bytes at ``batch`` (full depth), as ``estimate_peak`` scales them."""
    if not prof["depths"]:
        return prof["lines"][prof["full_depth"]].activation_peak(batch)
    d0, d1 = prof["depths"]
    segs = [prof["lines"][d].segment_activation_peaks(batch) for d in (d0, d1)]
    return max(_line(prof, segs[0][k], segs[1][k]) for k in segs[0] if k in segs[1])


MAX_BATCH_CAP = 1 << 16  # the planner's search stops here: a result equal to it means "at least"


def max_batch(prof: dict, gpu_bytes: float, margin: float, dist: str = "single", world: int = 1,
              extra: float = 0.0, cap: int = MAX_BATCH_CAP) -> int:
    """Largest batch whose estimated peak fits ``gpu_bytes * (1 - margin)`` (0: none fits;
    ``cap``: the search stopped there, larger batches may fit too)."""
    budget = gpu_bytes * (1 - margin)

    def fits(b):
        return estimate_peak(prof, b, dist, world, extra) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = make_parser("memory", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=__doc__.split("\n\n", 2)[2])
    add_arch_arg(p, "model", "vit_base_patch16_224")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--decoder-depth", type=int, default=4)
    p.add_argument("--decoder-ratio", type=float, default=0.5, help="0 = encoder-only masking (default 0.5)")
    p.add_argument("--encoder-ratio", type=float, default=0.9)
    p.add_argument("--policies", default="none,full,selective",
                   help="comma list: none, full, selective, n blocks, or <encoder>/<decoder> (e.g. selective/full)")
    p.add_argument("--impl", default="vmae_fast", help=f"comma list: {', '.join(MEMORY_IMPLS)}")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="autocast dtype (default bf16)")
    add_device_arg(p, "cpu", ": the counts are device-independent")
    p.add_argument("--batch", default="2,3",
                   help="two batch sizes (default 2,3: at batch 1 some reshapes are views that copy at any "
                        "other batch, so batch 1 is not on the line of the others)")
    p.add_argument("--depth-scale", default="auto",
                   help="'auto' (for encoders deeper than 12), 'off', or two reduced encoder depths 'd0,d1' "
                        "to measure at full width and scale exactly by depth")
    p.add_argument("--depth", type=int, help="encoder depth override (the model measured is then that deep)")
    p.add_argument("--gpu-mem", help="comma list of GPU memory sizes in GiB: print the largest batch per GPU")
    p.add_argument("--dist", default="single",
                   help="comma list of single, ddp, fsdp: how parameters, gradients and AdamW state are held")
    p.add_argument("--world", type=int, default=1, help="GPUs for ddp/fsdp (fsdp shards by it)")
    p.add_argument("--autocast-rules", default="cuda", choices=["cuda", "cpu"],
                   help="on a CPU: count under CUDA's autocast op lists (default: what a GPU holds) or the "
                        "CPU's own (LayerNorm, softmax in bf16)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="allocator margin, share of GPU memory")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p, "memory-<arch>-<device>-<date>")
    return p


def plan(ns) -> dict:
    batches = tuple(int(x) for x in ns.batch.split(","))
    if len(batches) != 2 or batches[0] == batches[1] or min(batches) < 1:
        raise ValueError(f"--batch takes two different batch sizes >= 1, got {ns.batch!r}")
    setup = Setup(ns.arch, ns.frames, ns.img_size, batches[0], depth=ns.depth, decoder_depth=ns.decoder_depth)
    full_depth = setup.config().depth
    if ns.depth_scale == "off":
        depths = None
    elif ns.depth_scale == "auto":
        depths = (2, 3) if full_depth > 12 else None
    else:
        depths = tuple(int(x) for x in ns.depth_scale.split(","))
        if len(depths) != 2 or depths[0] == depths[1] or min(depths) < 1:
            raise ValueError(f"--depth-scale takes 'auto', 'off' or two encoder depths, got {ns.depth_scale!r}")
    policies = [parse_policy_arg(x) for x in ns.policies.split(",") if x.strip()]
    if depths and any((isinstance(p, int) and not isinstance(p, bool))
                      or (isinstance(p, str) and any(c.isdigit() for c in p.split("/")[0])) for p in policies):
        raise ValueError("a block-count policy cannot be scaled by depth: use --depth-scale off or "
                         "none/full/selective")
    impls = [x.strip() for x in ns.impl.split(",") if x.strip()]
    if not impls or any(x not in MEMORY_IMPLS for x in impls):
        raise ValueError(f"--impl takes a comma list of {', '.join(MEMORY_IMPLS)}, got {ns.impl!r}")
    gpu = [float(x) for x in ns.gpu_mem.split(",")] if ns.gpu_mem else []
    dists = [x.strip() for x in ns.dist.split(",") if x.strip()]
    if not dists or any(x not in ("single", "ddp", "fsdp") for x in dists):
        raise ValueError(f"--dist takes a comma list of single, ddp, fsdp, got {ns.dist!r}")
    if ns.world < 1 or (dists == ["single"] and ns.world != 1):
        raise ValueError("--world must be >= 1 (and 1 without --dist ddp/fsdp)")
    if not 0 <= ns.margin < 1:
        raise ValueError(f"--margin must be in [0, 1), got {ns.margin}")
    return {"setup": setup, "batches": batches, "depths": depths, "full_depth": full_depth, "policies": policies,
            "impls": impls, "gpu_mem": gpu, "dtype": DTYPES[ns.dtype], "device": select_device(ns.device),
            "dists": dists}


def run(pl: dict, ns) -> dict:
    t0 = time.time()
    kw = dict(dtype=pl["dtype"], device=pl["device"], encoder_ratio=ns.encoder_ratio, seed=ns.seed,
              flops=not ns.no_flops, cuda_rules=None if ns.autocast_rules == "cuda" else False)
    profiles = []
    for impl in pl["impls"]:
        for pol in pl["policies"]:
            if impl.startswith("reference") and isinstance(pol, str) and "selective" in pol:
                continue  # the official code has no selective policy
            print(f"measuring {impl} {policy_name(pol)} ...", file=sys.stderr, flush=True)
            profiles.append(profile(pl["setup"], impl, pol, ns.decoder_ratio, batches=pl["batches"],
                                    depths=pl["depths"], full_depth=pl["full_depth"], **kw))
    setup = pl["setup"]
    result = {**result_header("memory", ns._argv, kind="memory", device=devmod.device_info(pl["device"])),
              "config": {"arch": setup.arch, "frames": setup.frames, "img_size": setup.img_size,
                         "decoder_depth": setup.decoder_depth, "decoder_ratio": ns.decoder_ratio,
                         "encoder_ratio": ns.encoder_ratio, "dtype": str(pl["dtype"]).replace("torch.", ""),
                         "batches": pl["batches"], "depths": pl["depths"], "full_depth": pl["full_depth"],
                         "optimizer": "AdamW, fused where this torch has it on the device",
                         "count": "exact live tensor bytes, op by op (vmae_fast.memory_count.measure_train_step)",
                         "autocast_rules": ns.autocast_rules if pl["device"].type == "cpu" else "native"},
              "summaries": [summary(p) for p in profiles],
              "runs": [{"impl": p["impl"], "policy": p["policy"], "runs": p["runs"]} for p in profiles]}
    result["planners"] = []
    for dist in pl["dists"] if pl["gpu_mem"] else ():
        world = 1 if dist == "single" else ns.world
        extra = fsdp_working_set(setup) if dist == "fsdp" else 0.0
        result["planners"].append({
            "estimate": True, "dist": dist, "world": world, "margin": ns.margin, "gpu_mem_gib": pl["gpu_mem"],
            "fsdp_working_set_bytes": extra,
            "rows": [{"impl": p["impl"], "policy": p["policy"],
                      "max_batch": {f"{g:g}": max_batch(p, g * GiB, ns.margin, dist, world, extra)
                                    for g in pl["gpu_mem"]}} for p in profiles]})
    result["wall_s"] = time.time() - t0
    return result


def _mib(x) -> str:
    return "–" if x is None else f"{x / MiB:,.1f}"


def _pct(x, fmt="{:.1%}") -> str:
    return "–" if x is None else fmt.format(x)


def _batch_cell(b: int) -> str:
    """A planner result as a reader should take it: the cap is where the search stopped, not a limit."""
    if b >= MAX_BATCH_CAP:
        return f">= {MAX_BATCH_CAP:,} (search cap; limit not reached)"
    return "none fits" if b == 0 else f"{b:,}"


def render(result: dict) -> str:
    c = result["config"]
    info = result["device"]
    d = c["full_depth"]
    masking = "encoder-only" if not c["decoder_ratio"] else f"dual {c['encoder_ratio']:g}/{c['decoder_ratio']:g}"
    b0 = c["batches"][0]
    out = [f"## Train-step memory: {short_arch(c['arch'])} {c['frames']}x{c['img_size']}, {masking}, "
           f"{c['dtype']} autocast",
           f"exact live tensor bytes, {info['name']}, torch {info['torch']}"
           + (", CUDA's autocast op lists" if c.get("autocast_rules") == "cuda" else "")
           + f"; measured at batch {c['batches'][0]} "
           f"and {c['batches'][1]}" + (f", encoder depth {c['depths'][0]} and {c['depths'][1]} scaled to {d}"
                                      if c["depths"] else "") + "; MiB = 2^20 bytes", "",
           f"| impl | policy | activations / clip | activation peak, batch {b0} | step peak, batch {b0} "
           "| held fwd->bwd / clip | params | grads | AdamW | recompute (share of step FLOPs) | extra FLOPs |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in result["summaries"]:
        out.append(f"| {x['impl']} | {x['policy']} | {_mib(x['act_per_clip'])} | {_mib(x['act_peak'])} | "
                   f"{_mib(x['total_peak'])} | {_mib(x['held_per_clip'])} | {_mib(x['parameters'])} | "
                   f"{_mib(x['gradients'])} | {_mib(x['optimizer_state'])} | {_pct(x['recompute_share'])} | "
                   f"{_pct(x['extra_flops'], '{:+.1%}')} |")
    ref = next((x for x in result["summaries"] if x["impl"] == "reference" and x["policy"] == "none"), None)
    none = next((x for x in result["summaries"] if x["impl"] == "vmae_fast" and x["policy"] == "none"), None)
    full = next((x for x in result["summaries"] if x["impl"] == "vmae_fast" and x["policy"] == "full"), None)
    if ref or none:
        out += ["", "Activations per clip:"]
        for x in result["summaries"]:
            parts = []
            if ref:
                parts.append(f"{x['act_per_clip'] / ref['act_per_clip']:.2f}x reference (no checkpointing)")
            if none:
                parts.append(f"{x['act_per_clip'] / none['act_per_clip']:.2f}x vmae_fast none")
            if full and full.get("recompute_flops_per_clip") and x.get("recompute_flops_per_clip") is not None:
                share = x["recompute_flops_per_clip"] / full["recompute_flops_per_clip"]
                parts.append(f"recompute {share:.2f}x full's")
            out.append(f"- {x['impl']} {x['policy']}: " + ", ".join(parts))
    if any(not x["aligned"] for x in result["summaries"]):
        out.append("- (steps of different batch sizes did not align event by event: a line through the "
                   "two peaks was used)")
    for pl in result.get("planners", ()):
        g = pl["gpu_mem_gib"]
        gpus = f", {pl['world']} GPUs" if pl["dist"] != "single" else ""
        out += ["", f"### Largest batch per GPU: ESTIMATE ({pl['dist']}{gpus}, {pl['margin']:.0%} allocator margin)",
                "", "| impl | policy | " + " | ".join(f"{x:g} GiB" for x in g) + " |", "|---|---|" + "---|" * len(g)]
        for row in pl["rows"]:
            out.append(f"| {row['impl']} | {row['policy']} | "
                       + " | ".join(_batch_cell(row["max_batch"][f"{x:g}"]) for x in g) + " |")
        out.append("")
        out.append("From the exact per-step and per-clip bytes above: parameters, gradients and AdamW state "
                   + {"single": "on one GPU", "ddp": "replicated, plus DDP's gradient buckets",
                      "fsdp": f"sharded over {pl['world']} GPUs, plus FSDP2's unsharded working set "
                              f"({_mib(pl['fsdp_working_set_bytes'])} MiB)"}[pl["dist"]]
                   + "; what no tensor count sees (allocator rounding and fragmentation, library workspaces, "
                     "communication buffers) is the margin.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ns, pl = parse_plan(_parser(), argv, plan)
    result = run(pl, ns)
    print(render(result))
    save_result(result, ns, f"memory-{short_arch(pl['setup'].arch).lower().replace('-', '')}",
                f" ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
