"""--compile-only, step 2: one compile key (``aot_capture.AotVariant``) compiled for one target
(``sm_80``/``sm_90``) without a GPU, and what the compiled kernel needs: registers and spills
(``cuobjdump``, else ``ptxas -v``), shared memory, the occupancy they allow, approximate fp32
divisions in its PTX."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .aot_capture import AotVariant

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
_APPROX_DIV = re.compile(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b")
_APPROX_SQRT = re.compile(r"\bsqrt\.approx(?:\.ftz)?\.f32\b")
_EXACT_DIV = re.compile(r"\bdiv\.rn(?:\.ftz)?\.f32\b")


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
