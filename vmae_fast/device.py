"""One parser for ``--device`` (the benchmarks, the tools and the training CLI), the choice of
``--dtype auto``, and the default number of data-loading workers."""
from __future__ import annotations

import os

import torch


def parse_device(text: str | None, *, cuda_available: bool, device_count: int, current: int,
                 local_rank: int = 0, world: int = 1) -> tuple[torch.device, int | None]:
    """``(device, index for torch.cuda.set_device or None)`` for a ``--device`` value; no side
    effects, so it is testable without CUDA.

    ``None``/``auto``: CUDA when available, else the CPU. Bare ``cuda``: the GPU of this rank's
    ``LOCAL_RANK`` under torchrun (``world > 1``), else the current device. ``cuda:N``: device N
    (one process only: torchrun's ranks would all land on it). Every CUDA device is returned with
    its index to make current, since streams, events, Triton launches, NCCL and library handles
    follow the current device, not the tensors'. Bad values raise ``ValueError``."""
    if text is None or text == "auto":
        text = "cuda" if cuda_available else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"--device {text!r} is not a device ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {text!r}")
    if dev.type == "cpu":
        return dev, None
    if not cuda_available:
        raise ValueError(f"--device {text!r}: CUDA is not available on this machine")
    if dev.index is None:
        index = local_rank if world > 1 else current
    elif world > 1:
        raise ValueError(f"--device {text!r} names one GPU for all {world} processes torchrun started; "
                         "use --device cuda (each rank takes the GPU of its LOCAL_RANK)")
    else:
        index = dev.index
    if index >= device_count:
        raise ValueError(f"--device {text!r}: CUDA device {index} does not exist (this machine has "
                         f"{device_count} CUDA device(s))")
    return torch.device("cuda", index), index


def select_device(text: str | None, local_rank: int = 0, world: int = 1) -> torch.device:
    """``parse_device`` on this machine, then make the CUDA device the current one."""
    avail = torch.cuda.is_available()
    dev, index = parse_device(text, cuda_available=avail, device_count=torch.cuda.device_count() if avail else 0,
                              current=torch.cuda.current_device() if avail else 0, local_rank=local_rank,
                              world=world)
    if index is not None:
        torch.cuda.set_device(index)
    return dev


# --------------------------------------------------------------------------- inference dtype, workers

# CPU flags (Linux /proc/cpuinfo names) of matrix units that run bf16 matmuls natively: there
# bf16 autocast is several times faster than fp32 (ViT-B inference, README "Inference dtype");
# elsewhere bf16 is emulated and slower, so fp32 stays the CPU default.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags (empty where the file does not exist: not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def auto_dtype(device: torch.device, flags: set[str] | None = None) -> tuple[str, str]:
    """``--dtype auto`` on ``device``: ``(name, why)``, ``name`` a key of ``DTYPES``."""
    if device.type == "cuda":
        return "bf16", "CUDA"
    have = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    if have:
        return "bf16", f"this CPU has native bf16 matrix instructions ({', '.join(have)})"
    return "fp32", f"this CPU has no native bf16 matrix unit (none of {', '.join(BF16_CPU_FLAGS)})"


def inference_device_and_dtype(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype | None, str]:
    """``--device`` and ``--dtype`` of an inference tool -> ``(device, autocast dtype or None for
    fp32, one line saying which and why)``. Bad values raise ``ValueError`` in the flags' words."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    dev = select_device(device)  # validated; a cuda:N device becomes the current one
    why = "--dtype " + dtype
    if dtype == "auto":
        dtype, reason = auto_dtype(dev)
        why = f"--dtype auto: {reason}"
    if dtype == "fp16" and dev.type == "cpu":
        raise ValueError("--dtype fp16 needs --device cuda (CPU autocast runs bf16; use --dtype bf16 or fp32)")
    return dev, DTYPES[dtype], f"device {dev}, dtype {dtype} ({why})"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow;
    ``os.cpu_count()`` counts the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(cap: int = 8) -> int:
    """Data-loading workers by default: one per available CPU, at most ``cap``. PyTorch warns at
    every start when the workers outnumber the CPUs the process may use."""
    return max(1, min(cap, available_cpus()))
