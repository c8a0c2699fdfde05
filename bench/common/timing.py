"""Timing and memory measurement shared by the benchmarks.

GPU: CUDA events around each repeat (device time of the region, no host clock), peak memory
from ``torch.cuda.max_memory_allocated``. CPU: ``time.perf_counter``; peak memory is the
process's resident high-water mark (``VmHWM`` of ``/proc/self/status``), reset before a
measurement through ``/proc/self/clear_refs`` (Linux), with glibc's mmap threshold pinned so
freed tensors leave the resident set (``pin_malloc_mmap_threshold``). ``tracemalloc`` cannot
see torch's allocations, so RSS is the honest CPU number; it includes allocator slack and the
whole process (Python, libraries), and is ``None`` where ``/proc`` is missing.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class Stats:
    """Seconds per call over ``len(samples)`` repeats after warm-up."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    mean: float
    samples: list[float] = field(default_factory=list)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: list[float]) -> "Stats":
        if not samples:
            raise ValueError("no samples to summarize")
        s = sorted(samples)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(statistics.median(s), s[0], s[-1], q1, q3, statistics.fmean(s), list(samples))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["iqr"] = self.iqr
        return d


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 2,
            repeats: int = 10) -> Stats:
    """Median/min/max/IQR of ``fn()`` in seconds: ``warmup`` untimed calls, then ``repeats``
    timed ones, each timed alone (CUDA events on GPU, ``perf_counter`` on CPU)."""
    device = torch.device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return Stats.of(samples)


# ---------------------------------------------------------------------------------- memory
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``peak`` (bytes in use at the high-water mark) and ``base`` (bytes in use
    on entry) of the region. GPU: allocated tensor bytes. CPU: resident set size (``None`` if
    the OS does not expose a resettable high-water mark)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type == "cpu":
            pin_malloc_mmap_threshold()
        self.base: int | None = None
        self.peak: int | None = None
        self.kind = "cuda_max_memory_allocated" if self.device.type == "cuda" else "rss_vmhwm"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            ok = _reset_rss_peak()
            rss = _proc_status_kb("VmRSS")
            self.base = rss * 1024 if (ok and rss is not None) else None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.base is not None:
            hwm = _proc_status_kb("VmHWM")
            self.peak = hwm * 1024 if hwm is not None else None

    @property
    def delta(self) -> int | None:
        """Bytes the region added at its peak; ``None`` where unknown (an RSS reading below the
        entry value, possible when pages were released, counts as unknown too)."""
        if self.peak is None or self.base is None:
            return None
        d = self.peak - self.base
        return d if d > 0 or self.device.type == "cuda" else None


_MALLOC_PINNED = False


def pin_malloc_mmap_threshold(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every block >= ``threshold`` bytes with its own mmap and unmap it on free.

    By default glibc raises its mmap threshold after large frees and then keeps freed tensors'
    memory in the heap, so after a warm-up step the resident set stops moving and a peak-RSS
    reading would say a step needs no memory. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``
    also turns the dynamic adjustment off) makes RSS follow the live tensors. Returns whether it
    took effect (glibc only)."""
    global _MALLOC_PINNED
    if _MALLOC_PINNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        _MALLOC_PINNED = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        _MALLOC_PINNED = False
    return _MALLOC_PINNED


# Out-of-memory as the libraries report it when the caching allocator's own check passed but a
# library allocation (cuBLAS handle/workspace, cuDNN workspace) or a raw CUDA call then failed:
# a bigger batch would fail the same way, so the search must treat them as "does not fit".
OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
               "cusolver_status_alloc_failed", "cufft_alloc_failed", "cusparse_status_alloc_failed")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from, e.g. inside torch.compile) is a device
    out-of-memory: ``torch.OutOfMemoryError`` or a RuntimeError naming one of ``OOM_MARKERS``
    (``cuDNN error: CUDNN_STATUS_NOT_SUPPORTED`` counts only with "out of memory" in it: alone
    it names an unsupported input, a real error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS):
            return True
        exc = exc.__cause__
    return False


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# The exact count of what a train step holds (saved activations included, also inside
# checkpointed blocks) is vmae_fast.memory_count.measure_train_step; bench.runner.exact_memory uses it.
