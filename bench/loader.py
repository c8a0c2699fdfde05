"""Data-loader throughput: our pipeline against the official one, on the same files, per decoder.

    python -m bench.loader                       # Kinetics-like 320p clips made in a temp dir
    python -m bench.loader --videos tests/data   # or any folder / list of video files

For each pipeline x decoder x num_sample x worker count, a ``torch.utils.data.DataLoader`` with
that many workers produces pretraining batches (16 frames every 4th, 224 px); with
``--finetune`` also our fine-tuning batches, without and with the official RandAugment and
random-erasing boxes (what the augmentation costs a worker). Measured:

* clips per CPU-second: clips / the workers' own CPU time (``time.process_time`` read inside
  each worker when it finishes a batch; each worker's first batch, with its start-up, is left
  out). The cost of a clip, whatever the core count: the number that says how many cores a GPU
  needs.
* wall clips/s: clips after the first batch of every worker / the wall time they took, as the
  training loop would receive them (this machine's cores, shared with whatever else runs).

* bytes read per clip: what the workers' loading threads read (``/proc/thread-self/io`` rchar,
  Linux: the files, the local shards, or the http shards from the pipe of their ``curl``; and the
  loader's own small messages, ~0.5 kB a batch), over the clips.

``--sources files,shards,http``: our pretraining pipeline (``auto`` decoder) also from WebDataset
shards of the same files (``vmae-shards``, the files' own bytes, into a temp folder): read locally,
and over HTTP from a ``http.server`` this benchmark runs on 127.0.0.1 (webdataset opens http URLs
with ``curl``: its CPU time, a child's, is counted with the worker's). The shard rows read the
samples in list order, unshuffled, so that they decode the clips of the files rows (a clip's cost
depends on where it starts).

``--breakdown``: also a video's CPU time stage by stage (open and index, decode, RGB, crops, the
batch in shared memory as a worker makes it; ``bench/loader_breakdown.py``), from files and from
shards, in this process, and the most clips per CPU-second the decoder alone would allow.

A clip is one view: with ``num_sample 4`` one decoded video gives 4 clips, in both pipelines.
"ours" is ``train.data.VideoDataset`` + ``collate`` (uint8 out); "official" is
``bench/official_pipeline.py`` (decord + PIL + float normalization, as the official code), run
with its own decoder (decord) and, for comparison, with ours. Goals (one worker, 320p H.264):
ours with ``auto`` >= 2.5x official/decord clips per CPU-second at num_sample 4, >= 1.7x at 1.
Raw rows go to ``bench/results/loader-<device>-<date>.json`` (installed: ``./bench-results``); a
Markdown table is printed.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from vmae_fast.video.decoders import failure_reason, open_video

from .common import device as devmod
from .common.cli import add_output_args, make_parser
from .common.output import result_header, save_result

GOALS = {1: 1.7, 4: 2.5}  # num_sample -> ours(auto) / official(decord), clips per CPU-second, 1 worker
SIZES_320P = ((568, 320), (320, 568), (426, 320))
# --finetune: our fine-tuning views (random resized crop + flip), without and with the official
# RandAugment and random-erasing boxes (the erasing fill runs on the training device, not here).
FINETUNE_PIPELINES = ("ours-finetune", "ours-finetune+aug")


# ----------------------------------------------------------------------------- files
def kinetics_files(n: int, seconds: float, cache: Path | None = None) -> list[Path]:
    """``n`` Kinetics-like 320p clips (train/make_synthetic.py), made once into a temp folder
    named after their parameters and reused by later runs."""
    from train.make_synthetic import make_kinetics_like

    key = hashlib.sha1(f"v1-{n}-{seconds}-{SIZES_320P}".encode()).hexdigest()[:10]
    root = (cache or Path(tempfile.gettempdir())) / f"vmae_fast_loader_bench_{key}"
    done = root / "done"
    if not done.exists():
        print(f"writing {n} Kinetics-like clips ({seconds:g} s, 320p, H.264) to {root} ...", file=sys.stderr,
              flush=True)
        paths = make_kinetics_like(root, n, seconds, sizes=SIZES_320P)
        done.write_text("\n".join(p.name for p in paths))
    return [root / "videos" / name for name in done.read_text().split()]


def video_files(spec: list[str]) -> list[Path]:
    out: list[Path] = []
    for s in spec:
        p = Path(s)
        if not p.exists():  # a relative path is read from the current directory, not the checkout
            raise SystemExit(f"--videos: {s} does not exist (relative to {Path.cwd()})")
        out += sorted(q for q in p.iterdir() if q.suffix.lower() in (".mp4", ".mkv", ".webm", ".avi", ".mov")) \
            if p.is_dir() else [p]
    if not out:
        raise SystemExit(f"no video files in {spec}")
    for p in out:  # a bad file is its line now, not a DataLoader worker's traceback minutes later
        try:
            with open_video(p, "pyav") as r:
                frames = len(r)
        except Exception as exc:
            raise SystemExit(f"--videos: {p}: {failure_reason(exc)}") from None
        if frames == 0:
            raise SystemExit(f"--videos: {p}: no frames")
    return out


def describe(path: Path) -> dict:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        dur = float(c.duration / 1e6) if c.duration else None
        return {"file": path.name, "width": s.width, "height": s.height, "codec": s.codec_context.name,
                "fps": float(s.average_rate) if s.average_rate else None, "frames": s.frames, "seconds": dur,
                "kbit_s": round(path.stat().st_size * 8 / 1e3 / dur) if dur else None}


# ----------------------------------------------------------------------------- measuring
def _cpu() -> float:
    """This process's CPU time and its waited-for children's (curl for http shards)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def _bytes_read() -> int | None:
    """What this thread has read through read(2) and its kin so far (``/proc/thread-self/io``
    rchar; None off Linux): the files, or the shards (local, or from curl's pipe for http), and
    the loader's own small messages. The thread's, not the process's: a process's count takes in
    its reaped children's, here curl's (its libraries, and the same bytes again from the socket)."""
    try:
        with open("/proc/thread-self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):  # not Linux
        return None


class TimedCollate:
    """Runs in the worker: the batch, how many clips it holds, which worker, its CPU clock and
    the bytes it has read."""

    def __init__(self, inner, clips_of):
        self.inner, self.clips_of = inner, clips_of

    def __call__(self, samples):
        batch = self.inner(samples)
        info = torch.utils.data.get_worker_info()
        return batch, self.clips_of(batch), info.id if info else -1, _cpu(), _bytes_read()


class _ShardCollate(TimedCollate):
    """For the shard stream: the batch dict carries the timing (``SkipAware`` adds its keys)."""

    def __call__(self, samples):
        batch, n, wid, cpu, nbytes = super().__call__(samples)
        batch["_timing"] = (n, wid, cpu, nbytes)
        return batch


def write_bench_shards(paths: list[Path], folder: Path) -> Path:
    """The files as shards (their own bytes), 3 videos a shard."""
    from train import write_shards

    folder.mkdir(parents=True, exist_ok=True)
    lst = folder / "list.txt"
    lst.write_text("".join(f"{p.resolve()} 0 -1\n" for p in paths))
    rc = write_shards.main(["--data-list", str(lst), "--kind", "pretrain", "--out", str(folder / "shards"),
                            "--samples-per-shard", "3", "--workers", "1", "--no-progress"])
    if rc != 0:
        raise SystemExit(f"vmae-shards could not write every benchmark file into shards (see {folder})")
    return folder / "shards"


def _quiet_handler():
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per request would drown the table
            pass

    return Quiet


class _HTTP:
    """A ``http.server`` on 127.0.0.1 serving ``folder``, in a thread, for the benchmark's life."""

    def __init__(self, folder: Path):
        import functools
        import http.server
        import threading

        handler = functools.partial(_quiet_handler(), directory=str(folder))
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def _video_of(batch):
    return batch["video"] if isinstance(batch, dict) else batch


def _official_reader(decoder: str):
    from vmae_fast.video.decoders import open_video

    if decoder == "decord":
        return None  # the official loader itself

    class _Reader:  # decord's get_batch on top of our reader, so the official code path is unchanged
        def __init__(self, path):
            self.r = open_video(path, decoder)

        def __len__(self):
            return len(self.r)

        def get_batch(self, ids):
            return self.r.get(ids)

    return _Reader


def measure(pipeline: str, decoder: str, num_sample: int, workers: int, paths: list[Path], clips: int,
            batch: int, frames: int, rate: int, size: int, seed: int = 0) -> dict:
    from bench.official_pipeline import OfficialPretrainDataset, official_collate
    from train.data import VideoDataset, collate
    from vmae_fast.video.lists import Entry

    if pipeline in FINETUNE_PIPELINES:
        from train.augment import EraseSpec
        from train.recipe import FINETUNE_COMMON

        aug = pipeline == "ours-finetune+aug"
        ds = VideoDataset([Entry(str(p), label=0) for p in paths], "finetune", frames, rate, size,
                          num_sample=num_sample, seed=seed, decoder=decoder,
                          auto_augment=FINETUNE_COMMON["aa"] if aug else None,
                          train_interpolation=FINETUNE_COMMON["train_interpolation"],
                          erase=EraseSpec(FINETUNE_COMMON["reprob"], FINETUNE_COMMON["remode"],
                                          FINETUNE_COMMON["recount"]) if aug else None)
        fn = TimedCollate(collate, lambda b: b["video"].shape[0])
    elif pipeline == "ours":
        ds = VideoDataset([Entry(str(p)) for p in paths], "pretrain", frames, rate, size, num_sample=num_sample,
                          seed=seed, decoder=decoder)
        fn = TimedCollate(collate, lambda b: b["video"].shape[0])
    else:
        ds = OfficialPretrainDataset([str(p) for p in paths], frames, rate, size, num_sample,
                                     open_video=_official_reader(decoder))
        fn = TimedCollate(official_collate, lambda b: b.shape[0])
    per_batch = batch * num_sample
    n_batches = math.ceil(clips / per_batch) + workers  # + each worker's first (left-out) batch
    keys = [(k // len(paths), k % len(paths)) for k in range(n_batches * batch)]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=keys, num_workers=workers,
                                         collate_fn=fn, prefetch_factor=2, persistent_workers=False)
    dtype = torch.float32 if pipeline == "official" else torch.uint8

    def timings():
        for out, n, wid, cpu, nbytes in loader:
            assert _video_of(out).dtype == dtype
            yield n, wid, cpu, nbytes

    return _row(pipeline, decoder, num_sample, workers, batch, source="files", **_drain(timings(), workers))


def measure_shards(source: str, spec: str, decoder: str, num_sample: int, workers: int, clips: int, batch: int,
                   frames: int, rate: int, size: int, seed: int = 0) -> dict:
    """``ours`` from shards (``source``: "shards" local, "http"), one rank, ``workers`` workers."""
    from train.data import Collate, VideoDataset
    from train.shard_data import ShardStream, make_loader
    from vmae_fast.video.shards import resolve

    ds = VideoDataset([], "pretrain", frames, rate, size, num_sample=num_sample, seed=seed, decoder=decoder)
    # In list order, unshuffled: sample k is (epoch k // n, line k % n), the files rows' keys, so both
    # rows decode the same clips (a clip's cost depends on where it starts: up to 2x between clips)
    stream = ShardStream(resolve(spec), ds, world=1, rank=0, workers=workers, seed=seed, buffer=1, shuffle=False)
    fn = _ShardCollate(Collate(pin_memory=False), lambda b: b["video"].shape[0])
    n_batches = math.ceil(clips / (batch * num_sample)) + workers
    loader = make_loader(stream, batch, fn, workers, False, seed)
    drained = _drain((out["_timing"] for out in loader), workers, limit=n_batches)
    return _row("ours", decoder, num_sample, workers, batch, source=source, **drained)


def _drain(timings, workers: int, limit: int | None = None) -> dict:
    """Takes ``(clips, worker id, its CPU s, bytes read)`` per batch until ``timings`` ends (or
    ``limit`` batches): ``_row``'s timing fields. The wall clock counts from every worker's first
    batch on (``t_start``) and stops at the last batch taken (``t_end``)."""
    seen: dict[int, list[tuple[float, int, int | None]]] = {}
    t_start, counted, wall_clips = None, 0, 0
    t0 = t_end = time.perf_counter()
    for n, wid, cpu, nbytes in timings:
        seen.setdefault(wid, []).append((cpu, n, nbytes))
        if t_start is None and len(seen) == workers:
            t_start = time.perf_counter()  # every worker has delivered its first batch
        elif t_start is not None:
            wall_clips += n
        counted += 1
        t_end = time.perf_counter()
        if counted == limit:
            break
    return {"seen": seen, "t0": t0, "t_start": t_start, "t_end": t_end, "wall_clips": wall_clips, "counted": counted}


def _row(pipeline, decoder, num_sample, workers, batch, seen, t0, t_start, t_end, wall_clips, counted,
         source) -> dict:
    """``t_end``: when the last batch came, before the loader shuts its workers down (a stream cut
    short waits there for the batch its worker is still making)."""
    cpu_s = sum(r[-1][0] - r[0][0] for r in seen.values())
    cpu_clips = sum(n for r in seen.values() for _, n, _ in r[1:])
    read = None if any(r[0][2] is None for r in seen.values()) else sum(r[-1][2] - r[0][2] for r in seen.values())
    wall_s = t_end - (t_start or t0)
    return {"pipeline": pipeline, "source": source, "decoder": decoder, "num_sample": num_sample,
            "workers": workers, "bytes_per_clip": read / cpu_clips if read is not None and cpu_clips else None,
            "batch": batch, "clips": cpu_clips, "cpu_s": cpu_s,
            "clips_per_cpu_s": cpu_clips / cpu_s if cpu_s > 0 else None,
            "wall_s": wall_s, "wall_clips": wall_clips,
            "wall_clips_per_s": wall_clips / wall_s if wall_s > 0 and wall_clips else None,
            "total_wall_s": t_end - t0, "batches": counted}


# ----------------------------------------------------------------------------- report
def _fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _baseline(r: dict, rows: list[dict]) -> dict | None:
    """What a row's ratios are against: the official pipeline with decord for pretraining rows,
    our fine-tuning without augmentation for fine-tuning rows (same num_sample and workers)."""
    want = ("ours-finetune", None) if r["pipeline"] in FINETUNE_PIPELINES else ("official", "decord")
    return next((b for b in rows if b["pipeline"] == want[0] and (want[1] is None or b["decoder"] == want[1])
                 and b.get("source", "files") == "files"
                 and (b["num_sample"], b["workers"]) == (r["num_sample"], r["workers"])), None)


def table(rows: list[dict]) -> str:
    lines = ["| pipeline | source | decoder | num_sample | workers | clips / CPU-s | x baseline | wall clips/s | "
             "x baseline | kB read / clip |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = _baseline(r, rows)
        rel = lambda k: _fmt(r[k] / b[k]) + "x" if b and r.get(k) and b.get(k) else "n/a"  # noqa: E731
        kb = None if r.get("bytes_per_clip") is None else r["bytes_per_clip"] / 1e3
        lines.append(f"| {r['pipeline']} | {r.get('source', 'files')} | {r['decoder']} | {r['num_sample']} | "
                     f"{r['workers']} | {_fmt(r['clips_per_cpu_s'])} | {rel('clips_per_cpu_s')} | "
                     f"{_fmt(r['wall_clips_per_s'])} | {rel('wall_clips_per_s')} | {_fmt(kb, 0)} |")
    lines.append("\nbaseline: official (decord) for the pretraining rows; ours-finetune (no RandAugment, no "
                 "erasing) for ours-finetune+aug")
    return "\n".join(lines)


def goals(rows: list[dict], auto: str) -> list[dict]:
    out = []
    for ns, target in GOALS.items():
        ours = next((r for r in rows if r["pipeline"] == "ours" and r["decoder"] == auto and r["num_sample"] == ns
                     and r["workers"] == 1 and r.get("source", "files") == "files"), None)
        off = next((r for r in rows if r["pipeline"] == "official" and r["decoder"] == "decord"
                    and r["num_sample"] == ns and r["workers"] == 1), None)
        if ours is None or off is None:
            continue
        ratio = ours["clips_per_cpu_s"] / off["clips_per_cpu_s"]
        out.append({"num_sample": ns, "target": target, "ratio": ratio, "met": ratio >= target,
                    "ours": ours["clips_per_cpu_s"], "official": off["clips_per_cpu_s"], "decoder": auto})
    return out


def _say(r: dict) -> None:
    print(f"  {r['pipeline']:8s} {r['source']:6s} {r['decoder']:10s} ns={r['num_sample']} workers={r['workers']}: "
          f"{_fmt(r['clips_per_cpu_s'])} clips/CPU-s, {_fmt(r['wall_clips_per_s'])} wall clips/s", file=sys.stderr,
          flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = make_parser("loader", __doc__)
    ap.add_argument("--videos", nargs="*", help="video files or folders, e.g. tests/data of a source checkout "
                                                "(default: Kinetics-like 320p clips, made once in a temp folder)")
    ap.add_argument("--n-videos", type=int, default=6, help="generated clips (default 6)")
    ap.add_argument("--seconds", type=float, default=10, help="length of generated clips (default 10)")
    ap.add_argument("--decoders", default="all",
                    help="comma list of decoders for our pipeline, or 'all' (those that load)")
    ap.add_argument("--official-decoders", default="all",
                    help="decoders for the official pipeline: 'decord' (its own) or a list, or 'all'")
    ap.add_argument("--finetune", action="store_true",
                    help="also measure our fine-tuning pipeline, without and with the official RandAugment "
                         "(rand-m7-n4-mstd0.5-inc1) and random-erasing boxes, with the auto decoder")
    ap.add_argument("--sources", default="files",
                    help="comma list of files, shards (local WebDataset shards of the same files), http (those "
                         "shards from a local http.server); shards and http rows: ours, auto decoder")
    ap.add_argument("--breakdown", action="store_true",
                    help="also where a video's CPU time goes, stage by stage (bench/loader_breakdown.py), "
                         "from files and, with shards in --sources, from shards")
    ap.add_argument("--num-sample", default="1,4")
    ap.add_argument("--workers", default=None, help="comma list (default 1..cores)")
    ap.add_argument("--clips", type=int, default=48, help="clips measured per row (default 48)")
    ap.add_argument("--batch", type=int, default=2, help="videos per batch (default 2)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--rate", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    add_output_args(ap, "loader-<device>-<date>")
    ns = ap.parse_args(argv)
    from vmae_fast.video import decoders as decode

    avail = decode.available_decoders()
    for name in decode.DECODERS:
        if name not in avail:
            print(f"decoder {name}: skipped ({decode.why_unavailable(name)})", file=sys.stderr)
    pick = lambda s: avail if s == "all" else [d for d in s.split(",") if d in avail]  # noqa: E731
    ours_dec, off_dec = pick(ns.decoders), pick(ns.official_decoders)
    auto = decode.resolve_decoder("auto", quiet=True)
    paths = video_files(ns.videos) if ns.videos else kinetics_files(ns.n_videos, ns.seconds)
    workers = [int(w) for w in ns.workers.split(",")] if ns.workers else list(range(1, (os.cpu_count() or 1) + 1))
    samples = [int(s) for s in ns.num_sample.split(",")]
    off_dec = sorted(off_dec, key=lambda d: d != "decord")  # the baseline row first
    plan = [("official", d) for d in off_dec] + [("ours", d) for d in ours_dec]
    if ns.finetune:
        plan += [(p, auto) for p in FINETUNE_PIPELINES]
    sources = [x for x in ns.sources.split(",") if x]
    bad = [x for x in sources if x not in ("files", "shards", "http")]
    if bad:
        raise SystemExit(f"--sources: {bad[0]} is not one of files, shards, http")
    if "files" not in sources:
        plan = []
    tmp = server = None
    specs = {}
    if set(sources) & {"shards", "http"}:
        tmp = tempfile.TemporaryDirectory(prefix="vmae_fast_loader_shards_")
        folder = write_bench_shards(paths, Path(tmp.name))
        specs["shards"] = str(folder)
        if "http" in sources:
            server = _HTTP(folder)
            n = len(list(folder.glob("shard-*.tar")))
            specs["http"] = f"{server.url}/shard-{{000000..{n - 1:06d}}}.tar"
    rows, parts = [], []
    try:
        for w in workers:
            for s in samples:
                for pipeline, dec in plan:
                    r = measure(pipeline, dec, s, w, paths, ns.clips, ns.batch, ns.frames, ns.rate, ns.size)
                    rows.append(r)
                    _say(r)
                for src in [x for x in sources if x != "files"]:
                    r = measure_shards(src, specs[src], auto, s, w, ns.clips, ns.batch, ns.frames, ns.rate, ns.size)
                    rows.append(r)
                    _say(r)
        if ns.breakdown:
            from .loader_breakdown import breakdown

            for s in samples:
                parts += breakdown(paths, specs.get("shards"), s, ns.frames, ns.rate, ns.size)
    finally:
        if server is not None:
            server.close()
        if tmp is not None:
            tmp.cleanup()
    info = devmod.device_info(torch.device("cpu"))
    versions = {m: devmod.module_version(m) for m in ("av", "decord", "torchcodec", "PIL")}
    try:
        import torchcodec

        versions["torchcodec_ffmpeg_major"] = getattr(torchcodec, "ffmpeg_major_version", None)
    except Exception:
        pass
    g = goals(rows, auto)
    files = [describe(p) for p in paths]
    dims = ", ".join(sorted({"%dx%d" % (f["width"], f["height"]) for f in files}))
    head = (f"## Data loader: {info['name']}, {len(paths)} files ({dims}), "
            f"{ns.frames} frames every {ns.rate}, {ns.size} px; auto decoder = {auto}")
    lines = [head, "", table(rows), ""]
    for x in g:
        lines.append(f"- num_sample {x['num_sample']}, 1 worker: ours ({x['decoder']}) {x['ours']:.2f} vs official "
                     f"(decord) {x['official']:.2f} clips/CPU-s = {x['ratio']:.2f}x, goal {x['target']}x: "
                     f"{'met' if x['met'] else 'MISSED'}")
    if parts:
        from .loader_breakdown import table as parts_table

        official = {r["num_sample"]: r["clips_per_cpu_s"] for r in rows
                    if r["pipeline"] == "official" and r["decoder"] == "decord" and r["workers"] == 1}
        lines += ["", "### Where a video's CPU time goes (pyav)", "", parts_table(parts, official)]
    print("\n".join(lines))
    result = {**result_header("loader", argv, device=info), "versions": versions, "auto_decoder": auto,
              "unavailable": {d: decode.why_unavailable(d) for d in decode.DECODERS if d not in avail},
              "config": {"frames": ns.frames, "rate": ns.rate, "size": ns.size, "batch": ns.batch,
                         "clips": ns.clips, "workers": workers, "num_sample": samples, "sources": sources},
              "files": files, "rows": rows, "goals": g, **({"breakdown": parts} if parts else {})}
    save_result(result, ns, "loader")
    return result


if __name__ == "__main__":
    main()
