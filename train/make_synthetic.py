"""A small dataset of moving shapes for smoke runs and tests.

    python -m train.make_synthetic --out DIR --n 64

Writes ``DIR/videos/*.mp4`` (PyAV) and the lists ``pretrain.txt`` (``path 0 -1``),
``train.txt`` / ``val.txt`` (``path label``, label = shape: circle, square, triangle, cross).
Each video: a smooth colour gradient background and one shape (in a colour of its class) moving
in a straight line, so a masked autoencoder has something predictable to learn and a classifier
a class to see.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    lists = make_dataset(a.out, a.n, a.frames, a.height, a.width, a.seed)
    print(f"wrote {a.n} videos to {a.out}/videos; lists: " + ", ".join(str(p) for p in lists.values()))


if __name__ == "__main__":
    main()
