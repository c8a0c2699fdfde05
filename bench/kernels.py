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

import functools
import itertools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vmae_fast import ops
from vmae_fast.config import config_for
from vmae_fast.device import select_device
from vmae_fast.masking import DualMask

from .common import device as devmod
from .common.cli import add_arch_arg, add_device_arg, add_output_args, make_parser, parse_plan
from .common.output import result_header, save_result, write_json
from .common.paths import results_dir, results_help
from .common.timing import time_fn

ROTATE = 4  # input sets cycled through, so repeated calls do not time a warm cache


@dataclass
class Shape:
    name: str
    arch: str
    batch: int


def shapes(device: torch.device, batch: int | None) -> list[Shape]:
    gpu = device.type == "cuda"
    return [Shape("ViT-B 16x224 dual 0.9/0.5", "vit_base_patch16_224", batch or (32 if gpu else 2)),
            Shape("ViT-g 16x224 dual 0.9/0.5", "vit_giant_patch14_224", batch or (8 if gpu else 1))]


def make_inputs(shape: Shape, device, act_dtype, seed):
    cfg = config_for(shape.arch, num_frames=16, img_size=224)
    g = torch.Generator().manual_seed(seed)
    B = shape.batch
    video = torch.randn(B, 3, 16, 224, 224, generator=g).to(device)
    m = DualMask.sample(B, cfg.grid, 0.9, 0.5, generator=g).to(device)
    nv, nd, D, P = m.n_visible, m.n_decoder, cfg.decoder_embed_dim, cfg.cube_numel
    z = torch.randn(B, nv, D, generator=g).to(device, act_dtype)
    pos = torch.randn(cfg.num_tokens, D, generator=g).to(device)
    tok = torch.randn(1, 1, D, generator=g).to(device)
    pred = torch.randn(B, nd, P, generator=g).to(device, act_dtype)
    return dict(cfg=cfg, video=video, masks=m, z=z, pos=pos, mask_token=tok, pred=pred,
                weight=m.loss_weight())


def op_cases(x: dict) -> dict[str, dict]:
    """Per op: the reference, the fused entry point, the native op name, and minimal bytes."""
    cfg, video, m = x["cfg"], x["video"], x["masks"]
    t, p = cfg.tubelet_size, cfg.patch_size
    B, nv, nd = m.batch_size, m.n_visible, m.n_decoder
    P, D, N = cfg.cube_numel, x["z"].shape[-1], cfg.num_tokens
    es = lambda a: a.element_size()  # noqa: E731
    idx_b = lambda n: B * n * 8  # noqa: E731

    def gather_ref():
        return ops.gather_cubes_ref(video, m.visible_idx, tubelet=t, patch=p, layout="cthw")

    def gather_fused():
        return ops.gather_cubes(video, m.visible_idx, tubelet=t, patch=p, layout="cthw")

    z, pos, tok = x["z"], x["pos"], x["mask_token"]
    out_es = torch.promote_types(z.dtype, pos.dtype).itemsize

    def dec_ref():
        return ops.decoder_input_ref(z, pos, tok, m.visible_idx, m.decoder_idx)

    def dec_fused():
        return ops.decoder_input(z, pos, tok, m.visible_idx, m.decoder_idx)

    pred, w = x["pred"], x["weight"]

    def mse_ref():
        return ops.masked_mse_loss_ref(pred, video, m.decoder_idx, w, tubelet=t, patch=p)

    def mse_fused():
        return ops.masked_mse_loss(pred, video, m.decoder_idx, w, tubelet=t, patch=p)

    return {
        "gather_cubes": dict(ref=gather_ref, fused=gather_fused, native="gather_cubes_cpu",
                             native_call=lambda f: f(video, m.visible_idx, t, p, False),
                             bytes=B * nv * P * es(video) * 2 + idx_b(nv),
                             shape=f"video {tuple(video.shape)} -> ({B}, {nv}, {P})"),
        "decoder_input": dict(ref=dec_ref, fused=dec_fused, native="decoder_input_fwd_cpu",
                              native_call=lambda f: f(z, pos, tok.reshape(-1), m.visible_idx, m.decoder_idx),
                              bytes=z.numel() * es(z) + N * D * es(pos) + idx_b(nv + nd)
                              + B * (nv + nd) * D * out_es,
                              shape=f"z {tuple(z.shape)}, pos ({N}, {D}) -> ({B}, {nv + nd}, {D})"),
        "masked_mse_loss": dict(ref=mse_ref, fused=mse_fused, native="masked_mse_fwd_cpu",
                                native_call=lambda f: f(pred, video, m.decoder_idx, w, t, p, True, 1e-6),
                                bytes=pred.numel() * es(pred) + B * nd * P * es(video) + idx_b(nd) + B * nd * 4,
                                shape=f"pred {tuple(pred.shape)}, video {tuple(video.shape)} -> ()"),
    }


def _cycled(fns: list[Callable]) -> Callable:
    """One call of the next function in ``fns``, round-robin: each call meets other inputs."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def _run(fn: Callable, device, warmup, repeats) -> dict:
    st = time_fn(fn, device, warmup=warmup, repeats=repeats)
    return {"ok": True, "seconds": st.to_dict()}


def bench_op(name: str, cases_by_set: list[dict], device, warmup, repeats, compile_: bool,
             copy_gbps: float, fused_path: str) -> list[dict]:
    """All variants of one op; each call cycles over ``ROTATE`` input sets. ``fused_path``: what
    the public op runs on ``device`` (``device_info``'s ``fused_ops``, from the dispatch)."""
    c0 = cases_by_set[0][name]
    rows = []

    variants: list[tuple[str, Callable | None, str | None]] = [
        ("eager ref", _cycled([c[name]["ref"] for c in cases_by_set]), None)]
    if compile_:
        try:
            compiled = [torch.compile(c[name]["ref"], dynamic=False) for c in cases_by_set]
            variants.append(("torch.compile(ref)", _cycled(compiled), None))
        except Exception as exc:
            variants.append(("torch.compile(ref)", None, f"{type(exc).__name__}: {exc}"[:200]))
    if fused_path.startswith("reference"):
        variants.append(("fused (dispatch)", None, f"the dispatch runs the {fused_path} here"))
    else:
        variants.append((f"fused (dispatch: {fused_path})", _cycled([c[name]["fused"] for c in cases_by_set]), None))
    if device.type == "cpu":
        from vmae_fast.ops._dispatch import native_op

        f = native_op(c0["native"])
        if f is None:
            variants.append(("native ext", None, "vmae_fast._C: " + devmod.native_status()))
        else:
            variants.append(("native ext", _cycled([functools.partial(c[name]["native_call"], f)
                                                    for c in cases_by_set]), None))
    for label, fn, why in variants:
        row = {"op": name, "variant": label, "shape": c0["shape"], "bytes": c0["bytes"]}
        if fn is None:
            row.update(ok=False, why=why)
        else:
            try:
                with torch.no_grad(), ops.use_kernels(True):
                    row.update(_run(fn, device, warmup, repeats))
                med = row["seconds"]["median"]
                row["gbps"] = c0["bytes"] / med / 1e9
                row["pct_copy_bw"] = row["gbps"] / copy_gbps
            except Exception as exc:
                row.update(ok=False, why=f"{type(exc).__name__}: {exc}"[:200])
        rows.append(row)
    return rows


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
    if ns.batch is not None and ns.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {ns.batch}")
    if ns.compile_only:
        if ns.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {ns.jobs}")
        return None
    return select_device(ns.device)  # cuda:N also becomes the current device


def main(argv: list[str] | None = None) -> dict:
    ns, dev = parse_plan(_parser(), argv, plan)
    if ns.compile_only:
        return compile_main(ns)
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
    print("\n".join(lines))
    save_result(result, ns, "kernels")
    return result



# =========================================================================== --compile-only
# Ahead-of-time compilation of every kernel variant the launchers make at the pretraining
# shapes, for the GPUs our users have (A100 = sm_80, H100 = sm_90), on a machine without one:
# Triton compiles for an explicit GPUTarget with the ptxas/cuobjdump its wheel ships. Nothing
# here touches Triton's active driver or initializes CUDA; the launchers run on ``meta``
# tensors under ``capture_launches`` (recorded, not run), so no memory is allocated either.

# Per-SM limits used for the occupancy columns (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability", and the CUDA occupancy calculator, cuda_occupancy.h):
SM_LIMITS = {
    80: dict(gpu="A100",
             regs_per_sm=65536,            # 32-bit registers per SM (= max per block)
             reg_subpartitions=4,          # the register file is split over 4 SM sub-partitions
             reg_alloc_unit=256,           # registers are allocated per warp, in units of 256
             max_regs_per_thread=255,
             max_warps_per_sm=64,
             max_blocks_per_sm=32,
             max_threads_per_block=1024,
             smem_per_sm=164 * 1024,       # usable shared memory per SM (largest carveout)
             smem_per_block=163 * 1024,    # opt-in maximum for one block
             smem_reserved_per_block=1024,  # the driver reserves 1 KiB of every block's share
             smem_alloc_unit=128),
    90: dict(gpu="H100",
             regs_per_sm=65536, reg_subpartitions=4, reg_alloc_unit=256, max_regs_per_thread=255,
             max_warps_per_sm=64, max_blocks_per_sm=32, max_threads_per_block=1024,
             smem_per_sm=228 * 1024, smem_per_block=227 * 1024, smem_reserved_per_block=1024,
             smem_alloc_unit=128),
}
AOT_TARGETS = (80, 90)
AOT_ARCHS = (("ViT-B", "vit_base_patch16_224"), ("ViT-g", "vit_giant_patch14_224"))
AOT_BATCHES = (32, 256)
AOT_OPS = ("gather_cubes", "decoder_input", "masked_mse_loss")
AOT_DEFAULT_NAME = "kernels_compile.json"
_CLIP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "u8": torch.uint8}
_ACT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# decoder_input (z, table = pos and mask token) dtypes: autocast or fp32 training keeps the fp32
# table; a model cast to bf16/fp16 has everything in that dtype.
_DEC_DTYPES = (("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"))
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
# torch dtype -> Triton pointer element type, as Triton's JIT mangles it
_TRITON_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
              torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
              torch.int64: "i64", torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # meta kwargs that are not constexprs
_APPROX_DIV = re.compile(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b")
_APPROX_SQRT = re.compile(r"\bsqrt\.approx(?:\.ftz)?\.f32\b")
_EXACT_DIV = re.compile(r"\bdiv\.rn(?:\.ftz)?\.f32\b")


@dataclass
class AotVariant:
    """One launch a launcher made at one setting, reduced to what compiling it needs."""
    op: str
    kernel: str                 # the kernel's function name
    kernel_ref: tuple           # (module, name): workers re-import the JITFunction
    attrs: dict                 # what produced it (arch, B, dtypes, layout, ...)
    signature: dict             # non-constexpr param -> Triton type ("*bf16", "i32", "fp32")
    constexprs: dict            # param -> value: tl.constexpr params and ints specialized to 1
    divisible16: tuple          # params specialized as divisible by 16 (tt.divisibility)
    options: dict               # num_warps (num_stages, ...)
    grid: tuple

    def key(self) -> tuple:
        return (self.kernel_ref, tuple(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                self.divisible16, tuple(sorted(self.options.items())))


def _triton_type(v) -> str:
    if isinstance(v, torch.Tensor):
        if v.dtype not in _TRITON_TY:
            raise TypeError(f"no Triton pointer type for {v.dtype}")
        return "*" + _TRITON_TY[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        if -2 ** 31 <= v < 2 ** 31:
            return "i32"
        return "u64" if 2 ** 63 <= v < 2 ** 64 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(v).__name__} argument")


def launch_to_variant(op: str, launch_rec, attrs: dict) -> AotVariant:
    """Signature, constexprs and specialization of one captured launch, by the rules Triton's JIT
    applies when it compiles that launch: pointers and ints divisible by 16 get
    ``tt.divisibility=16`` (a tensor's address from its data_ptr: meta tensors start at 0 plus
    their offset, and the CUDA caching allocator aligns every block to 512 bytes), ints equal to
    1 become constants, floats are fp32, ``tl.constexpr`` params are compile-time values."""
    kernel, grid, args, meta = launch_rec
    params = kernel.params
    names = [p.name for p in params]
    options = {k: v for k, v in meta.items() if k in _LAUNCH_OPTIONS}
    kw = {k: v for k, v in meta.items() if k not in _LAUNCH_OPTIONS}
    unknown = set(kw) - set(names)
    if unknown:
        raise TypeError(f"{kernel.fn.__name__}: launch keywords {sorted(unknown)} are not kernel parameters")
    bound = dict(zip(names, args))
    bound.update(kw)
    signature, constexprs, div16 = {}, {}, []
    for p in params:
        if p.name not in bound:
            if p.has_default:
                bound[p.name] = p.default
            else:
                raise TypeError(f"{kernel.fn.__name__}: no value for parameter {p.name}")
        v = bound[p.name]
        if p.is_constexpr or v is None:
            constexprs[p.name] = v
            continue
        signature[p.name] = _triton_type(v)
        if p.do_not_specialize or isinstance(v, (bool, float)):
            continue
        if isinstance(v, torch.Tensor):
            if not p.do_not_specialize_on_alignment and v.data_ptr() % 16 == 0:
                div16.append(p.name)
        elif v % 16 == 0:
            if not p.do_not_specialize_on_alignment:
                div16.append(p.name)
        elif v == 1:
            constexprs[p.name] = 1
    return AotVariant(op=op, kernel=kernel.fn.__name__, kernel_ref=(kernel.fn.__module__, kernel.fn.__name__),
                      attrs=attrs, signature=signature, constexprs=constexprs, divisible16=tuple(div16),
                      options=options, grid=tuple(int(g) for g in grid))


def _capture(fn) -> list:
    from vmae_fast.ops._dispatch import capture_launches

    with capture_launches() as rec, torch.no_grad():
        fn()
    return list(rec)


def aot_variants(archs=AOT_ARCHS, batches=AOT_BATCHES, ops_wanted=AOT_OPS) -> tuple[list[AotVariant], list[dict]]:
    """Run the real launchers on meta tensors at every pretraining setting; returns the captured
    variants and notes on settings that launch no kernel."""
    from vmae_fast.masking import num_decoder_tokens, num_encoder_masked
    from vmae_fast.ops.decoder_input import decoder_input_backward_triton, decoder_input_triton
    from vmae_fast.ops.gather_cubes import gather_cubes_triton
    from vmae_fast.ops.masked_mse import masked_mse_loss_backward_triton, masked_mse_loss_triton

    meta = torch.device("meta")
    out: list[AotVariant] = []
    notes: list[dict] = []
    for arch_label, arch in archs:
        cfg = config_for(arch, num_frames=16, img_size=224)
        t, p, N, D = cfg.tubelet_size, cfg.patch_size, cfg.num_tokens, cfg.decoder_embed_dim
        nv = N - num_encoder_masked(cfg.grid, 0.9)
        nd = num_decoder_tokens(cfg.grid, 0.5, 0.9)
        for B in batches:
            base = {"arch": arch_label, "B": B}
            vis = torch.empty((B, nv), dtype=torch.int64, device=meta)
            dec = torch.empty((B, nd), dtype=torch.int64, device=meta)

            def clips():
                for cname, cdt in _CLIP_DTYPES.items():
                    for fname, fmt in _MEMORY_FORMATS.items():
                        yield cname, fname, torch.empty((B, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size),
                                                        dtype=cdt, device=meta, memory_format=fmt)

            if "gather_cubes" in ops_wanted:
                for cname, fname, video in clips():
                    for layout in ("cthw", "thwc"):
                        a = dict(base, n=nv, clip=cname, clip_layout=fname, out=layout)
                        for rec in _capture(lambda: gather_cubes_triton(video, vis, tubelet=t, patch=p, layout=layout)):
                            out.append(launch_to_variant("gather_cubes", rec, a))
            if "decoder_input" in ops_wanted:
                for zname, tname in _DEC_DTYPES:
                    z = torch.empty((B, nv, D), dtype=_ACT_DTYPES[zname], device=meta)
                    pos = torch.empty((1, N, D), dtype=_ACT_DTYPES[tname], device=meta)[0]
                    tok = torch.empty((1, 1, D), dtype=_ACT_DTYPES[tname], device=meta)
                    out_dtype = torch.promote_types(z.dtype, pos.dtype)
                    g = torch.empty((B, nv + nd, D), dtype=out_dtype, device=meta)
                    for pos_kind in ("fixed", "learnable"):
                        a = dict(base, rows=f"{nv}+{nd}", D=D, z=zname, table=tname, pos=pos_kind)
                        for rec in _capture(lambda: decoder_input_triton(z, pos, tok, vis, dec)):
                            out.append(launch_to_variant("decoder_input", rec, {**a, "pass": "fwd"}))
                        recs = _capture(lambda: decoder_input_backward_triton(g, vis, dec, N, pos_kind == "learnable"))
                        for rec in recs:
                            out.append(launch_to_variant("decoder_input", rec, {**a, "pass": "bwd"}))
                        if not recs:
                            notes.append(dict(a, op="decoder_input", **{"pass": "bwd"},
                                              note="no kernel: a fixed table needs only the mask-token "
                                                   "gradient, one torch reduction"))
            if "masked_mse_loss" in ops_wanted:
                w = torch.empty((B, nd), dtype=torch.float32, device=meta)
                gl = torch.empty((), dtype=torch.float32, device=meta)
                for pname, pdt in _ACT_DTYPES.items():
                    pred = torch.empty((B, nd, cfg.cube_numel), dtype=pdt, device=meta)
                    for cname, fname, video in clips():
                        a = dict(base, n=nd, pred=pname, clip=cname, clip_layout=fname)
                        kw = dict(tubelet=t, patch=p, normalize=cfg.normalize_target)
                        for rec in _capture(lambda: masked_mse_loss_triton(pred, video, dec, w, **kw)):
                            out.append(launch_to_variant("masked_mse_loss", rec, {**a, "pass": "fwd"}))
                        for rec in _capture(lambda: masked_mse_loss_backward_triton(gl, pred, video, dec, w, **kw)):
                            out.append(launch_to_variant("masked_mse_loss", rec, {**a, "pass": "bwd"}))
    return out, notes


def dedupe(variants: list[AotVariant]) -> list[tuple[AotVariant, list[dict]]]:
    """Identical compile keys once, each with every setting that produces it (in first-seen order)."""
    groups: dict[tuple, tuple[AotVariant, list[dict]]] = {}
    for v in variants:
        groups.setdefault(v.key(), (v, []))[1].append(v.attrs)
    return list(groups.values())


def _ast_source(kernel, v: AotVariant):
    """``ASTSource`` for both of Triton's APIs: >= 3.3 takes ``constexprs`` (the signature lists
    every param, "constexpr" for compile-time ones) and ``attrs`` keyed by param path; 3.2 takes
    ``constants`` by name and an ``AttrsDescriptor``."""
    import inspect as _inspect

    from triton.compiler import ASTSource

    names = [p.name for p in kernel.params]
    if "constexprs" in _inspect.signature(ASTSource.__init__).parameters:
        from triton.compiler import make_backend
        from triton.backends.compiler import GPUTarget

        sig = {n: ("constexpr" if n in v.constexprs else v.signature[n]) for n in names}
        backend = make_backend(GPUTarget("cuda", 80, 32))  # parse_attr is the same for every CUDA target
        attrs = {(names.index(n),): backend.parse_attr("D") for n in v.divisible16}
        return ASTSource(fn=kernel, signature=sig, constexprs=dict(v.constexprs), attrs=attrs)
    from triton.backends.compiler import AttrsDescriptor  # triton 3.2

    # 3.2's JIT (AttrsDescriptor(params, values)) also tags compile-time values: None and ints
    # divisible by 16 (bools included) get divisibility 16, ints equal to 1 equal_to 1.
    hints = {}
    for i, p in enumerate(kernel.params):
        if p.name in v.constexprs:
            x = v.constexprs[p.name]
            if (x is None or isinstance(x, int) and x % 16 == 0) and not (
                    p.do_not_specialize or p.do_not_specialize_on_alignment):
                hints[i] = 16
            elif isinstance(x, int) and not isinstance(x, bool) and x == 1 and not p.do_not_specialize:
                hints[i] = 1
        elif p.name in v.divisible16:
            hints[i] = 16
    # 3.2's JIT types a None argument "*i8" (a null pointer) and passes it as a constant too
    sig = {n: v.signature.get(n, "*i8") for n in names if not kernel.params[names.index(n)].is_constexpr}
    return ASTSource(fn=kernel, signature=sig, constants=dict(v.constexprs),
                     attrs=AttrsDescriptor.from_hints(hints))


def _triton_tool(name: str) -> str | None:
    import shutil

    import triton

    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    if env and os.path.exists(env):
        return env
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def resource_usage(cubin: bytes, ptx: str, cc: int) -> dict:
    """Registers/thread and local (stack + spill) bytes/thread of a cubin without a GPU: from
    ``cuobjdump --dump-resource-usage`` (the numbers the driver reports as NUM_REGS and
    LOCAL_SIZE_BYTES; Triton's ``n_spills`` is LOCAL_SIZE_BYTES / 4), else ``ptxas -v``."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tool = _triton_tool("cuobjdump")
        if tool:
            f = Path(tmp) / "k.cubin"
            f.write_bytes(cubin)
            r = subprocess.run([tool, "--dump-resource-usage", str(f)], capture_output=True, text=True)
            m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", r.stdout)
            if r.returncode == 0 and m:
                reg, stack, _, local = map(int, m.groups())
                return {"regs": reg, "local_bytes": stack + local, "source": "cuobjdump"}
        tool = _triton_tool("ptxas")
        if not tool:
            raise RuntimeError("neither cuobjdump nor ptxas found (triton's bundled tools are missing)")
        f = Path(tmp) / "k.ptx"
        f.write_text(ptx)
        suffix = "a" if cc >= 90 else ""
        r = subprocess.run([tool, "-v", f"--gpu-name=sm_{cc}{suffix}", str(f), "-o", str(Path(tmp) / "k.o")],
                           capture_output=True, text=True)
        regs = re.search(r"Used (\d+) registers", r.stderr)
        stack = re.search(r"(\d+) bytes stack frame", r.stderr)
        if r.returncode != 0 or not regs:
            raise RuntimeError(f"ptxas -v failed: {r.stderr[-300:]}")
        return {"regs": int(regs.group(1)), "local_bytes": int(stack.group(1)) if stack else 0, "source": "ptxas -v"}


def occupancy(regs: int, shared: int, num_warps: int, cc: int) -> dict:
    """Resident blocks and warps per SM these resources allow (cuda_occupancy.h's arithmetic)."""
    L = SM_LIMITS[cc]
    threads = num_warps * 32
    if threads > L["max_threads_per_block"] or regs > L["max_regs_per_thread"] or shared > L["smem_per_block"]:
        return {"blocks": 0, "warps": 0, "occupancy": 0.0, "limiter": "does not fit"}
    unit = L["reg_alloc_unit"]
    regs_per_warp = -(-max(regs, 1) * 32 // unit) * unit
    per_sub = (L["regs_per_sm"] // L["reg_subpartitions"]) // regs_per_warp
    by = {"warps": L["max_warps_per_sm"] // num_warps, "blocks": L["max_blocks_per_sm"],
          "regs": per_sub * L["reg_subpartitions"] // num_warps}
    if regs_per_warp * num_warps > L["regs_per_sm"]:
        by["regs"] = 0
    cta_smem = -(-(shared + L["smem_reserved_per_block"]) // L["smem_alloc_unit"]) * L["smem_alloc_unit"]
    by["smem"] = L["smem_per_sm"] // cta_smem
    blocks = min(by.values())
    limiter = "+".join(k for k, v in by.items() if v == blocks)
    warps = blocks * num_warps
    return {"blocks": blocks, "warps": warps, "occupancy": warps / L["max_warps_per_sm"], "limiter": limiter}


def ptx_division(ptx: str) -> dict:
    return {"approx_div_f32": len(_APPROX_DIV.findall(ptx)), "approx_sqrt_f32": len(_APPROX_SQRT.findall(ptx)),
            "div_rn_f32": len(_EXACT_DIV.findall(ptx))}


def compile_variant(v: AotVariant, cc: int) -> dict:
    """Compile one variant for ``sm_<cc>`` and measure it; never raises (errors are results)."""
    import contextlib
    import importlib
    import io
    import time

    import triton
    from triton.backends.compiler import GPUTarget

    res: dict = {"target": f"sm_{cc}"}
    t0 = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(v.kernel_ref[0]), v.kernel_ref[1])
        src = _ast_source(kernel, v)
        # Triton prints the whole PTX when ptxas fails: keep it off our table.
        with contextlib.redirect_stdout(io.StringIO()):
            ck = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(v.options))
    except Exception as exc:  # a compile error is a result to report
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        res.update(ok=False, error=" ".join(line.strip() for line in msg[:3])[:300],
                   compile_s=round(time.perf_counter() - t0, 2))
        return res
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    try:
        usage = resource_usage(ck.asm["cubin"], ck.asm["ptx"], cc)
    except Exception as exc:
        res.update(ok=False, error=f"compiled, but resource usage unreadable: {exc}"[:300])
        return res
    shared = int(ck.metadata.shared)
    num_warps = int(ck.metadata.num_warps)
    # spill_bytes: local memory per thread (stack frame, where ptxas spills); Triton's
    # ``n_spills`` (from the driver) is this divided by 4
    res.update(ok=True, regs=usage["regs"], spill_bytes=usage["local_bytes"], usage_from=usage["source"],
               shared=shared, num_warps=num_warps,
               **occupancy(usage["regs"], shared, num_warps, cc), **ptx_division(ck.asm["ptx"]))
    return res


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


def compile_main(ns) -> dict:
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


if __name__ == "__main__":
    main()
