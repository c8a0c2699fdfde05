"""What a DataLoader worker pays to hand one uint8 batch to the main process: the old way (a
``/dev/shm`` batch allocated, then filled, a page fault for each 4 KiB page) against
``train.worker_batch.shared_batch`` (the views staged in a buffer the worker keeps, then written
into a fresh memfd). Worker CPU-ms per batch, the two ways alternating inside one real worker,
each batch sent to the main process as training sends it; median and range.

    python -m bench.worker_batch                 # 2 videos x 4 views, 16 x 224 x 224: 19.3 MB a batch
    python -m bench.worker_batch --views 2 --batches 20
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from vmae_fast.errors import check_at_least

from .common import device as devmod
from .common.cli import add_output_args, make_parser
from .common.output import result_header, save_result

WAYS = ("dev_shm_filled_in_place", "memfd_staged")


class _Batches(torch.utils.data.Dataset):
    """Item ``i``: one batch made the old way (even ``i``) or the new one (odd), with the worker CPU
    time that making it cost."""

    def __init__(self, n: int, views: int, frames: int, size: int):
        self.n, self.shape = n, (views, 3, frames, size, size)
        self.views = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from train import worker_batch as W

        if self.views is None:  # made in the worker, once
            g = torch.Generator().manual_seed(0)
            self.views = [torch.randint(0, 256, self.shape[1:], dtype=torch.uint8, generator=g)
                          for _ in range(self.shape[0])]
        t = time.process_time()
        batch = W._filled_in_place(self.views, self.shape) if i % 2 == 0 else W.shared_batch(self.views)
        return {"way": WAYS[i % 2], "cpu_ms": (time.process_time() - t) * 1e3, "video": batch}


def measure(batches: int, views: int, frames: int, size: int) -> dict:
    loader = torch.utils.data.DataLoader(_Batches(2 * batches, views, frames, size), batch_size=None,
                                         num_workers=1)
    got: dict[str, list[float]] = {w: [] for w in WAYS}
    for k, item in enumerate(loader):
        assert item["video"].is_shared()
        if k >= 2:  # the first of each way warms the worker up
            got[item["way"]].append(item["cpu_ms"])
    return {w: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for w, v in got.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = make_parser("worker_batch", __doc__)
    ap.add_argument("--batches", type=int, default=40, help="batches of each way")
    ap.add_argument("--views", type=int, default=8, help="views a batch (videos x num_sample)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    add_output_args(ap, "worker-batch-<device>")
    ns = ap.parse_args(argv)
    try:
        check_at_least(ns, {"batches": 2, "views": 1, "frames": 1, "size": 1})
    except ValueError as exc:
        ap.error(str(exc))
    res = measure(ns.batches, ns.views, ns.frames, ns.size)
    mb = ns.views * 3 * ns.frames * ns.size * ns.size / 1e6
    for way, r in res.items():
        print(f"{way:24s} {r['median']:6.1f} worker CPU-ms a {mb:.1f} MB batch "
              f"({r['min']:.1f}-{r['max']:.1f}, {r['n']} batches)")
    result = {**result_header("worker_batch", argv, device=devmod.device_info(torch.device("cpu"))),
              "config": {"batches": ns.batches, "views": ns.views, "frames": ns.frames, "size": ns.size,
                         "batch_mb": mb}, "cpu_ms_per_batch": res}
    save_result(result, ns, "worker-batch")
    return result


if __name__ == "__main__":
    main()
