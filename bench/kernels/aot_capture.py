"""--compile-only, step 1: the launchers run at every pretraining setting on ``meta`` tensors
under ``capture_launches`` (recorded, not run: no memory, no CUDA), and each launch becomes a
compile key (``AotVariant``) by the rules Triton's JIT applies.

Ahead-of-time compilation covers every kernel variant the launchers make at the pretraining
shapes, for the GPUs our users have (A100 = sm_80, H100 = sm_90), on a machine without one:
Triton compiles for an explicit GPUTarget with the ptxas/cuobjdump its wheel ships
(``aot_compile.py``). Nothing here touches Triton's active driver or initializes CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vmae_fast.config import config_for

AOT_ARCHS = (("ViT-B", "vit_base_patch16_224"), ("ViT-g", "vit_giant_patch14_224"))
AOT_BATCHES = (32, 256)
AOT_OPS = ("gather_cubes", "decoder_input", "masked_mse_loss")
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
