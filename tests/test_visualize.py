"""vmae-visualize (vmae_fast.tools.visualize): a perfect prediction reproduces the clip (the un-normalization with each
cube's statistics), the masked row shows only encoder-visible cubes, and the PNG grid's shape."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vmae_fast
from vmae_fast.tools import visualize as V

VIDEO = str(Path(__file__).resolve().parent / "data" / "carphone_distorted.mp4")


def _pixels01(clip):
    """The clip's pixels in [0, 1], by hand: /255, or the ImageNet normalization undone."""
    if clip.dtype == torch.uint8:
        return clip.float() / 255
    return clip * torch.tensor(vmae_fast.IMAGENET_STD).view(1, 3, 1, 1, 1) \
        + torch.tensor(vmae_fast.IMAGENET_MEAN).view(1, 3, 1, 1, 1)


def _official_target(pix, decoder_idx, normalize, t=2, p=8):
    """The official reconstruction target, written out (tubelet 2, patch 8): cubes in (t, h, w)
    token order, pixels (t, h, w, c) inside a cube, each channel standardized over the cube
    with the unbiased variance and eps 1e-6 added to the std; rows at ``decoder_idx``."""
    B, C, T, H, W = pix.shape
    cubes = pix.reshape(B, C, T // t, t, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    cubes = cubes.reshape(B, -1, t * p * p, C)
    if normalize:
        cubes = (cubes - cubes.mean(dim=2, keepdim=True)) / (cubes.std(dim=2, keepdim=True) + 1e-6)
    rows = torch.stack([cubes[b, decoder_idx[b]] for b in range(B)])
    return rows.reshape(B, decoder_idx.shape[1], -1)


@pytest.mark.parametrize("normalize_target", [True, False])
@pytest.mark.parametrize("clip_dtype", [torch.uint8, torch.float32])
def test_perfect_prediction_reproduces_the_clip(normalize_target, clip_dtype):
    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (1, 3, 4, 32, 48), dtype=torch.uint8, generator=g)
    if clip_dtype == torch.float32:  # ImageNet-normalized float clip
        clip = (clip.float() / 255 - torch.tensor(vmae_fast.IMAGENET_MEAN).view(1, 3, 1, 1, 1)) \
            / torch.tensor(vmae_fast.IMAGENET_STD).view(1, 3, 1, 1, 1)
    masks = vmae_fast.DualMask.sample(1, (2, 4, 6), 0.75, 0.0, generator=g)
    pix = _pixels01(clip)
    pred = _official_target(pix, masks.decoder_idx, normalize_target)
    torch.testing.assert_close(V.perfect_prediction(clip, masks, tubelet=2, patch=8,
                                                    normalize_target=normalize_target), pred, rtol=1e-5, atol=1e-5)
    rows = V.reconstruct(clip, pred, masks, tubelet=2, patch=8, normalize_target=normalize_target)
    torch.testing.assert_close(rows["original"], pix, rtol=0, atol=1e-6)
    assert (rows["reconstructed"] - pix).abs().max() < 1e-5
    # row 2: encoder-masked cubes black, visible cubes the original
    cube_masked = masks.encoder_masked.view(2, 4, 6).repeat_interleave(2, 0).repeat_interleave(8, 1) \
        .repeat_interleave(8, 2)  # (T, H, W)
    assert (rows["masked"][0][:, cube_masked] == 0).all()
    assert torch.equal(rows["masked"][0][:, ~cube_masked], rows["original"][0][:, ~cube_masked])
    # a wrong prediction does not reproduce it (the test can fail)
    bad = V.reconstruct(clip, pred + 0.5, masks, tubelet=2, patch=8, normalize_target=normalize_target)
    assert (bad["reconstructed"] - rows["original"]).abs().max() > 0.01


def test_grid_png_of_a_model_on_a_video(tmp_path):
    pytest.importorskip("av", reason="PyAV (the test extra) reads the test video")
    pytest.importorskip("PIL", reason="the PNG is written with Pillow (train/test extras)")
    from PIL import Image

    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", depth=1, decoder_depth=1, num_frames=4,
                                            img_size=32, patch_size=8)
    ckpt = tmp_path / "pt.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "recon.png"
    assert V.main([VIDEO, "--checkpoint", str(ckpt), "--num-frames", "4", "--img-size", "32", "--out", str(out),
                   "--encoder-ratio", "0.75"]) == 0
    with Image.open(out) as im:  # 32-pixel tiles enlarged 4x to MIN_TILE, labels left, 3 title lines above
        png = np.asarray(im.convert("RGB"))
        assert im.mode == "RGB" and png.shape[1] > 4 * (4 * 32 + 3 * V.GAP) and png.shape[0] > 4 * (3 * 32 + 2 * V.GAP)
    # the function: the top row is the clip itself, tile by tile
    clip = V.read_clip(VIDEO, 4, 32)
    masks = vmae_fast.DualMask.sample(1, model.grid, 0.75, 0.0)
    img = V.visualize(model, clip, masks)
    assert img.shape == (3 * 32 + 2 * V.GAP, 4 * 32 + 3 * V.GAP, 3)
    # the PNG's top row is the clip's frames, every pixel repeated 4x4, below the title lines and
    # right of the row labels (rows 2-3 follow the CLI's own seeded masks)
    body = img[:32].repeat(4, axis=0).repeat(4, axis=1)
    h, w = 3 * 32 * 4 + 2 * V.GAP * 4, body.shape[1]
    y = png.shape[0] - 8 - h
    xs = [x for x in range(png.shape[1] - w + 1) if (png[y:y + 128, x:x + w] == body).all()]
    assert len(xs) == 1 and y > 3 * 14 and xs[0] > 60, (y, xs)  # room for the title and the labels
    assert (png[y:, :xs[0]] < 128).any()  # the row labels are drawn (dark text on white)
    for f in range(4):
        x = f * (32 + V.GAP)
        assert (torch.from_numpy(img[:32, x:x + 32]) == clip[0, :, f].permute(1, 2, 0)).all()
    # a --start past the video (120 frames) is its one line, not a clip of the last frame repeated
    assert torch.equal(V.read_clip(VIDEO, 4, 32, start=119)[0, :, 0], V.read_clip(VIDEO, 4, 32, start=119)[0, :, 3])
    with pytest.raises(ValueError) as err:
        V.read_clip(VIDEO, 4, 32, start=120)
    assert str(err.value) == "--start 120 is past the video's last frame, 119"


@pytest.mark.parametrize("tile, scale", [(32, 4), (112, 1), (224, 1), (56, 2), (16, 7), (100, 2)])
def test_annotate_enlarges_small_tiles_to_a_readable_size(tile, scale):
    pytest.importorskip("PIL", reason="the labels are drawn with Pillow (train/test extras)")
    grid = np.zeros((3 * tile + 2 * V.GAP, 2 * tile + V.GAP, 3), dtype=np.uint8)
    grid[:tile, :tile] = (200, 10, 90)  # the first tile in a colour no text has, to find it again
    out = V.annotate(grid, tile, ["a title"])
    found = np.argwhere((out == (200, 10, 90)).all(-1))
    (y0, x0), (y1, x1) = found.min(0), found.max(0)
    assert (y1 - y0 + 1, x1 - x0 + 1) == (tile * scale, tile * scale) and tile * scale >= V.MIN_TILE
    assert out.shape[0] >= grid.shape[0] * scale and out.dtype == np.uint8
