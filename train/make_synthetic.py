"""A small dataset of moving shapes for smoke runs and tests; Kinetics-like clips for benchmarks.

    python -m train.make_synthetic --out DIR --n 64
    python -m train.make_synthetic --out DIR --n 8 --style kinetics

Writes ``DIR/videos/*.mp4`` (PyAV) and the lists ``pretrain.txt`` (``path 0 -1``),
``train.txt`` / ``val.txt`` (``path label``, label = shape: circle, square, triangle, cross).
Default style: a smooth colour gradient background and one shape (in a colour of its class)
moving in a straight line, so a masked autoencoder has something predictable to learn and a
classifier a class to see.

``--style kinetics`` (``write_kinetics_like``): what a video loader meets in Kinetics, for timing
decoders: 10 s at 25 or 30 fps, short side 256 to 320 (landscape and portrait), H.264 (libx264 at
its defaults: CRF 23, preset medium, GOP 250 with scene cuts, 3 B-frames), and content that costs
what real footage costs to decode: a textured background that pans, moving shapes, sensor-like
grain (656-949 kbit/s at 426x320 to 568x320: the ``kbit_s`` of the six clips in
``bench/results/loader-intel-xeon-2t-2026-11-22.json``; how their decoding compares with real
footage's: the README's loader section, against ``tests/data``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from vmae_fast.cli import ArgumentParser, run_cli
from vmae_fast.errors import UsageError, check_at_least, check_output

PROG = "python -m train.make_synthetic"

SHAPES = ("circle", "square", "triangle", "cross")
CLASS_COLORS = ((230, 30, 30), (30, 200, 30), (40, 40, 230), (240, 240, 40))


def render(shape: int, frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``(frames, height, width, 3)`` uint8."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * xx / width + np.sin(theta) * yy / height + 1) / 2  # 0..1
    c0, c1 = rng.uniform(0, 50, 3), rng.uniform(205, 255, 3)  # strong ramp: clear cube targets
    bg = c0 + ramp[..., None] * (c1 - c0)
    # a colour per class (jittered) on top of the shape: an easy cue, so a tiny model on a short
    # CPU run generalizes to the held-out videos instead of memorizing backgrounds
    color = np.clip(np.array(CLASS_COLORS[shape]) + rng.uniform(-25, 25, 3), 0, 255)
    r = min(height, width) * rng.uniform(0.2, 0.3)
    p0 = np.array([rng.uniform(r, width - r), rng.uniform(r, height - r)])
    v = rng.uniform(-1.5, 1.5, 2)
    out = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        cx, cy = p0 + v * f
        cx, cy = r + (cx - r) % max(width - 2 * r, 1), r + (cy - r) % max(height - 2 * r, 1)
        dx, dy = xx - cx, yy - cy
        if shape == 0:
            inside = dx ** 2 + dy ** 2 <= r ** 2
        elif shape == 1:
            inside = (abs(dx) <= r * 0.8) & (abs(dy) <= r * 0.8)
        elif shape == 2:
            inside = (dy <= r * 0.7) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
        else:
            inside = ((abs(dx) <= r * 0.3) & (abs(dy) <= r)) | ((abs(dy) <= r * 0.3) & (abs(dx) <= r))
        img = bg.copy()
        img[inside] = color
        out[f] = img.clip(0, 255).astype(np.uint8)
    return out


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 10) -> None:
    import av

    with av.open(str(path), mode="w") as c:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        if codec == "libx264":
            s.options = {"crf": "12", "preset": "ultrafast"}
        for fr in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


# (width, height) of Kinetics-like clips: short side 256-320, landscape and portrait
KINETICS_SIZES = ((340, 256), (568, 320), (320, 568), (426, 320), (456, 256))


def render_textured(frames: int, height: int, width: int, rng: np.random.Generator, label: int = 0) -> np.ndarray:
    """``(frames, height, width, 3)`` uint8: a multi-scale noise texture panning under the frame,
    two moving shapes (one in the class colour) and per-frame grain."""
    pad = 160
    big = np.zeros((height + pad, width + pad, 3), np.float32)
    for cell in (3, 12, 48):  # blocky noise at three scales: detail the encoder has to spend bits on
        n = rng.uniform(0, 255 / 3, ((height + pad) // cell + 2, (width + pad) // cell + 2, 3)).astype(np.float32)
        big += np.repeat(np.repeat(n, cell, 0), cell, 1)[:height + pad, :width + pad]
    out = np.empty((frames, height, width, 3), np.uint8)
    phase = rng.uniform(0, 2 * np.pi, 4)
    color = np.array(CLASS_COLORS[label % len(CLASS_COLORS)], np.float32)
    r = min(height, width) // 8
    for f in range(frames):
        ox = int(pad / 2 + pad / 2.5 * np.sin(f / 40 + phase[0]))
        oy = int(pad / 2 + pad / 2.5 * np.cos(f / 55 + phase[1]))
        img = big[oy:oy + height, ox:ox + width].copy()
        for k, c in enumerate((color, 255 - color)):
            cx = int(width / 2 + width / 3 * np.sin(f / (17 + 6 * k) + phase[2 + k]))
            cy = int(height / 2 + height / 3 * np.cos(f / (23 - 5 * k) + phase[3 - k]))
            img[max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = c
        img += rng.normal(0, 4, img.shape).astype(np.float32)
        out[f] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_kinetics_like(path: str | os.PathLike, seconds: float = 10, fps: int | str = 25, width: int = 340,
                        height: int = 256, seed: int = 0, label: int = 0, preset: str | None = None,
                        gop: int | None = None) -> None:
    """One Kinetics-like H.264 mp4 (see the module doc). ``preset``/``gop`` left ``None`` keep
    libx264's defaults (medium, 250); tests pass a faster preset or a short GOP."""
    import av
    from fractions import Fraction

    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even for yuv420p, got {height}x{width}")
    rate = Fraction(fps)
    frames = render_textured(int(round(seconds * rate)), height, width, np.random.default_rng(seed), label)
    with av.open(str(path), mode="w") as c:
        if "libx264" not in av.codecs_available:
            raise RuntimeError("this PyAV build has no libx264 encoder")
        s = c.add_stream("libx264", rate=rate)
        s.height, s.width, s.pix_fmt = height, width, "yuv420p"
        if preset is not None:
            s.options = {"preset": preset}
        if gop is not None:
            s.codec_context.gop_size = gop
        for fr in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def make_kinetics_like(out: str | os.PathLike, n: int = 8, seconds: float = 10, seed: int = 0,
                       sizes=KINETICS_SIZES, preset: str | None = None) -> list[Path]:
    """``n`` Kinetics-like clips in ``out/videos`` (sizes cycle over ``sizes``, 25 and 30 fps
    alternate) and ``out/pretrain.txt``; returns the video paths."""
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        fps = 25 if i % 2 == 0 else 30
        p = out / "videos" / f"kin{i:03d}_{w}x{h}_{fps}fps.mp4"
        write_kinetics_like(p, seconds, fps, w, h, seed=seed + i, label=i, preset=preset)
        paths.append(p)
    (out / "pretrain.txt").write_text("".join(f"videos/{p.name} 0 -1\n" for p in paths))
    return paths


def make_dataset(out: str | os.PathLike, n: int = 64, frames: int = 24, height: int = 48, width: int = 64,
                 seed: int = 0, val_fraction: float = 0.25) -> dict[str, Path]:
    """Write ``n`` videos and the list files; returns the list paths. Labels cycle over the
    shapes, so every split is balanced; the last ``val_fraction`` of videos form ``val.txt``."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even for yuv420p, got {height}x{width}")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_val = max(1, int(n * val_fraction))
    rows = []
    for i in range(n):
        label = i % len(SHAPES)
        rel = f"videos/{i:05d}_{SHAPES[label]}.mp4"
        write_mp4(out / rel, render(label, frames, height, width, rng))
        rows.append((rel, label))
    train, val = rows[:n - n_val], rows[n - n_val:]
    lists = {"pretrain": out / "pretrain.txt", "train": out / "train.txt", "val": out / "val.txt"}
    lists["pretrain"].write_text("".join(f"{p} 0 -1\n" for p, _ in train))
    lists["train"].write_text("".join(f"{p} {y}\n" for p, y in train))
    lists["val"].write_text("".join(f"{p} {y}\n" for p, y in val))
    return lists


def main(argv=None) -> None:
    ap = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", choices=("shapes", "kinetics"), default="shapes")
    ap.add_argument("--seconds", type=float, default=10, help="kinetics style: clip length")
    a = ap.parse_args(argv)
    check_at_least(a, {"n": 2, "frames": 1, "height": 2, "width": 2})
    if a.height % 2 or a.width % 2:
        raise UsageError(f"--height and --width must be even (H.264 4:2:0), got {a.height}x{a.width}")
    if not a.seconds > 0:
        raise UsageError(f"--seconds must be > 0, got {a.seconds}")
    check_output("--out", a.out, folder=True)
    if a.style == "kinetics":
        paths = make_kinetics_like(a.out, a.n, a.seconds, a.seed)
        print(f"wrote {len(paths)} Kinetics-like videos to {a.out}/videos; list: {a.out}/pretrain.txt")
        return
    lists = make_dataset(a.out, a.n, a.frames, a.height, a.width, a.seed)
    print(f"wrote {a.n} videos to {a.out}/videos; lists: " + ", ".join(str(p) for p in lists.values()))


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
