"""Shared fixtures: small configs that run in seconds on a 2-core CPU."""
from __future__ import annotations

import contextlib

import pytest
import torch

import vmae_fast

# "odd" small config: dims not powers of two, 3 heads, non-square-ish token counts.
ODD = dict(embed_dim=72, depth=2, num_heads=3, decoder_embed_dim=48, decoder_num_heads=2, decoder_depth=2,
           patch_size=8, num_frames=6, img_size=48)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Toy-size ops on one thread: on a loaded 2-core machine two OpenMP threads mostly wait for each
# other (and spin against other processes), which made tiny training steps far slower.
@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    with torch_threads(1):
        yield


def small_pretrain(arch="vit_small_patch16_224", **kw):
    kw.setdefault("num_frames", 4)
    kw.setdefault("img_size", 64)
    return vmae_fast.create_pretrain_model(arch, **kw)


def pytest_collection_modifyitems(config, items):
    # Triton picks interpret-vs-compile when a kernel is decorated, so the tests that run the
    # kernels through the interpreter need a process of their own (see tests/ops_helpers.py).
    for item in items:
        if "interpret" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.interpret)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # tqdm's monitor thread would live from the first progress bar to the end of the run, and a
    # forked child (DataLoader workers) inherits whatever lock a live thread held
    with contextlib.suppress(ImportError):
        import tqdm

        tqdm.tqdm.monitor_interval = 0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def has_cuda() -> bool:
    return torch.cuda.is_available()


# Tests written for CUDA run their setup, shapes and logic on CPU too; the CUDA case carries the
# `gpu` marker and is skipped, with the reason, where no CUDA device is present.
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]
on_devices = pytest.mark.parametrize("device", DEVICES)


@contextlib.contextmanager
def full_fp32():
    """fp32 matmuls/convolutions in full precision on CUDA (no TF32), flags restored on exit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def no_tf32():
    with full_fp32():
        yield
