"""``--dtype auto`` (bf16 on CUDA and on CPUs with native bf16 matrix units, else fp32) and the
default number of data-loading workers (vmae_fast/device.py)."""
from __future__ import annotations

import os

import pytest
import torch

from vmae_fast import device


def test_cpu_flags_read_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert device.cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "amx_bf16", "amx_tile"}
    assert device.cpu_flags(str(tmp_path / "absent")) == set()


@pytest.mark.parametrize("flags, want", [({"avx512f", "amx_bf16"}, "bf16"), ({"avx512_bf16"}, "bf16"),
                                         ({"avx2", "avx512f"}, "fp32"), (set(), "fp32")])
def test_auto_dtype_on_cpu(flags, want):
    name, why = device.auto_dtype(torch.device("cpu"), flags)
    assert name == want
    assert ("has native bf16" in why) is (want == "bf16")


def test_auto_dtype_on_cuda_is_bf16():
    assert device.auto_dtype(torch.device("cuda", 0), set())[0] == "bf16"


def test_inference_device_and_dtype_says_which(monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2"})
    dev, amp, line = device.inference_device_and_dtype("cpu", "auto")
    assert (dev, amp) == (torch.device("cpu"), None)
    assert line.startswith("device cpu, dtype fp32 (--dtype auto:") and "\n" not in line
    monkeypatch.setattr(device, "cpu_flags", lambda: {"amx_bf16"})
    assert device.inference_device_and_dtype("cpu", "auto")[1] is torch.bfloat16
    assert device.inference_device_and_dtype("cpu", "fp32")[1] is None
    with pytest.raises(ValueError, match="--dtype fp16 needs --device cuda"):
        device.inference_device_and_dtype("cpu", "fp16")
    with pytest.raises(ValueError, match="--dtype must be one of auto, fp32, bf16, fp16; got 'float8'"):
        device.inference_device_and_dtype("cpu", "float8")


def test_default_num_workers_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert device.available_cpus() == 2 and device.default_num_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert device.default_num_workers() == 8 and device.default_num_workers(cap=16) == 16
