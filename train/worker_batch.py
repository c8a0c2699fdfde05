"""A DataLoader worker's uint8 batch, written into shared memory for the main process.

torch hands a worker's tensor to the main process through shared memory passed as a file
descriptor (sharing strategy ``file_descriptor``, Linux's default). Allocating the batch there
(``UntypedStorage._new_shared``: a ``/dev/shm`` file, allocated in full, then mapped) and
copying the views into it costs the worker a page fault for each 4 KiB page it writes, on top of
the allocation and the copy. Here the worker copies each view into a private staging buffer that
it keeps from batch to batch (warm memory, no fault) and writes it with ``pwrite`` into a fresh
``memfd`` (the kernel allocates the pages as it copies; the worker never maps them). Worker CPU-ms
a 19.3 MB batch (8 views of ``(3, 16, 224, 224)``: 2 videos at ``num_sample 4``), median of 39,
3 runs: 11.8-12.2 the old way against 8.4-9.2 (``python -m bench.worker_batch``, inside one
DataLoader worker, each batch sent to the main process; 2-vCPU AMD EPYC, torch 2.14.1, idle;
``bench/results/worker-batch-amd-epyc-2t-2026-12-07-r*.json``). The main
process maps the memfd as it maps any shared tensor. Every batch has its own memfd, so a batch
the main process keeps is never written again; only the staging buffer, which never leaves the
worker, is reused.

Where that is not available (no ``os.memfd_create``, a kernel or sandbox that refuses it, the
``file_system`` sharing strategy, a torch without ``UntypedStorage._new_shared_fd_cpu``) the batch
is allocated in shared memory and filled there, as before.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

_staging: torch.Tensor | None = None  # this process's, grown to the largest view, never shared


def _memfd_usable() -> bool:
    return (hasattr(os, "memfd_create") and hasattr(torch.UntypedStorage, "_new_shared_fd_cpu")
            and torch.multiprocessing.get_sharing_strategy() == "file_descriptor")


def _staging_for(shape: torch.Size) -> torch.Tensor:
    global _staging
    n = int(shape.numel())
    if _staging is None or _staging.numel() < n:
        _staging = None  # the old buffer goes before the new one is allocated
        _staging = torch.empty(n, dtype=torch.uint8)
    return _staging[:n].view(shape)


def _memfd_batch(views: Sequence[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    # A view at a time: each is still in the cache when the kernel copies it out, and the staging
    # buffer is one view (2.4 MB), not the batch
    staged = _staging_for(views[0].shape)
    data = memoryview(staged.numpy()).cast("B")
    m = len(data)
    fd = os.memfd_create("vmae-batch", os.MFD_CLOEXEC)
    try:
        for k, view in enumerate(views):
            staged.copy_(view)
            done = 0
            while done < m:  # a regular file takes it whole; a signal could cut it short
                done += os.pwrite(fd, data[done:], k * m + done)
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, m * len(views))  # maps its own dup of fd
    finally:
        os.close(fd)
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _filled_in_place(views: Sequence[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    n = int(torch.Size(shape).numel())
    try:
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n)).view(shape)
    except Exception:  # a torch without the private helper
        out = torch.empty(shape, dtype=torch.uint8).share_memory_()
    for k, view in enumerate(views):
        out[k].copy_(view)
    return out


def shared_batch(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """``views`` (equal shapes, uint8, any strides) stacked into a contiguous uint8 tensor in
    shared memory, for a DataLoader worker to return."""
    shape = (len(views), *views[0].shape)
    if _memfd_usable() and torch.Size(shape).numel() > 0:
        try:
            return _memfd_batch(views, shape)
        except OSError:  # memfd refused (seccomp, an old kernel) or out of memory: the old way
            pass
    return _filled_in_place(views, shape)


__all__ = ["shared_batch"]
