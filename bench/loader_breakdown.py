"""Where a clip's CPU time goes (``vmae-bench loader --breakdown``): our pretraining samples from
files and from shards, one process, one thread, stage by stage, CPU-ms per video.

Stages: ``read`` (shards: the tar member through webdataset's reader; files: none, FFmpeg reads
the file inside the next two), ``open+index`` (the PyAV reader: open, probe, the packet index),
``decode`` (seek, demux and the H.264 decoder, needed frames and the reference frames before
them), ``rgb`` (YUV -> RGB of the needed frames), ``gather`` (the rest of ``reader.get``: the frames
into one array), ``crop+resize`` (every view), ``collate`` (the views into a batch in shared
memory, as a DataLoader worker makes it, ``train/worker_batch.py``; the batch is freed off the
clock, as a worker's batches are freed by the main process), ``other`` (the rest: sampling, crop
boxes, JSON).

``decode`` is the floor of any reader that returns these frames bit for bit: the decoder must
decode every reference frame from the keyframe before the clip up to its last frame (the reader
already skips the non-reference frames it does not need). ``num_sample / decode`` is then the most
clips per CPU-second this decoder can give, whatever the rest costs.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

STAGES = ("read", "open+index", "decode", "rgb", "gather", "crop+resize", "collate", "other")


@contextlib.contextmanager
def _timed(acc: dict):
    """Adds the CPU time of the reader's stages to ``acc`` (class attributes patched for the
    benchmark's life only)."""
    import train.data as data
    from vmae_fast.video.decoders import PyAVReader

    orig = {k: getattr(PyAVReader, k) for k in ("__init__", "_frames", "_rgb", "get")}
    orig_crop = data.crop_resize

    def clocked(key, fn):
        def run(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.process_time() - t
        return run

    def frames(self, *a, **k):  # the generator's own time: seek, demux, decode
        it = orig["_frames"](self, *a, **k)
        while True:
            t = time.process_time()
            try:
                f = next(it)
            except StopIteration:
                acc["decode"] += time.process_time() - t
                return
            acc["decode"] += time.process_time() - t
            yield f

    def get(self, indices):
        t, before = time.process_time(), acc["decode"] + acc["rgb"]
        try:
            return orig["get"](self, indices)
        finally:
            acc["gather"] += time.process_time() - t - (acc["decode"] + acc["rgb"] - before)

    PyAVReader.__init__ = clocked("open+index", orig["__init__"])
    PyAVReader._frames, PyAVReader._rgb, PyAVReader.get = frames, clocked("rgb", orig["_rgb"]), get
    data.crop_resize = clocked("crop+resize", orig_crop)
    try:
        yield
    finally:
        for k, v in orig.items():
            setattr(PyAVReader, k, v)
        data.crop_resize = orig_crop


def breakdown(paths: list[Path], shard_spec: str | None, num_sample: int, frames: int, rate: int, size: int,
              reps: int = 4) -> list[dict]:
    """Rows ``{"source", "num_sample", "videos", <stage>: ms per video, "total_ms",
    "clips_per_cpu_s", "decode_ceiling"}`` for files (and shards when ``shard_spec``)."""
    from train.data import Collate, VideoDataset
    from train.shard_data import load_sample
    from vmae_fast.video import shards as fmt
    from vmae_fast.video.lists import Entry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    collate = Collate(pin_memory=False, shared=True)  # the batch as a worker makes it
    ds = VideoDataset([Entry(str(p)) for p in paths], "pretrain", frames, rate, size, num_sample=num_sample,
                      decoder="pyav")
    samples = []
    if shard_spec:
        shards = fmt.resolve(shard_spec)
        samples = [s for u, c in zip(shards.urls, shards.counts) for s in fmt.read_piece(u, 0, c)]
    rows = []
    try:
        for source in ["files"] + (["shards"] if shard_spec else []):
            acc = dict.fromkeys(STAGES, 0.0)
            n, freed = 0, 0.0
            with _timed(acc):
                for rep in range(reps + 1):  # rep 0 warms up, left out
                    if rep == 1:
                        acc.update(dict.fromkeys(STAGES, 0.0))
                        t_all, freed = time.process_time(), 0.0
                    for j in range(len(paths)):
                        out = ds[(rep, j)] if source == "files" else load_sample(ds, samples[j], rep)
                        t = time.process_time()
                        batch = collate([out])
                        acc["collate"] += time.process_time() - t
                        t = time.process_time()
                        del batch
                        freed += time.process_time() - t
                        n += rep > 0
                total = time.process_time() - t_all - freed
            if source == "shards":  # the tar reading, timed apart: webdataset's reader, every shard
                t = time.process_time()
                for _ in range(reps):
                    for u, c in zip(shards.urls, shards.counts):
                        for _s in fmt.read_piece(u, 0, c):
                            pass
                acc["read"] = time.process_time() - t
                total += acc["read"]
            acc["other"] = total - sum(acc[k] for k in STAGES if k != "other")
            ms = {k: 1e3 * v / n for k, v in acc.items()}
            total_ms = 1e3 * total / n
            rows.append({"source": source, "num_sample": num_sample, "videos": n, **ms, "total_ms": total_ms,
                         "clips_per_cpu_s": num_sample * 1e3 / total_ms,
                         "decode_ceiling": num_sample * 1e3 / ms["decode"]})
    finally:
        torch.set_num_threads(threads)
    return rows


def table(rows: list[dict], official: dict[int, float]) -> str:
    """Markdown: CPU-ms per video by stage; ``official``: num_sample -> the official pipeline's
    clips per CPU-second from the same run, for the ratios."""
    head = "| source | num_sample | " + " | ".join(STAGES) + " | total | clips / CPU-s | decode-only ceiling |"
    lines = [head, "|" + "---|" * (len(STAGES) + 5)]
    for r in rows:
        off = official.get(r["num_sample"])
        rel = lambda x: f" ({x / off:.2f}x official)" if off else ""  # noqa: E731
        lines.append(f"| {r['source']} | {r['num_sample']} | " + " | ".join(f"{r[k]:.1f}" for k in STAGES)
                     + f" | {r['total_ms']:.1f} | {r['clips_per_cpu_s']:.2f}{rel(r['clips_per_cpu_s'])} | "
                     f"{r['decode_ceiling']:.2f}{rel(r['decode_ceiling'])} |")
    lines.append("\nCPU-ms per video (one process, one thread); the decode-only ceiling: num_sample / decode, "
                 "the clips per CPU-second if nothing but the decoder cost anything")
    return "\n".join(lines)


__all__ = ["STAGES", "breakdown", "table"]
