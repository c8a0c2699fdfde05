"""One parser for ``--device`` (the benchmarks and the training CLI)."""
from __future__ import annotations

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
