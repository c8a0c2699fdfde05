"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) on this GPU-less machine, and
its resources fit: no spills, registers within the SM's register file, shared memory within the
per-block limit, IEEE fp32 division only (no ``div.full``/``div.approx`` in the PTX).

One variant per kernel (ViT-g shapes, the largest blocks), captured from the real launchers on
``meta`` tensors; ``python -m bench.kernels --compile-only`` covers all of them. Nothing here
touches Triton's active driver or CUDA.
"""
from __future__ import annotations

import pytest
import torch

from vmae_fast.ops import _dispatch

if not _dispatch.HAS_TRITON:
    pytest.skip("needs the 'triton' package (not installed)", allow_module_level=True)
if _dispatch.INTERPRETED:
    pytest.skip("Triton was imported with TRITON_INTERPRET=1: its kernels are interpreter functions "
                "here and cannot be compiled (this test runs in the normal pytest process)",
                allow_module_level=True)

from bench import kernels as bk  # noqa: E402  (after the skips: imports the kernels)
from bench.kernels import aot_capture as cap  # noqa: E402
from bench.kernels import aot_compile as comp  # noqa: E402

# (kernel, pass) -> the one setting compiled here: ViT-g (P = 1176, D = 512), bf16 activations,
# an fp32 channels-last clip for the strided loads.
PICK = {
    ("_gather_cubes_kernel", None): dict(clip="u8", clip_layout="channels_last", out="cthw"),
    ("_decoder_input_fwd_kernel", "fwd"): dict(z="bf16", table="fp32"),
    ("_decoder_input_bwd_pos_kernel", "bwd"): dict(z="bf16", table="fp32", pos="learnable"),
    ("_masked_mse_kernel", "fwd"): dict(pred="bf16", clip="fp32", clip_layout="channels_last"),
    ("_masked_mse_kernel", "bwd"): dict(pred="bf16", clip="fp32", clip_layout="channels_last"),
}


def _driver_state():
    """Whether Triton's driver was created (None when this Triton's layout is unknown)."""
    from triton.runtime import driver as cfg

    if hasattr(cfg, "_active") and hasattr(cfg, "_default"):  # triton >= 3.3
        return cfg._active is not None or cfg._default is not None
    default = getattr(cfg, "default", None)  # triton 3.2: a LazyProxy
    if default is not None and "_obj" in vars(default):
        return vars(default)["_obj"] is not None
    return None


@pytest.fixture(scope="module")
def variants():
    found, _ = cap.aot_variants(archs=cap.AOT_ARCHS[1:], batches=(32,))
    picked = {}
    for v in found:
        key = (v.kernel, v.attrs.get("pass"))
        want = PICK.get(key)
        if want is not None and key not in picked and all(v.attrs.get(k) == x for k, x in want.items()):
            picked[key] = v
    assert set(picked) == set(PICK), f"no launch captured for {set(PICK) - set(picked)}"
    return picked


@pytest.fixture(scope="module")
def compiled(variants):
    driver_before = _driver_state()
    cuda_before = torch.cuda.is_initialized()
    out = {(key, cc): comp.compile_variant(v, cc) for key, v in variants.items() for cc in comp.AOT_TARGETS}
    if driver_before is False:
        assert _driver_state() is False, "ahead-of-time compilation created Triton's active driver"
    if not cuda_before:
        assert not torch.cuda.is_initialized(), "ahead-of-time compilation initialized CUDA"
    return out


@pytest.mark.parametrize("cc", comp.AOT_TARGETS, ids=lambda cc: f"sm_{cc}")
@pytest.mark.parametrize("key", list(PICK), ids=lambda k: k[0].strip("_") + (f"-{k[1]}" if k[1] else ""))
def test_kernel_compiles_and_fits(compiled, key, cc):
    r = compiled[(key, cc)]
    assert r["ok"], r.get("error")
    limits = comp.SM_LIMITS[cc]
    threads = r["num_warps"] * 32
    assert r["spill_bytes"] == 0, f"{r['spill_bytes']} bytes of local memory (spills) per thread"
    assert 0 < r["regs"] <= limits["max_regs_per_thread"]
    assert r["regs"] * threads <= limits["regs_per_sm"], (r["regs"], threads)
    assert r["shared"] <= limits["smem_per_block"], r["shared"]
    assert r["blocks"] >= 1 and 0 < r["occupancy"] <= 1, r
    assert r["approx_div_f32"] == 0, "approximate fp32 division (div.full/div.approx.f32) in the PTX"
    assert r["approx_sqrt_f32"] == 0, "approximate fp32 square root in the PTX"


def test_divisions_are_round_to_nearest(compiled):
    """The kernels that divide in fp32 (uint8 normalization, the loss) do it with div.rn: the
    scan of the PTX is not vacuous."""
    for cc in comp.AOT_TARGETS:
        assert compiled[(("_gather_cubes_kernel", None), cc)]["div_rn_f32"] > 0
        assert compiled[(("_masked_mse_kernel", "fwd"), cc)]["div_rn_f32"] > 0


def test_occupancy_arithmetic():
    # 32 regs x 128 threads: warps limit 16 blocks; 40 regs -> 1280 regs/warp, 12 warps per
    # sub-partition -> 48 warps = 12 blocks; 255 regs x 1024 threads does not fit.
    assert comp.occupancy(32, 0, 4, 80)["blocks"] == 16
    r = comp.occupancy(40, 0, 4, 80)
    assert (r["blocks"], r["warps"], r["limiter"]) == (12, 48, "regs")
    assert comp.occupancy(255, 0, 32, 90)["blocks"] == 0
    # shared memory: 100 KiB + 1 KiB reserved per block -> 1 block on sm_80, 2 on sm_90
    assert comp.occupancy(32, 100 * 1024, 4, 80)["blocks"] == 1
    assert comp.occupancy(32, 100 * 1024, 4, 90)["blocks"] == 2
    assert comp.occupancy(32, 200 * 1024, 4, 80)["limiter"] == "does not fit"


def test_signature_follows_the_launch(variants):
    """Pointer dtypes, ints specialized to 1 and tl.constexpr values come from the captured launch."""
    v = variants[("_masked_mse_kernel", "bwd")]
    assert v.signature["pred_ptr"] == "*bf16" and v.signature["video_ptr"] == "*fp32"
    assert v.signature["idx_ptr"] == "*i64" and v.signature["eps"] == "fp32"
    assert v.constexprs["s_vc"] == 1 and "s_vw" not in v.constexprs  # channels-last clip
    assert v.constexprs["BACKWARD"] is True and v.constexprs["PATCH"] == 14
    assert v.options == {"num_warps": 8}


def _jit_specialization(kernel, args, meta):
    """``{param: (type or "constexpr", value or divisible-by-16)}`` as Triton's own JIT derives it
    when it compiles this launch (its binder; no driver: the backend is made from a target)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 80, 32))
    kw = {k: v for k, v in meta.items() if k not in cap._LAUNCH_OPTIONS}
    names = [p.name for p in kernel.params]
    values = dict(zip(names, args), **kw)
    values = [values[n] if n in values else p.default for n, p in zip(names, kernel.params)]
    if hasattr(backend, "get_attrs_descriptor"):  # triton 3.2: AttrsDescriptor + mangle_type
        from triton.runtime.jit import mangle_type

        attrs = backend.get_attrs_descriptor(kernel.params, values)
        div, ones = set(attrs.arg_properties["tt.divisibility"]), set(attrs.get_constants())
        out = {}
        for p, v in zip(kernel.params, values):
            if p.is_constexpr or p.num in ones or v is None:
                out[p.name] = ("constexpr", v)
            else:
                out[p.name] = (mangle_type(v), p.num in div)
        return out
    from triton.runtime.jit import create_function_from_signature  # triton >= 3.3

    _, spec, _ = create_function_from_signature(kernel.signature, kernel.params, backend)(*args, **meta)
    return {n: (s[0], s[1] if s[0] == "constexpr" else s[1] == "D") for n, s in zip(names, spec)}


def test_compile_keys_are_the_jits(monkeypatch):
    """What ``bench.kernels`` compiles (signature, constants, divisibility) is what Triton's JIT
    would compile for the same launch on a GPU, for every launch at the ViT-g shapes."""
    launches = []
    real = cap.launch_to_variant

    def recording(op, rec, attrs):
        launches.append(rec)
        return real(op, rec, attrs)

    monkeypatch.setattr(cap, "launch_to_variant", recording)
    variants, _ = cap.aot_variants(archs=cap.AOT_ARCHS[1:], batches=(32,))
    assert len(variants) == len(launches) > 0
    for v, (kernel, _, args, meta) in zip(variants, launches):
        mine = {n: ("constexpr", v.constexprs[n]) if n in v.constexprs else (v.signature[n], n in v.divisible16)
                for n in (p.name for p in kernel.params)}
        assert mine == _jit_specialization(kernel, args, meta), (v.kernel, v.attrs)


def test_compile_only_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "compile.json"
    result = bk.main(["--compile-only", "--only", "decoder_input", "--arch", "vit_b", "--batch", "32",
                      "--jobs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    import json

    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(result["rows"], default=str))
    # fwd: 5 (z, table) dtype pairs, fixed and learnable tables compile the same; bwd: learnable
    # only, one per grad dtype
    kernels = [r["kernel"] for r in data["rows"]]
    assert kernels.count("_decoder_input_fwd_kernel") == 5 and kernels.count("_decoder_input_bwd_pos_kernel") == 3
    assert all(t["ok"] for r in data["rows"] for t in r["targets"].values())
    assert set(data["rows"][0]["targets"]) == {"sm_80", "sm_90"} and data["sm_limits"]
    assert "| kernel | arch | compiles |" in printed and "compiled on a CPU-only machine, not run" in printed
    assert "no kernel: a fixed table" in printed
