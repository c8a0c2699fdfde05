"""uint8 crop + resize against PIL (the official resize), end to end against the official
transform, and the collation into one preallocated batch."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.official_pipeline import MEAN, STD, OfficialTransform
from train import data as D
from train import transforms as T
from vmae_fast.video import resize as RS

av = pytest.importorskip("av", reason="PyAV (the `test` extra) decodes the test footage")

DATA = Path(__file__).parent / "data"
# Measured on this footage, 12 crops x 16 frames (torch 2.6.0 and 2.14.1, CPU): the uint8 resize
# equals PIL's BILINEAR on 99.79% of values and is never more than 1 away; the float round trip
# (the fallback, and what we did before) on 91.7%, also within 1.
EXACT_SHARE = 0.99


@pytest.fixture(scope="module")
def footage() -> list[torch.Tensor]:
    """16 frames ``(T, H, W, 3)`` from each real test file."""
    out = []
    for name in ("bikes.mp4", "bigbuckbunny.mp4"):
        with av.open(str(DATA / name)) as c:
            frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(16), c.decode(video=0))]
        out.append(torch.from_numpy(np.stack(frames)))
    return out


def pil_crop_resize(frames: torch.Tensor, box, size) -> torch.Tensor:
    x, y, w, h = box
    ims = [Image.fromarray(f.numpy()).crop((x, y, x + w, y + h)).resize((size, size), Image.BILINEAR) for f in frames]
    return torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2)


def boxes(w, h, size, k):
    dist = sorted(T.multiscale_crop_boxes(w, h, size))
    return [dist[i] for i in np.random.default_rng(0).choice(len(dist), k, replace=False)]


@pytest.mark.parametrize("uint8", [True, False], ids=["uint8", "float-fallback"])
def test_resize_is_pils_bilinear_within_one(footage, monkeypatch, uint8):
    monkeypatch.setattr(RS, "UINT8_RESIZE", uint8 and RS.UINT8_RESIZE)
    diffs = []
    for frames in footage:
        H, W = frames.shape[1:3]
        for size in (224, 160):
            for box in boxes(W, H, size, 3):
                ours = RS.crop_resize(frames, box, size)
                assert ours.dtype == torch.uint8 and tuple(ours.shape) == (16, 3, size, size)
                diffs.append((ours.int() - pil_crop_resize(frames, box, size).int()).abs().flatten())
    d = torch.cat(diffs)
    exact = (d == 0).float().mean().item()
    print(f"resize vs PIL ({'uint8' if uint8 else 'float'}): {exact:.4f} of values equal, max diff {d.max().item()}")
    assert d.max().item() <= 1
    assert exact >= (EXACT_SHARE if uint8 else 0.85), exact


def test_uint8_resize_is_available_on_this_torch():
    # torch >= 2.1 has it on CPU (checked: 2.6.0, 2.14.1); the float fallback is for older builds
    assert RS.UINT8_RESIZE, torch.__version__


def test_views_match_the_official_transform(footage):
    """Same frames, same crop box: ours (uint8) vs the official (PIL, float, normalized)."""
    frames = footage[0][:, :256, :340]  # a 340x256 frame
    official = OfficialTransform(224)
    box_seen = []
    for seed in range(4):
        official.crop.rand = random.Random(seed)
        images = [Image.fromarray(f.numpy()).convert("RGB") for f in frames]
        off = official(images)  # (3, T, 224, 224) normalized float
        official.crop.rand = random.Random(seed)  # replay the official's draw
        box = official.crop.sample(340, 256)
        box_seen.append(box)
        ours = RS.crop_resize(frames, box, 224).transpose(0, 1)  # (3, T, 224, 224) uint8
        m, s = torch.tensor(MEAN).view(3, 1, 1, 1), torch.tensor(STD).view(3, 1, 1, 1)
        back = (off * s + m) * 255  # the official pixels before normalization
        d = (ours.float() - back).abs()
        assert d.max().item() <= 1 + 1e-3
        assert (d < 1e-3).float().mean().item() >= EXACT_SHARE
    assert len(set(box_seen)) > 1


# ----------------------------------------------------------------------------- collate
def _views(b, v, t=4, s=8):
    g = torch.Generator().manual_seed(b)
    # channels-last (T, 3, S, S) as the resize returns them, then viewed (3, T, S, S)
    return [torch.randint(0, 256, (t, s, s, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2).transpose(0, 1)
            for _ in range(v)]


def test_collate_writes_views_into_one_contiguous_batch():
    samples = [{"video": _views(b, 3), "label": b, "index": 10 + b, "skipped": [f"x{b}"] if b else []}
               for b in range(2)]
    out = D.Collate(pin_memory=False)(samples)
    v = out["video"]
    assert v.dtype == torch.uint8 and tuple(v.shape) == (6, 3, 4, 8, 8) and v.is_contiguous()
    for k in range(6):
        assert torch.equal(v[k], samples[k // 3]["video"][k % 3])
    assert out["label"].tolist() == [0, 0, 0, 1, 1, 1] and out["index"].tolist() == [10, 11]
    assert out["skipped"] == ["x1"]
    # the former sample layout, one (V, 3, T, S, S) tensor, still collates
    old = [{"video": torch.stack(s["video"]), "label": s["label"], "index": s["index"], "skipped": []}
           for s in samples]
    assert torch.equal(D.collate(old)["video"], v)


class _Views(torch.utils.data.Dataset):
    """Sample ``i``: ``v`` views seeded by ``i``; ``None`` (not loaded) where ``i % 3 == 2`` when
    ``gaps``."""

    def __init__(self, n=4, v=2, gaps=False):
        self.n, self.v, self.gaps = n, v, gaps

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.gaps and i % 3 == 2:
            return {"video": None, "label": i, "index": i, "skipped": [f"f{i}"]}
        return {"video": _views(i, self.v), "label": i, "index": i, "skipped": []}


def _in_process(ds, batch):
    """The batches collated in this process, in plain memory: the reference."""
    idx = list(range(len(ds)))
    return [D.Collate(pin_memory=False)([ds[i] for i in idx[k:k + batch]]) for k in range(0, len(idx), batch)]


def _same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            if isinstance(w[key], torch.Tensor):
                assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key
            else:
                assert g[key] == w[key], key


@pytest.mark.parametrize("v,gaps", [(1, False), (4, True)])
def test_collate_in_a_worker_gives_the_in_process_batches_in_shared_memory(v, gaps):
    # every batch kept by the main process until the end: a later batch must not have written
    # into an earlier one (the worker reuses only its private staging buffer)
    ds = _Views(n=7, v=v, gaps=gaps)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=D.collate)
    batches = list(loader)
    assert all(b["video"].is_shared() and b["video"].is_contiguous() for b in batches)
    _same_batches(batches, _in_process(ds, 3))
    if gaps:  # samples 2 and 5 not loaded: left out of video, label and index, marked in loaded
        assert batches[0]["loaded"].tolist() == [True, True, False] and batches[0]["skipped"] == ["f2"]
        assert tuple(batches[0]["video"].shape) == (2 * v, 3, 4, 8, 8)


def test_collate_refuses_samples_with_different_view_counts():
    samples = [{"video": _views(0, 2), "label": 0, "index": 0, "skipped": []},
               {"video": _views(1, 1), "label": 1, "index": 1, "skipped": []}]
    with pytest.raises(ValueError) as e:
        D.collate(samples)
    assert str(e.value) == "every sample of a batch must have the same number of views"


def test_collate_in_the_main_process_allocates_plain_memory():
    out = D.Collate(pin_memory=False)([{"video": _views(0, 2), "label": 0, "index": 0, "skipped": []}])
    assert not out["video"].is_shared() and not out["video"].is_pinned()
    assert torch.equal(out["video"][1], _views(0, 2)[1])


def test_collate_shared_is_asked_not_guessed(monkeypatch):
    sample = {"video": _views(0, 2), "label": 0, "index": 0, "skipped": []}
    out = D.Collate(pin_memory=False, shared=True)([sample])  # the main process, asked for a worker's batch
    assert out["video"].is_shared() and torch.equal(out["video"], torch.stack(_views(0, 2)))
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    out = D.Collate(pin_memory=False, shared=False)([sample])  # in a worker, asked for plain memory
    assert not out["video"].is_shared() and torch.equal(out["video"], torch.stack(_views(0, 2)))


def _refused(*args, **kwargs):
    raise AssertionError("this path was not to be taken")


@pytest.mark.parametrize("path", ["memfd", "memfd refused", "file_system strategy", "no _new_shared"])
@pytest.mark.parametrize("pin", [False, True])
def test_collate_in_a_worker_writes_into_shared_memory(monkeypatch, path, pin):
    # in-process, as a DataLoader worker (get_worker_info() is set there); each path forced by
    # refusing the others: the staged batch written into a memfd, or (memfd_create refused by
    # the kernel, or the file_system sharing strategy) allocated by UntypedStorage._new_shared
    # and filled there, or (a torch without that helper) a plain tensor moved there. pin_memory
    # is the main process's business: a worker on a machine without CUDA ignores it
    import os

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    if path == "memfd":
        monkeypatch.setattr(torch.UntypedStorage, "_new_shared", staticmethod(_refused))
        monkeypatch.setattr(torch.Tensor, "share_memory_", _refused)
    else:
        if path != "file_system strategy":  # where it is not even tried
            def enosys(*args):
                raise OSError(38, "Function not implemented")

            monkeypatch.setattr(os, "memfd_create", enosys)
        else:
            monkeypatch.setattr(os, "memfd_create", _refused)
        if path == "file_system strategy":
            monkeypatch.setattr(torch.multiprocessing, "get_sharing_strategy", lambda: "file_system")
        if path == "no _new_shared":
            def missing(*args):
                raise AttributeError("refused here")

            monkeypatch.setattr(torch.UntypedStorage, "_new_shared", staticmethod(missing))
        else:
            monkeypatch.setattr(torch.Tensor, "share_memory_", _refused)
    samples = [{"video": _views(b, 2), "label": b, "index": b, "skipped": []} for b in range(3)]
    v = D.Collate(pin_memory=pin)(samples)["video"]
    assert v.is_shared() and not v.is_pinned() and v.dtype == torch.uint8 and v.is_contiguous()
    assert tuple(v.shape) == (6, 3, 4, 8, 8) and v.untyped_storage().nbytes() == 6 * 3 * 4 * 8 * 8
    for k in range(6):
        assert torch.equal(v[k], samples[k // 2]["video"][k % 2])
    if path == "memfd":  # already a file-descriptor storage: sharing it maps no new memory
        ptr = v.untyped_storage().data_ptr()
        v.untyped_storage()._share_fd_cpu_()
        assert v.untyped_storage().data_ptr() == ptr


def test_worker_batch_stages_privately_and_writes_each_batch_anew():
    # a batch already handed over keeps its values while the staging buffer is refilled for the
    # next ones, larger and smaller
    from train import worker_batch as W

    first = W.shared_batch(_views(0, 2))
    big = W.shared_batch(_views(1, 5))
    small = W.shared_batch(_views(2, 1, t=2, s=4))
    for out, views in ((first, _views(0, 2)), (big, _views(1, 5)), (small, _views(2, 1, t=2, s=4))):
        assert out.is_shared() and torch.equal(out, torch.stack(views))
    assert first.untyped_storage().data_ptr() != W._staging.data_ptr()


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork")
@pytest.mark.parametrize("memfd", [True, False])
def test_collate_in_a_worker_allocates_the_shared_batch_directly(monkeypatch, memfd):
    # share_memory_ is the last fallback (an allocation and then a copy); a forked worker sees it
    # refused, so only a batch made in shared memory passes: through a memfd, or (memfd_create
    # refused in the worker) allocated by UntypedStorage._new_shared
    import os

    monkeypatch.setattr(torch.Tensor, "share_memory_", _refused)
    if not memfd:
        def enosys(*args):
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "memfd_create", enosys)
    loader = torch.utils.data.DataLoader(_Views(), batch_size=2, num_workers=1, collate_fn=D.collate,
                                         multiprocessing_context="fork")
    batches = list(loader)
    assert all(b["video"].is_shared() and tuple(b["video"].shape) == (4, 3, 4, 8, 8) for b in batches)
    assert torch.equal(batches[0]["video"][1], _views(0, 2)[1]) and torch.equal(batches[1]["video"][2], _views(3, 2)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_collate_pins_in_a_cuda_process():
    out = D.collate([{"video": _views(0, 1), "label": 0, "index": 0, "skipped": []}])
    assert out["video"].is_pinned() and out["video"].pin_memory() is out["video"]
