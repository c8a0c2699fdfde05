"""The native CPU extension ``vmae_fast._C`` against the pure-PyTorch ``*_ref`` ops.

The tests of the extension skip only when it is really not built (or ``VMAE_FAST_NO_EXT=1``);
a library that is built but cannot serve the running torch (built for another torch, or failing
to load) fails them, with the loader's reason. The loader's states (not built / broken / disabled,
one warning and ``None`` each) are tested in any case, on fake libraries in a temporary folder.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

from vmae_fast import _native
from vmae_fast.ops import cube_targets_ref, decoder_input_ref, gather_cubes_ref, masked_mse_loss_ref

from tolerances import KERNEL_TOL


def test_no_ext_env_falls_back_without_a_warning(monkeypatch):
    monkeypatch.setenv("VMAE_FAST_NO_EXT", "1")
    _native.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _native.native_ops() is None
            assert _native.native_ops() is None
            assert not _native.native_available()
        assert [str(w.message) for w in caught] == []  # the user opted out: nothing to warn about
        assert _native.unavailable_reason() == "VMAE_FAST_NO_EXT is set"
        assert _native.status() == ("disabled", "VMAE_FAST_NO_EXT is set")
    finally:
        monkeypatch.delenv("VMAE_FAST_NO_EXT")
        _native.cache_clear()


# ------------------------------------------------------------- not built vs built but not loading

@pytest.fixture
def fake_lib_dir(tmp_path, monkeypatch):
    """The loader looking in an empty folder, as if no library had been loaded in this process."""
    monkeypatch.delenv("VMAE_FAST_NO_EXT", raising=False)
    monkeypatch.setattr(_native, "LIB_DIR", tmp_path)
    monkeypatch.setattr(_native, "_registered", lambda: False)
    _native.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    _native.cache_clear()


def _state_and_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _native.native_ops() is None
        assert _native.native_ops() is None
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert str(caught[0].message).endswith(_native.BUILD_COMMAND)
    st = _native.status()
    assert st.reason in str(caught[0].message)
    return st


def test_nothing_built_is_not_built(fake_lib_dir):
    (fake_lib_dir / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"unversioned name: ignored")
    st = _state_and_one_warning()
    assert st.state == "not_built" and "is not built" in st.reason, st


def test_library_failing_to_load_is_broken(fake_lib_dir):
    path = _native.library_path()  # the name of a build for the running torch, but not a library
    assert path.parent == fake_lib_dir and torch.__version__ in path.name
    path.write_bytes(b"\x7fELF but truncated")
    st = _state_and_one_warning()
    assert st.state == "broken", st
    assert f"{path.name}, built for torch {torch.__version__} (the running torch), does not load:" in st.reason
    assert str(path) in st.reason  # the dlopen error names the file and says what is wrong with it


def test_library_built_for_another_torch_only_is_broken(fake_lib_dir):
    other = _native.library_path("1.2.3+cpu")
    other.write_bytes(b"never loaded")
    assert _native.built_libraries() == {"1.2.3+cpu": other}
    st = _state_and_one_warning()
    assert st.state == "broken", st
    assert (f"built for torch 1.2.3+cpu ({other.name}), but the running torch is {torch.__version__}"
            in st.reason)
    assert "--no-deps" in st.reason


def test_library_name_is_per_torch_version():
    assert _native.library_name("2.6.0") != _native.library_name("2.6.0+cpu") != _native.library_name("2.14.1")
    assert _native.library_path().name == _native.library_name(torch.__version__)
    assert "/" not in _native.library_name("2.6.0/../x")


def native(test):
    """A test of the extension: skipped when it is not built (or disabled), FAILED with the
    loader's reason when it is built but cannot serve the running torch."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        st = _native.status()
        if st.state in ("not_built", "disabled"):
            pytest.skip(f"vmae_fast._C not built: {st.reason}")
        if st.state != "loaded":
            pytest.fail(f"vmae_fast._C does not work under torch {torch.__version__}: {st.reason}", pytrace=False)
        return test(*args, **kwargs)
    return run


@pytest.fixture
def ops():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # when None, the test fails or skips, saying why
        return _native.native_ops()


def _clip(B, T, H, W, dtype, *, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        v = torch.randint(0, 256, (B, 3, T, H, W), generator=g, dtype=torch.uint8)
    else:
        v = torch.randn(B, 3, T, H, W, generator=g, dtype=torch.float64).to(dtype)
    if strided:  # channels-last-3d-like storage plus a stepped W: no unit stride anywhere
        big = torch.empty(B, T, H, 2 * W, 3, dtype=dtype).permute(0, 4, 1, 2, 3)[..., ::2]
        big.copy_(v)
        assert not big.is_contiguous()
        v = big
    return v


def _idx(B, n, N, seed=0, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:n].sort().values for _ in range(B)]).to(dtype)


# --------------------------------------------------------------------------------- gather_cubes

@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("layout", ["cthw", "thwc"])
def test_gather_cubes_matches_ref(ops, dtype, strided, layout):
    B, T, H, W, t, p = 3, 6, 12, 20, 2, 4  # grid 3x3x5 = 45 tokens, n = 13
    v = _clip(B, T, H, W, dtype, strided=strided)
    idx = _idx(B, 13, 45, dtype=torch.int32 if strided else torch.int64)
    got = ops.gather_cubes_cpu(v, idx, t, p, layout == "thwc")
    ref = gather_cubes_ref(v, idx, tubelet=t, patch=p, layout=layout)
    assert got.dtype == ref.dtype and got.shape == ref.shape == (B, 13, 3 * t * p * p)
    assert torch.equal(got, ref)  # a copy / the same float32 arithmetic: bit-exact


@native
def test_gather_cubes_empty_and_single(ops):
    v = _clip(1, 2, 4, 4, torch.float32)
    assert ops.gather_cubes_cpu(v, torch.zeros(1, 0, dtype=torch.long), 2, 4, False).shape == (1, 0, 96)
    got = ops.gather_cubes_cpu(v, torch.zeros(1, 1, dtype=torch.long), 2, 4, True)
    assert torch.equal(got, gather_cubes_ref(v, torch.zeros(1, 1, dtype=torch.long), tubelet=2, patch=4,
                                             layout="thwc"))


# -------------------------------------------------------------------------------- decoder_input

def _decoder_case(B, N, n_vis, n_dec, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    vis = perm[:, :n_vis].sort(dim=1).values
    dec = perm[:, N - n_dec:].sort(dim=1).values  # may overlap vis when n_vis + n_dec > N
    z = torch.randn(B, n_vis, D, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.randn(D, generator=g, dtype=torch.float64).to(dtype)
    return z, pos, mask, vis, dec


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,N,n_vis,n_dec,D", [(1, 30, 7, 11, 72), (2, 45, 13, 40, 100), (3, 9, 0, 9, 72)])
def test_decoder_input_fwd_bwd_match_autograd(ops, dtype, B, N, n_vis, n_dec, D):
    z, pos, mask, vis, dec = _decoder_case(B, N, n_vis, n_dec, D, dtype)
    got = ops.decoder_input_fwd_cpu(z, pos, mask, vis, dec)
    zr, pr, mr = (x.clone().requires_grad_() for x in (z, pos, mask))
    ref = decoder_input_ref(zr, pr, mr, vis, dec)
    assert got.dtype == ref.dtype and torch.equal(got, ref)

    g = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ref.backward(g)
    gm, gp = ops.decoder_input_bwd_cpu(g, vis, dec, N, True)
    atol, rtol = KERNEL_TOL[dtype]
    torch.testing.assert_close(gm, mr.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(gp, pr.grad, atol=atol, rtol=rtol)
    assert ops.decoder_input_bwd_cpu(g, vis, dec, N, False)[1].numel() == 0


@native
def test_decoder_input_mixed_dtypes_and_3d_mask_token(ops):
    z, pos, mask, vis, dec = _decoder_case(2, 20, 5, 9, 72, torch.float32)
    z16 = z.bfloat16()
    got = ops.decoder_input_fwd_cpu(z16, pos, mask.view(1, 1, -1), vis, dec)
    ref = decoder_input_ref(z16, pos, mask.view(1, 1, -1), vis, dec)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    got = ops.decoder_input_fwd_cpu(z16, pos.bfloat16(), mask.bfloat16(), vis.int(), dec.int())
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, decoder_input_ref(z16, pos.bfloat16(), mask.bfloat16(), vis, dec))


@native
def test_decoder_input_bwd_is_deterministic(ops):
    _, _, _, vis, dec = _decoder_case(3, 45, 30, 40, 100, torch.float32)
    g = torch.randn(3, 70, 100)
    first = ops.decoder_input_bwd_cpu(g, vis, dec, 45, True)
    for _ in range(3):
        again = ops.decoder_input_bwd_cpu(g, vis, dec, 45, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


# ----------------------------------------------------------------------------------- masked_mse

def _mse_case(B, n, dtype, video_dtype, *, strided=False, seed=0):
    T, H, W, t, p = 4, 12, 8, 2, 4  # grid 2x3x2 = 12 tokens
    v = _clip(B, T, H, W, video_dtype, strided=strided, seed=seed)
    idx = _idx(B, n, 12, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    pred = torch.randn(B, n, 3 * t * p * p, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.rand(B, n, generator=g) > 0.3).float()
    return pred, v, idx, w, t, p


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("video_dtype,strided", [(torch.float32, False), (torch.float64, True),
                                                 (torch.uint8, False), (torch.uint8, True),
                                                 (torch.bfloat16, False)])
@pytest.mark.parametrize("normalize", [True, False])
def test_masked_mse_fwd_bwd_match_autograd(ops, dtype, video_dtype, strided, normalize):
    B, n = 3, 7
    pred, v, idx, w, t, p = _mse_case(B, n, dtype, video_dtype, strided=strided)
    w[0, 1] = 0.0
    w[1, 2] = 2.5  # non-binary weights
    pr = pred.clone().requires_grad_()
    ref = masked_mse_loss_ref(pr, v, idx, w, tubelet=t, patch=p, normalize=normalize, eps=1e-6)
    got = ops.masked_mse_fwd_cpu(pred, v, idx, w, t, p, normalize, 1e-6)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-6)

    gl = torch.tensor(0.7)
    ref.backward(gl)
    grad = ops.masked_mse_bwd_cpu(gl, pred, v, idx, w, t, p, normalize, 1e-6)
    assert grad.dtype == dtype and grad.shape == pred.shape
    torch.testing.assert_close(grad, pr.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(grad[0, 1] == 0)


@native
def test_masked_mse_targets_odd_cube(ops):
    # t*p*p = 3*1*1 pixels per cube: checks the unbiased variance against cube_targets_ref directly
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 3, 6, 5, 3, generator=g)
    idx = _idx(2, 11, 2 * 5 * 3)
    target = cube_targets_ref(v, idx, tubelet=3, patch=1)
    w = torch.ones(2, 11)
    # pred = target + delta  ->  loss = mean(delta^2) exactly when the targets agree
    delta = torch.randn(target.shape, generator=g) * 0.1
    got = ops.masked_mse_fwd_cpu(target + delta, v, idx, w, 3, 1, True, 1e-6)
    torch.testing.assert_close(got, delta.pow(2).mean(), rtol=1e-4, atol=1e-6)


@native
def test_masked_mse_zero_weights(ops):
    pred, v, idx, w, t, p = _mse_case(2, 5, torch.float32, torch.uint8)
    w.zero_()
    loss = ops.masked_mse_fwd_cpu(pred, v, idx, w, t, p, True, 1e-6)
    assert loss.item() == 0.0
    assert loss.item() == masked_mse_loss_ref(pred, v, idx, w, tubelet=t, patch=p).item()
    grad = ops.masked_mse_bwd_cpu(torch.tensor(1.0), pred, v, idx, w, t, p, True, 1e-6)
    assert torch.count_nonzero(grad) == 0
    # and no rows at all
    empty = ops.masked_mse_fwd_cpu(pred[:, :0], v, idx[:, :0], w[:, :0], t, p, True, 1e-6)
    assert empty.item() == 0.0


# ---------------------------------------------------------------------------------- bad inputs

@native
def test_bad_inputs_raise_clear_errors(ops):
    v = _clip(2, 4, 8, 8, torch.float32)
    idx = _idx(2, 3, 8)
    cases = [
        (lambda: ops.gather_cubes_cpu(v[0], idx, 2, 4, False),
         r"video must be \(B, C, T, H, W\), got shape \[3, 4, 8, 8\]"),
        (lambda: ops.gather_cubes_cpu(v, idx, 3, 4, False), r"does not divide into cubes of 3x4x4"),
        (lambda: ops.gather_cubes_cpu(v.int(), idx, 2, 4, False), r"floating point .* or uint8 .*, got Int"),
        (lambda: ops.gather_cubes_cpu(v, idx + 6, 2, 4, False),
         r"idx holds token indices in \[\d+, 13\], expected \[0, 8\)"),
        (lambda: ops.gather_cubes_cpu(v, -idx - 1, 2, 4, False), r"expected \[0, 8\)"),
        (lambda: ops.gather_cubes_cpu(v, idx.float(), 2, 4, False), r"idx must be int64 or int32, got Float"),
        (lambda: ops.gather_cubes_cpu(v, idx[:1], 2, 4, False), r"idx must have shape \(2, n\), got \[1, 3\]"),
        (lambda: ops.gather_cubes_cpu(v[:, :2].to(torch.uint8), idx, 2, 4, False), r"3 channels"),
        (lambda: ops.decoder_input_fwd_cpu(torch.randn(2, 3, 8), torch.randn(8, 9), torch.randn(8), idx, idx),
         r"pos must be \(N, 8\), got shape \[8, 9\]"),
        (lambda: ops.decoder_input_fwd_cpu(torch.randn(2, 3, 8), torch.randn(8, 8), torch.randn(7), idx, idx),
         r"mask_token must be \(8,\)"),
        (lambda: ops.decoder_input_fwd_cpu(torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(8), idx, idx),
         r"visible_idx holds token indices in .*, expected \[0, 5\)"),
        (lambda: ops.decoder_input_bwd_cpu(torch.randn(2, 5, 8), idx, idx, 8, True),
         r"grad_out has 5 rows per sample, expected n_vis \+ n_dec = 3 \+ 3 = 6"),
        (lambda: ops.masked_mse_fwd_cpu(torch.randn(2, 3, 95), v, idx, torch.ones(2, 3), 2, 4, True, 1e-6),
         r"pred must be \(2, n, 96\)"),
        (lambda: ops.masked_mse_fwd_cpu(torch.randn(2, 3, 96), v, idx, torch.ones(2, 4), 2, 4, True, 1e-6),
         r"weight must have shape \(2, 3\), got \[2, 4\]"),
        (lambda: ops.masked_mse_bwd_cpu(torch.ones(2), torch.randn(2, 3, 96), v, idx, torch.ones(2, 3), 2, 4,
                                        True, 1e-6), r"grad_loss must be a scalar"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


@native
def test_ops_reject_non_cpu_tensors(ops):
    v = _clip(1, 2, 4, 4, torch.float32).to("meta")
    with pytest.raises((NotImplementedError, RuntimeError, ValueError), match="gather_cubes_cpu"):
        ops.gather_cubes_cpu(v, torch.zeros(1, 1, dtype=torch.long), 2, 4, False)


@native
def test_library_built_for_another_torch_is_refused(monkeypatch):
    built_for = torch.__version__
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    _native.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _native.native_ops() is None
        assert len(caught) == 1, [str(w.message) for w in caught]
        st = _native.status()
        assert st.state == "broken" and "0.0.0-other" in st.reason and built_for in st.reason, st
    finally:
        monkeypatch.undo()
        _native.cache_clear()
    assert _native.native_available()


@native
def test_masked_mse_bool_weight_matches_float(ops):
    pred, v, idx, w, t, p = _mse_case(2, 6, torch.float32, torch.float32, seed=5)
    a = ops.masked_mse_fwd_cpu(pred, v, idx, w.bool(), t, p, True, 1e-6)
    b = ops.masked_mse_fwd_cpu(pred, v, idx, w, t, p, True, 1e-6)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, masked_mse_loss_ref(pred, v, idx, w.bool(), tubelet=t, patch=p), rtol=2e-6,
                               atol=1e-6)


@native
def test_registered_ops_pass_opcheck_on_the_native_path(monkeypatch):
    """The ``vmae_fast::*`` ops (fake functions, autograd registration, schemas) with their CPU
    implementation dispatching to the extension, not to Triton or the reference."""
    from vmae_fast.ops import _dispatch

    monkeypatch.setenv("VMAE_FAST_KERNELS", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _dispatch.kernel_paths()["gather_cubes"]["cpu"] == "native"
    g = torch.Generator().manual_seed(0)

    def idx(B, n, N):
        return torch.stack([torch.randperm(N, generator=g)[:n].sort().values for _ in range(B)])

    ops = torch.ops.vmae_fast
    for video in (torch.randn(2, 3, 4, 16, 24), torch.randint(0, 256, (2, 3, 4, 16, 24), dtype=torch.uint8)):
        torch.library.opcheck(ops.gather_cubes.default, (video, idx(2, 3, 12), 2, 8, True))
    z, pos = torch.randn(2, 3, 24, requires_grad=True), torch.randn(10, 24, requires_grad=True)
    mt = torch.randn(24, requires_grad=True)
    vis, dec = idx(2, 3, 10), idx(2, 4, 10)
    torch.library.opcheck(ops.decoder_input.default, (z, pos, mt, vis, dec))
    torch.library.opcheck(ops.decoder_input_backward.default, (torch.randn(2, 7, 24), vis, dec, 10, True))
    video, didx = torch.randn(2, 3, 4, 16, 24), idx(2, 5, 12)
    pred, w = torch.randn(2, 5, 384, requires_grad=True), torch.rand(2, 5)
    torch.library.opcheck(ops.masked_mse_loss.default, (pred, video, didx, w, 2, 8, True, 1e-6))
    torch.library.opcheck(ops.masked_mse_loss_backward.default,
                          (torch.tensor(0.7), pred.detach(), video, didx, w, 2, 8, True, 1e-6))


@native
def test_compile_fullgraph_through_the_native_ops(monkeypatch):
    """torch.compile traces the model with the extension as the CPU backend, even when the first
    call asking for the extension is the traced one (the probe itself cannot be traced)."""
    import vmae_fast
    from vmae_fast.ops import _dispatch

    monkeypatch.setenv("VMAE_FAST_KERNELS", "1")
    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", num_frames=4, img_size=32, depth=1,
                                            decoder_depth=1, embed_dim=48, num_heads=2, decoder_embed_dim=32,
                                            decoder_num_heads=2, patch_size=8, learnable_pos_embed=True)
    video = torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8)
    masks = model.sample_masks(2, encoder_ratio=0.75, decoder_ratio=0.5)

    def step(fn):
        model.zero_grad(set_to_none=True)
        out = fn(video, masks)
        out.loss.backward()
        return out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    torch._dynamo.reset()
    _native.cache_clear()  # the traced call is the first to ask
    got = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert _dispatch.kernel_paths()["gather_cubes"]["cpu"] == "native"
    loss, grads = step(model)
    torch.testing.assert_close(got[0], loss, atol=1e-5, rtol=1e-4)
    for k in grads:
        torch.testing.assert_close(got[1][k], grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_loader_file_loads_standalone_as_setup_py_loads_it():
    # setup.py names the library through this file without importing the package (no parent
    # package, so no relative imports at module level).
    import importlib.util
    spec = importlib.util.spec_from_file_location("_native_standalone", _native.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.library_name(torch.__version__) == _native.library_name(torch.__version__)


def test_without_the_extension_a_train_step_runs_through_the_op_references():
    """``VMAE_FAST_NO_EXT=1`` (or a machine where the extension did not build): on CPU every fused
    op (forward and backward) runs the body of its ``torch.library`` op, the reference. Those
    bodies run below autograd, so none may differentiate itself: the step's loss and gradients
    equal plain autograd through the references (``use_kernels(False)``)."""
    import os
    import subprocess
    import sys

    code = """
import torch, vmae_fast
from vmae_fast import ops
from vmae_fast.ops import _dispatch
assert all(p['cpu'].startswith('reference') for p in _dispatch.kernel_paths().values()), _dispatch.kernel_paths()
torch.manual_seed(0)
model = vmae_fast.create_pretrain_model('vit_small_patch16_224', depth=2, decoder_depth=1, num_frames=4,
                                        img_size=32, patch_size=8, embed_dim=48, num_heads=2,
                                        decoder_embed_dim=32, decoder_num_heads=2)
for video in (torch.randn(2, 3, 4, 32, 32), torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8)):
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.75, 0.5)
    runs = []
    for kernels in (True, False):
        model.zero_grad(set_to_none=True)
        with ops.use_kernels(kernels):
            loss = model(video, masks).loss
            loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = runs
    assert torch.equal(l1, l2), (l1, l2)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-7, msg=n)
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**env, "VMAE_FAST_NO_EXT": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
