"""Write a dataset list into WebDataset shards (the format: ``vmae_fast/video/shards.py``).

    vmae-shards --data-list train.csv --data-root /data/k400 --kind finetune --out /data/k400-shards \\
        [--samples-per-shard 500] [--short-side 320] [--workers 8]

Every official list format (``vmae_fast.video.read_list``; ``--kind`` says which family, as a line
``path a b`` reads differently in each). List line ``i`` becomes sample ``i`` of shard
``i // --samples-per-shard``; each video is probed once (frame count, size, fps; its first frame
decoded) and stored as its own bytes, or, with ``--short-side S``, re-encoded by PyAV to short
side ``S`` (H.264, CRF 23; frame timestamps and rate kept), as the official data preparation
resizes to a short side. A frame folder is stored as its images (resized to ``S`` and saved as
JPEG quality 95 with ``--short-side``).

Resumable: a shard is written as ``shard-NNNNNN.tar.tmp`` and renamed when whole, and
``manifest.json`` (rewritten atomically after each shard) lists the shards done; a rerun with the
same options skips those. An input that fails (missing, corrupt, no video stream) is skipped: one
line on stderr, and a line ``path<TAB>reason`` in ``OUT/skipped.txt``; the exit status is then 1.
An input that kills its worker process (a crash inside FFmpeg) runs once more in another worker,
and if it kills that one too it is skipped the same way; the others are written
(``train/process_pool.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from fractions import Fraction
from pathlib import Path

from vmae_fast.checkpoint import write_atomic
from vmae_fast.errors import EXIT_OK, EXIT_SOME_FAILED, UsageError, check_at_least
from vmae_fast.cli import ArgumentParser, run_cli
from vmae_fast.device import available_cpus
from vmae_fast.video import FRAME_PATTERN, Entry, FrameFolder, read_list
from vmae_fast.video import shards as fmt
from vmae_fast.video.decoders import UnreadableVideo, failure_reason, open_reader

from .data import HYBRID_RULES
from .process_pool import ordered_results

SKIPPED = "skipped.txt"


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(prog="vmae-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--data-list", required=True, help="the dataset list (any official format of --kind)")
    a("--data-root", default="", help="folder the list's paths are relative to")
    a("--kind", required=True, choices=("pretrain", "finetune"),
      help="pretrain: 'path start_idx total_frames [label]'; finetune: 'path label' or 'folder total_frames label'")
    a("--out", required=True, help="folder for shard-NNNNNN.tar, manifest.json, skipped.txt")
    a("--samples-per-shard", type=int, default=500, help="samples a shard (default: %(default)s)")
    a("--short-side", type=int, default=None, help="re-encode every video to this short side (default: keep)")
    a("--workers", type=int, default=available_cpus(), help="processes reading and re-encoding (default: the CPUs this process may use, %(default)s); "
                                            "1 works in this process, where a crash in the decoder ends the run")
    a("--fname-tmpl", default=FRAME_PATTERN, help="frame file names in folders (default: %(default)s)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--debug", action="store_true", help="tracebacks for errors")
    args = ap.parse_args(argv)
    check_at_least(args, {"samples_per_shard": 1, "short_side": 2, "workers": 1})
    return args


# ----------------------------------------------------------------------------- one sample
def _scaled(h: int, w: int, short: int) -> tuple[int, int]:
    """``(h, w)`` with the short side ``short``, both even (H.264 4:2:0 needs even sizes)."""
    if h <= w:
        return short - short % 2, max(2, round(w * short / h / 2) * 2)
    return max(2, round(h * short / w / 2) * 2), short - short % 2


def _reencode(path: str, data: bytes, short: int) -> bytes:
    """The video ``data`` (the file ``path``'s bytes) at short side ``short``: H.264 in MP4, every
    frame with its timestamp. An input FFmpeg cannot open is an ``UnreadableVideo`` in the
    reader's words (``open_reader``), as when it is stored unresized."""
    import av

    buf = io.BytesIO()
    with open_reader(lambda d: av.open(io.BytesIO(d)), data, "pyav", path, not data) as src:
        if not src.streams.video:
            raise UnreadableVideo(path, "no video stream")
        ist = src.streams.video[0]
        h, w = _scaled(ist.codec_context.height, ist.codec_context.width, short)
        with av.open(buf, "w", format="mp4") as dst:
            ost = dst.add_stream("libx264", rate=ist.average_rate or Fraction(25))
            ost.width, ost.height, ost.pix_fmt = w, h, "yuv420p"
            ost.time_base = ist.time_base
            ost.codec_context.options = {"crf": "23"}
            for frame in src.decode(ist):
                out = frame.reformat(width=w, height=h, format="yuv420p", interpolation="BICUBIC")
                out.pts, out.time_base = frame.pts, frame.time_base
                for pkt in ost.encode(out):
                    dst.mux(pkt)
            for pkt in ost.encode():
                dst.mux(pkt)
    return buf.getvalue()


def _fps(data: bytes) -> float | None:
    import av

    with av.open(io.BytesIO(data)) as c:
        r = c.streams.video[0].average_rate
        return float(r) if r else None


def _video_sample(entry: Entry, short: int | None) -> tuple[dict, dict]:
    with open(entry.path, "rb") as f:
        data = f.read()
    if short is not None:
        data = _reencode(entry.path, data, short)
    ext = Path(entry.path).suffix.lower().lstrip(".")
    ext = "mp4" if short is not None or ext not in fmt.VIDEO_EXTS else ext
    with fmt.open_video_bytes(data, "pyav") as r:  # the probe: what the reader will see
        n = len(r)
        if n < 1:
            raise ValueError("no frames")
        first = r.get([0])
        # its packet index, so that a pyav reader of the sample need not demux it again
        index = {"pts_runs": fmt.pack_pts(r.pts), "keyframes": list(r.keys), "index_by": fmt.demuxer_version()} \
            if r.pts is not None else {}
    meta = {"frames": n, "height": int(first.shape[1]), "width": int(first.shape[2]), "fps": _fps(data),
            "folder": False, **index}
    return {ext: data}, meta


def _folder_sample(entry: Entry, tmpl: str, short: int | None) -> tuple[dict, dict]:
    from PIL import Image

    folder = FrameFolder(entry.path, tmpl, entry.start_idx, entry.total_frames)
    members, size = {}, None
    for i in range(len(folder)):
        name = os.path.join(entry.path, tmpl.format(entry.start_idx + i))
        if short is None:
            with open(name, "rb") as f:
                members[fmt.frame_member(i)] = f.read()
            if size is None:
                with Image.open(name) as im:
                    size = im.size
            continue
        with Image.open(name) as im:
            im = im.convert("RGB")
            h, w = _scaled(im.height, im.width, short)
            im = im.resize((w, h), Image.BICUBIC)
            size = im.size
            b = io.BytesIO()
            im.save(b, format="JPEG", quality=95)
            members[fmt.frame_member(i)] = b.getvalue()
    if not members:
        raise ValueError("no frames")
    return members, {"frames": len(members), "width": size[0], "height": size[1], "fps": None, "folder": True}


def _folder_tmpl(path: str, kind: str, tmpl: str) -> str:
    if kind == "pretrain":  # the official hybrid dataset's frame names by folder (train/data.py)
        for marker, t, _ in HYBRID_RULES:
            if marker in path:
                return t
    return tmpl


def make_sample(job: tuple) -> tuple[int, dict | None, str]:
    """``(index, tar sample or None, why it failed)``; runs in a worker process."""
    index, entry, rel, kind, tmpl, short = job
    try:
        if os.path.isdir(entry.path):
            members, meta = _folder_sample(entry, _folder_tmpl(entry.path, kind, tmpl), short)
            meta.update(start_idx=0, total_frames=-1)  # the stored frames are the ones the list named
        else:
            members, meta = _video_sample(entry, short)
            meta.update(start_idx=entry.start_idx, total_frames=entry.total_frames)
        meta.update(path=rel, index=index, label=entry.label)
        return index, {"__key__": fmt.sample_key(index), **members, "json": json.dumps(meta).encode()}, ""
    except Exception as exc:
        why = failure_reason(exc).strip()
        return index, None, (why.splitlines() or [""])[0][:200]


WORKER_DIED = "it killed its worker process twice (a crash in the decoder?)"


def _died(job: tuple) -> tuple[int, None, str]:
    return job[0], None, WORKER_DIED


# ----------------------------------------------------------------------------- the shards
def _settings(args) -> dict:
    return {"list": os.path.abspath(args.data_list), "data_root": os.path.abspath(args.data_root or "."),
            "kind": args.kind, "samples_per_shard": args.samples_per_shard, "short_side": args.short_side}


def _load_progress(out: Path, settings: dict) -> dict:
    """``{shard index: its manifest record}`` of a previous write with the same settings."""
    path = out / fmt.MANIFEST
    if not path.is_file():
        return {}
    try:
        man = json.loads(path.read_text())
    except ValueError:
        raise UsageError(f"--out {out}: {fmt.MANIFEST} is not readable JSON; remove it to start over") from None
    old = man.get("settings", {})
    diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
    if diff:
        raise UsageError(f"--out {out} holds shards written with other settings ({'; '.join(diff)}); "
                         "use another --out or the same settings")
    done = {}
    for rec in man.get("shards", []):
        f = out / rec["name"]
        if rec["count"] == 0 or (f.is_file() and f.stat().st_size == rec["bytes"]):
            done[int(rec["shard"])] = rec
    return done


def _write_manifest(out: Path, settings: dict, records: dict, n_shards: int) -> None:
    """Every shard written so far (one whose every input failed: count 0, no file)."""
    recs = [records[k] for k in sorted(records)]
    write_atomic(out / fmt.MANIFEST, json.dumps({
        "format": fmt.FORMAT, "complete": len(recs) == n_shards, "settings": settings,
        "total": sum(r["count"] for r in recs), "short_side": settings["short_side"], "shards": recs},
        indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        listed = read_list(args.data_list, "", args.kind)  # the list's own paths name the samples
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--data-list: {exc}") from None
    rel = [e.path for e in listed]
    entries = [dataclasses.replace(e, path=os.path.join(args.data_root, e.path)) for e in listed] \
        if args.data_root else listed
    if args.short_side is not None or any(not os.path.isdir(e.path) for e in entries):
        try:
            import av  # noqa: F401
        except ImportError:
            raise UsageError("vmae-shards needs PyAV to probe and re-encode videos: pip install av") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)
    per = args.samples_per_shard
    n_shards = -(-len(entries) // per)
    records = _load_progress(out, settings)
    todo = [k for k in range(n_shards) if k not in records]
    for stale in out.glob("*.tar.tmp"):  # a shard an interrupted write left half done
        stale.unlink()

    jobs = ((i, entries[i], rel[i], args.kind, args.fname_tmpl, args.short_side)
            for k in todo for i in range(k * per, min((k + 1) * per, len(entries))))
    bar = _progress(len(entries), sum(r["count"] + len(r["skipped"]) for r in records.values()), args.no_progress)
    results = ordered_results(make_sample, jobs, args.workers, _died) if args.workers > 1 else map(make_sample, jobs)
    try:
        for k in todo:
            records[k] = _write_shard(out, k, min(per, len(entries) - k * per), results, rel, bar)
            _write_manifest(out, settings, records, n_shards)
    finally:
        if hasattr(results, "close"):
            results.close()
        if bar is not None:
            bar.close()
    skipped = [s for k in sorted(records) for s in records[k]["skipped"]]
    write_atomic(out / SKIPPED, "".join(f"{p}\t{why}\n" for p, why in skipped))
    total = sum(r["count"] for r in records.values())
    print(f"vmae-shards: {total} samples in {sum(1 for r in records.values() if r['count'])} shards in {out}"
          + (f"; {len(skipped)} inputs skipped (listed in {out / SKIPPED})" if skipped else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if skipped else EXIT_OK


def _write_shard(out: Path, k: int, n: int, results, rel: list[str], bar) -> dict:
    from webdataset import TarWriter

    name = fmt.SHARD_NAME.format(k)
    tmp = out / (name + ".tmp")
    count, skipped = 0, []
    # mtime fixed: a shard's bytes depend only on its samples (a rerun writes the same file)
    with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0) as tw:
        for _ in range(n):
            index, sample, why = next(results)
            if sample is None:
                line = f"vmae-shards: skipping {rel[index]}: {why}"
                bar.write(line, file=sys.stderr) if bar is not None else print(line, file=sys.stderr, flush=True)
                skipped.append([rel[index], why])
            else:
                tw.write(sample)
                count += 1
            if bar is not None:
                bar.update(1)
    if count == 0:
        tmp.unlink()
        return {"shard": k, "name": name, "count": 0, "bytes": 0, "skipped": skipped}
    os.replace(tmp, out / name)
    return {"shard": k, "name": name, "count": count, "bytes": (out / name).stat().st_size, "skipped": skipped}


def _progress(total: int, initial: int, off: bool):
    if off:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the shards/train extras
        return None
    return tqdm(total=total, initial=initial, unit="video", dynamic_ncols=True, file=sys.stderr)


def cli() -> None:
    """The ``vmae-shards`` console script."""
    sys.exit(run_cli(main, "vmae-shards", kept="the shards written are whole and listed in the manifest; the same "
                                               "command continues from them"))


if __name__ == "__main__":
    cli()
