"""``ops._dispatch.launch``: the one place the Triton kernels are launched. CUDA launches run under
a guard for the tensors' device (Triton launches on the *current* device); CPU tensors need the
interpreter; ``capture_launches`` records launches without running them."""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from vmae_fast.ops import _dispatch

pytestmark = pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="needs triton")


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports ``cuda:1``: enough to drive the launch logic without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 1)


class _Kernel:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("run", grid, meta))
        return run


def test_cuda_launch_runs_under_a_guard_for_the_tensors_device(monkeypatch):
    log = []

    @contextlib.contextmanager
    def fake_guard(device):
        log.append(("enter", torch.device(device)))
        yield
        log.append(("exit", torch.device(device)))

    monkeypatch.setattr(torch.cuda, "device", fake_guard)
    x = torch.empty(3).as_subclass(_OnCuda1)
    _dispatch.launch(_Kernel(log), (4,), 7, x, BLOCK=16, num_warps=4)
    assert log == [("enter", torch.device("cuda", 1)), ("run", (4,), {"BLOCK": 16, "num_warps": 4}),
                   ("exit", torch.device("cuda", 1))]


@pytest.mark.skipif(_dispatch.INTERPRETED, reason="this process interprets the kernels (TRITON_INTERPRET=1)")
def test_cpu_launch_of_a_compiled_kernel_says_how_to_interpret():
    from vmae_fast.ops.gather_cubes import _gather_cubes_kernel
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 before anything imports Triton"):
        _dispatch.launch(_gather_cubes_kernel, (1,), torch.empty(1))


def test_capture_records_and_does_not_run():
    log = []
    with _dispatch.capture_launches() as launches:
        _dispatch.launch(_Kernel(log), (2, 3), torch.empty(2, device="meta"), 5, ROWS=8)
    assert log == []
    assert len(launches) == 1 and launches[0].grid == (2, 3) and launches[0].meta == {"ROWS": 8}
    assert launches[0].args[1] == 5
    assert _dispatch._capture is None  # restored on exit


OPS = ("gather_cubes", "decoder_input", "decoder_input_backward", "masked_mse_loss", "masked_mse_loss_backward")


def test_kernel_paths_name_the_registered_kernels_and_why_not(monkeypatch):
    from vmae_fast import _native
    monkeypatch.setenv("VMAE_FAST_KERNELS", "1")
    paths = _dispatch.kernel_paths()
    assert set(paths) == set(OPS)
    for op in OPS:
        cpu, cuda = paths[op]["cpu"], paths[op]["cuda"]
        if _dispatch.INTERPRETED:
            assert cpu == "triton (interpreter)" and cuda.startswith("reference (this process interprets")
        else:
            assert cpu == ("native" if _native.native_available() else f"reference (native: {_native.unavailable_reason()})")
            assert cuda == "triton"
    monkeypatch.setenv("VMAE_FAST_KERNELS", "0")
    assert all(p.startswith("reference (kernels disabled") for d in _dispatch.kernel_paths().values() for p in d.values())


def test_the_op_equals_its_reference_on_cpu_and_traces_on_meta():
    from vmae_fast import ops
    video = torch.randint(0, 256, (1, 3, 2, 16, 16), dtype=torch.uint8)
    idx = torch.tensor([[0, 3]])
    torch.testing.assert_close(torch.ops.vmae_fast.gather_cubes(video, idx, 2, 8, False),
                               ops.gather_cubes_ref(video, idx, tubelet=2, patch=8), rtol=0, atol=0)
    out = torch.ops.vmae_fast.gather_cubes(video.to("meta"), idx.to("meta"), 2, 8, False)
    assert out.device.type == "meta" and out.shape == (1, 2, 3 * 2 * 8 * 8) and out.dtype == torch.float32


@pytest.mark.parametrize("debug", [False, True])
def test_the_registered_kernels_do_not_validate_again(monkeypatch, debug):
    """The public op validates; the Triton launcher it dispatches to (``checked=True``) does not
    repeat it on a GPU, unless VMAE_FAST_DEBUG asks (a compiled graph skips the wrapper's value
    check). Called directly (``checked=False``), a launcher validates. Meta tensors stand in for
    CUDA ones: ``capture_launches`` records the launches."""
    # the modules (vmae_fast.ops exports functions of the same names)
    gc, di, mm = (importlib.import_module(f"vmae_fast.ops.{m}") for m in ("gather_cubes", "decoder_input", "masked_mse"))

    monkeypatch.setenv("VMAE_FAST_DEBUG", "1" if debug else "0")
    calls = []
    for mod in (gc, di, mm):
        monkeypatch.setattr(mod, "_validate", lambda *a, _m=mod.__name__: calls.append(_m))
    meta = torch.device("meta")
    B, N, n_vis, n_dec, D = 2, 8, 3, 4, 16
    video = torch.empty(B, 3, 4, 8, 8, device=meta)   # T=4, 8x8 frames, tubelet 2, patch 4: N = 8
    vis = torch.zeros(B, n_vis, dtype=torch.int64, device=meta)
    dec = torch.zeros(B, n_dec, dtype=torch.int64, device=meta)
    z, pos, mt = (torch.empty(B, n_vis, D, device=meta), torch.empty(N, D, device=meta),
                  torch.empty(D, device=meta))
    pred = torch.empty(B, n_dec, 3 * 2 * 4 * 4, device=meta)
    weight = torch.ones(B, n_dec, device=meta)
    with _dispatch.capture_launches() as rec:
        for checked in (True, False):
            gc.gather_cubes_triton(video, vis, tubelet=2, patch=4, checked=checked)
            di.decoder_input_triton(z, pos, mt, vis, dec, checked=checked)
            mm.masked_mse_loss_triton(pred, video, dec, weight, tubelet=2, patch=4, checked=checked)
            mm.masked_mse_loss_backward_triton(torch.ones((), device=meta), pred, video, dec, weight,
                                               tubelet=2, patch=4, checked=checked)
    assert len(rec) == 8  # every launcher launched, checked or not
    per_pass = [gc.__name__, di.__name__, mm.__name__, mm.__name__]
    assert calls == (per_pass if debug else []) + per_pass


def test_the_registered_adapters_pass_checked_and_direct_calls_validate(monkeypatch):
    """The kernels registered for the ops (``_triton*`` adapters) call their launchers with
    ``checked=True`` (the public op validated), so on a GPU (meta here) nothing validates twice;
    a launcher called without ``checked`` validates."""
    gc, di, mm = (importlib.import_module(f"vmae_fast.ops.{m}") for m in ("gather_cubes", "decoder_input", "masked_mse"))
    monkeypatch.setenv("VMAE_FAST_DEBUG", "0")
    calls = []
    for mod in (gc, di, mm):
        monkeypatch.setattr(mod, "_validate", lambda *a, _m=mod.__name__: calls.append(_m))
    meta = torch.device("meta")
    video = torch.empty(2, 3, 4, 8, 8, device=meta)
    vis, dec = torch.zeros(2, 3, dtype=torch.int64, device=meta), torch.zeros(2, 4, dtype=torch.int64, device=meta)
    z, pos, mt = torch.empty(2, 3, 16, device=meta), torch.empty(8, 16, device=meta), torch.empty(16, device=meta)
    pred, weight = torch.empty(2, 4, 96, device=meta), torch.ones(2, 4, device=meta)
    with _dispatch.capture_launches() as rec:
        for thwc in (False, True):
            gc._triton(video, vis, 2, 4, thwc)
        di._triton_fwd(z, pos, mt, vis, dec)
        mm._triton_fwd(pred, video, dec, weight, 2, 4, True, 1e-6)
        mm._triton_bwd(torch.ones((), device=meta), pred, video, dec, weight, 2, 4, True, 1e-6)
        assert calls == [] and len(rec) == 5
        assert [r.meta["THWC"] for r in rec[:2]] == [False, True]
        gc.gather_cubes_triton(video, vis, tubelet=2, patch=4)
        di.decoder_input_triton(z, pos, mt, vis, dec)
        mm.masked_mse_loss_triton(pred, video, dec, weight, tubelet=2, patch=4)
        mm.masked_mse_loss_backward_triton(torch.ones((), device=meta), pred, video, dec, weight, tubelet=2, patch=4)
    assert calls == [gc.__name__, di.__name__, mm.__name__, mm.__name__]
