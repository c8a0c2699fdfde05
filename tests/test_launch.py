"""``ops._dispatch.launch``: the one place the Triton kernels are launched. CUDA launches run under
a guard for the tensors' device (Triton launches on the *current* device); CPU tensors need the
interpreter; ``capture_launches`` records launches without running them."""
from __future__ import annotations

import contextlib

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


def test_backend_choice_follows_the_interpreter_mode(monkeypatch):
    monkeypatch.setenv("VMAE_FAST_KERNELS", "1")
    monkeypatch.setattr(_dispatch, "native_op", lambda name: None)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(_dispatch, "INTERPRETED", False)
    assert (_dispatch.backend(cpu, "x"), _dispatch.backend(cuda, "x")) == ("ref", "triton")
    monkeypatch.setattr(_dispatch, "INTERPRETED", True)
    assert (_dispatch.backend(cpu, "x"), _dispatch.backend(cuda, "x")) == ("triton", "ref")
    monkeypatch.setenv("VMAE_FAST_KERNELS", "0")
    assert (_dispatch.backend(cpu, "x"), _dispatch.backend(cuda, "x")) == ("ref", "ref")
