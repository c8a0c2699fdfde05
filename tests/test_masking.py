"""Masks exactly as docs/semantics.md §3: counts, tube repetition, the running-cell patterns,
seeded determinism, and no host sync on the sampling and forward paths."""
from __future__ import annotations

import contextlib
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vmae_fast import DualMask, masking
from vmae_fast.masking import running_cell_patterns

from conftest import on_devices, small_pretrain


def official_running_cell(frames, h, w, ratio, start):
    """The official Cell/RunningCell generator restated in numpy: queue [1]*k + [0]*(4-k),
    pointer set to ``start`` then advanced once before each frame, cell[i] = queue[(i+ptr)%4]."""
    k = int(4 * ratio)
    queue = np.hstack([np.ones(k), np.zeros(4 - k)])
    ptr = start
    out = []
    for _ in range(frames):
        ptr += 1
        cell = queue[(np.arange(4) + ptr) % 4].reshape(2, 2)
        out.append(np.tile(cell, [h // 2, w // 2]).flatten())
    return np.stack(out).astype(bool).reshape(-1)


def test_vit_b_tube_counts():
    m = DualMask.sample(4, (8, 14, 14), 0.9, 0.5, generator=torch.Generator().manual_seed(0))
    assert m.encoder_masked.shape == (4, 1568)
    per_frame = m.encoder_masked.view(4, 8, 196)
    assert (per_frame.sum(-1) == 176).all()
    assert (per_frame == per_frame[:, :1]).all(), "tube mask must repeat over time"
    assert m.visible_idx.shape == (4, 160)
    assert m.decoder_idx.shape == (4, 784)
    assert (m.decoder_masked.view(4, 8, 196).sum(-1) == 98).all()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_patterns_match_official(ratio):
    grid = (5, 4, 6)
    pats = running_cell_patterns(grid, ratio)
    assert pats.shape == (4, 5 * 4 * 6)
    for s in range(4):
        assert np.array_equal(pats[s].numpy(), official_running_cell(*grid, ratio, s)), s
    k = int(4 * ratio)
    assert (pats.view(4, 5, 24).sum(-1) == 24 * k // 4).all()
    # the four start pointers give four different patterns; each frame's pattern shifts
    assert len({tuple(p.tolist()) for p in pats}) == 4


def test_sampled_decoder_masks_are_the_patterns_and_idx_sorted():
    grid = (4, 6, 6)
    m = DualMask.sample(16, grid, 0.8, 0.5, generator=torch.Generator().manual_seed(3))
    pats = running_cell_patterns(grid, 0.5)
    for b in range(16):
        assert any(torch.equal(m.decoder_masked[b], p) for p in pats)
        assert torch.equal(m.decoder_idx[b], (~m.decoder_masked[b]).nonzero().flatten())
        assert torch.equal(m.visible_idx[b], (~m.encoder_masked[b]).nonzero().flatten())


def test_encoder_only_decoder_is_complement():
    m = DualMask.sample(3, (4, 4, 4), 0.75, 0.0)
    assert torch.equal(m.decoder_masked, ~m.encoder_masked)
    assert (m.loss_weight() == 1).all()


def test_random_masking_counts():
    m = DualMask.sample(5, (4, 6, 6), 0.9, 0.5, encoder_mask_type="random")
    assert (m.encoder_masked.sum(1) == int(0.9 * 144)).all()
    assert m.n_visible == 144 - int(0.9 * 144)


def test_seeded_determinism_and_variety():
    a = DualMask.sample(8, (8, 14, 14), 0.9, 0.5, generator=torch.Generator().manual_seed(7))
    b = DualMask.sample(8, (8, 14, 14), 0.9, 0.5, generator=torch.Generator().manual_seed(7))
    c = DualMask.sample(8, (8, 14, 14), 0.9, 0.5, generator=torch.Generator().manual_seed(8))
    for x, y in zip((a.encoder_masked, a.decoder_masked, a.visible_idx, a.decoder_idx),
                    (b.encoder_masked, b.decoder_masked, b.visible_idx, b.decoder_idx)):
        assert torch.equal(x, y)
    assert not torch.equal(a.encoder_masked, c.encoder_masked)
    assert len({tuple(r.tolist()) for r in a.encoder_masked}) == 8


def test_tube_positions_uniform():
    # each spatial position is masked with probability 176/196 over many draws
    m = DualMask.sample(4000, (1, 14, 14), 0.9, 0.0, generator=torch.Generator().manual_seed(0))
    freq = m.encoder_masked.float().mean(0)
    assert (freq - 176 / 196).abs().max() < 0.03


def test_from_bool_roundtrip():
    m = DualMask.sample(3, (4, 4, 4), 0.5, 0.25)
    r = DualMask.from_bool(m.encoder_masked.int(), m.decoder_masked)
    for x, y in zip((m.visible_idx, m.decoder_idx), (r.visible_idx, r.decoder_idx)):
        assert torch.equal(x, y)
    r2 = DualMask.from_bool(m.encoder_masked)
    assert torch.equal(r2.decoder_masked, ~m.encoder_masked)


@pytest.mark.parametrize("kwargs, match", [
    (dict(encoder_ratio=1.0), "encoder_ratio"),
    (dict(encoder_ratio=-0.1), "encoder_ratio"),
    (dict(decoder_ratio=0.3), "0.25, 0.5 or 0.75"),
    (dict(decoder_ratio=1.0), "0.25, 0.5 or 0.75"),
    (dict(encoder_mask_type="block"), "encoder mask type"),
])
def test_sample_bad_ratios(kwargs, match):
    args = dict(encoder_ratio=0.9, decoder_ratio=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        DualMask.sample(2, (2, 4, 4), **args)


def test_sample_bad_grid_and_batch():
    with pytest.raises(ValueError, match="even token grid"):
        DualMask.sample(2, (2, 5, 5), 0.5, 0.5)
    with pytest.raises(ValueError, match="grid"):
        DualMask.sample(2, (2, 4), 0.5, 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        DualMask.sample(0, (2, 4, 4), 0.5, 0.5)


def test_from_bool_bad_masks():
    good = DualMask.sample(2, (2, 4, 4), 0.5, 0.5)
    uneven = good.encoder_masked.clone()
    uneven[0, uneven[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="same number of encoder-visible"):
        DualMask.from_bool(uneven)
    with pytest.raises(ValueError, match="shape"):
        DualMask.from_bool(good.encoder_masked, good.decoder_masked[:, :-1])
    with pytest.raises(ValueError, match="every token"):
        DualMask.from_bool(torch.ones(2, 32, dtype=torch.bool), good.decoder_masked)
    with pytest.raises(ValueError, match="nothing to reconstruct"):
        DualMask.from_bool(good.encoder_masked, torch.ones(2, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 and 1"):
        DualMask.from_bool(torch.full((2, 32), 2))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        DualMask.from_bool(torch.zeros(32, dtype=torch.bool))


# ---------------------------------------------------------------- no host sync
SYNC_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::item",
            "aten::is_nonzero", "aten::equal", "aten::masked_scatter", "aten::unique"}


class _OpRecorder(TorchDispatchMode):
    """Records ops that force a device-to-host sync (or data-dependent shapes). The one allowed
    exception is ``ops._common.check_index``: it bound-checks indices on CPU tensors only (free
    there); on a GPU it is skipped unless VMAE_FAST_DEBUG=1."""

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        flagged = None
        if name in SYNC_OPS:
            flagged = name
        elif name.startswith("aten::index") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool
                for arg in args if isinstance(arg, (list, tuple)) for a in arg):
            flagged = f"{name} with a boolean index"
        if flagged and not any(f.name == "check_index" for f in traceback.extract_stack()):
            self.bad.append(flagged)
        return func(*args, **(kwargs or {}))


@on_devices
def test_sampling_and_train_step_have_no_sync_ops(device):
    model = small_pretrain(depth=2, decoder_depth=1).to(device)
    video = torch.randn(2, 3, 4, 64, 64, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    masking._running_cell_on.cache_clear()  # whatever ran before: the first step builds the tables
    if device == "cuda":  # the one-time table upload is a blocking copy; the steps after it must not sync
        model(video, DualMask.sample(2, model.grid, 0.75, 0.5, generator=gen)).loss.backward()
        torch.cuda.synchronize()
    rec = _OpRecorder()
    with rec, _sync_debug_error(device):
        masks = DualMask.sample(2, model.grid, 0.75, 0.5, generator=gen)
        out = model(video, masks)
        out.loss.backward()
    assert rec.bad == [], rec.bad
    # the recorder does catch a sync when one is there
    rec2 = _OpRecorder()
    with rec2:
        torch.randn(2, masks.num_tokens, device=device)[masks.encoder_masked]
        masks.encoder_masked.nonzero()
    assert rec2.bad == ["aten::index with a boolean index", "aten::nonzero"], rec2.bad


@contextlib.contextmanager
def _sync_debug_error(device):
    """On CUDA, any synchronizing call raises (torch's sync debug mode); nothing on CPU."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("grid", [(1, 2, 2), (8, 14, 14), (3, 4, 6)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_num_decoder_tokens_counts_the_patterns(grid, ratio):
    want = int((~masking.running_cell_patterns(grid, ratio)).sum(dim=1).unique().item())
    assert masking.num_decoder_tokens(grid, ratio) == want
    assert masking.num_decoder_tokens(grid, 0.0, 0.9) == masking.num_encoder_masked(grid, 0.9)
    with pytest.raises(ValueError, match="even token grid"):
        masking.num_decoder_tokens((2, 7, 7), ratio)


# ----------------------------------------------------------------------------- mutation survivors
# Tests written for the mutants `make mutate` left alive (README, "Mutation testing"): inputs
# the tests above never gave (one clip, grid-shaped masks, a mask of every token, odd grids
# along one axis) and the parameter names in the error lines.

def test_from_bool_one_clip_and_grid_shaped_masks():
    m = DualMask.sample(1, (2, 4, 6), 0.5, 0.5, generator=torch.Generator().manual_seed(3))
    r = DualMask.from_bool(m.encoder_masked.view(1, 2, 4, 6).int(), m.decoder_masked.view(1, 2, 4, 6))
    for a, b in zip((m.encoder_masked, m.decoder_masked, m.visible_idx, m.decoder_idx),
                    (r.encoder_masked, r.decoder_masked, r.visible_idx, r.decoder_idx)):
        assert torch.equal(a, b)
    one = DualMask.from_bool(torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool))
    assert one.visible_idx.tolist() == [[0]] and one.decoder_idx.tolist() == [[0]]


def test_from_bool_error_lines_name_the_argument():
    good = torch.zeros(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="^encoder_masked must be a torch.Tensor, got list$"):
        DualMask.from_bool([[0, 1]])
    with pytest.raises(ValueError, match="^decoder_masked must be a torch.Tensor, got list$"):
        DualMask.from_bool(good, [[0, 1]])
    with pytest.raises(ValueError, match=r"^encoder_masked must have shape \(B, N\) with B, N > 0, got \(0, 8\)$"):
        DualMask.from_bool(torch.zeros(0, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^decoder_masked must have shape \(B, N\) with B, N > 0, got \(2, 0\)$"):
        DualMask.from_bool(good, torch.zeros(2, 0, dtype=torch.bool))
    with pytest.raises(ValueError, match="^encoder_masked must be bool or integer 0/1, got dtype torch.float32$"):
        DualMask.from_bool(good.float())
    with pytest.raises(ValueError, match="^decoder_masked must be bool or integer 0/1, got dtype torch.complex64$"):
        DualMask.from_bool(good, good.to(torch.complex64))
    with pytest.raises(ValueError, match="^masks on different devices: cpu and meta$"):
        DualMask.from_bool(good, good.to("meta"))
    uneven = good.clone()
    uneven[0, 0] = True
    with pytest.raises(ValueError, match=r"same number of decoder-visible tokens, got counts \[7, 8\]$"):
        DualMask.from_bool(good, uneven)
    with pytest.raises(ValueError, match="^encoder_masked masks every token; at least one must stay visible$"):
        DualMask.from_bool(~good, good)
    with pytest.raises(ValueError, match="^decoder_masked masks every token; the decoder has nothing to reconstruct$"):
        DualMask.from_bool(good, ~good)


def test_dual_mask_checks_each_field_alone():
    m = DualMask.sample(2, (2, 2, 2), 0.5, 0.5)
    em, dm, vi, di = m.encoder_masked, m.decoder_masked, m.visible_idx, m.decoder_idx
    with pytest.raises(ValueError, match="^DualMask fields must be tensors; build one with DualMask.sample or "
                                         "from_bool$"):
        DualMask(em, dm, vi.tolist(), di)
    shape_line = r"^encoder_masked/decoder_masked must be \(B, N\) bool tensors of one shape, got "
    for bad_em, bad_dm, got in ((em.int(), dm, r"\(2, 8\) torch.int32 and \(2, 8\) torch.bool$"),
                                (em, dm.int(), r"\(2, 8\) torch.bool and \(2, 8\) torch.int32$"),
                                (em[None], dm[None], r"\(1, 2, 8\) torch.bool and \(1, 2, 8\) torch.bool$"),
                                (em, dm[:, :4], r"\(2, 8\) torch.bool and \(2, 4\) torch.bool$")):
        with pytest.raises(ValueError, match=shape_line + got):
            DualMask(bad_em, bad_dm, vi, di)
    for name, i in (("visible_idx", 2), ("decoder_idx", 3)):
        for bad, got in ((vi.int(), r"\(2, 4\) torch.int32"), (vi[None], r"\(1, 2, 4\) torch.int64"),
                         (vi[:1], r"\(1, 4\) torch.int64"), (torch.zeros(2, 9, dtype=torch.int64),
                                                              r"\(2, 9\) torch.int64")):
            fields = [em, dm, vi, di]
            fields[i] = bad
            with pytest.raises(ValueError, match=rf"^{name} must be a \(B=2, n <= N=8\) int64 tensor, got {got}$"):
                DualMask(*fields)
    every = torch.arange(8).expand(2, 8)  # n == N is allowed: encoder ratio 0 shows every token
    assert DualMask(em, dm, every, di).n_visible == 8
    with pytest.raises(ValueError, match="^DualMask tensors must live on one device$"):
        DualMask(em, dm, vi, di.to("meta"))


def test_loss_weight_dtype():
    m = DualMask.sample(2, (2, 4, 4), 0.5, 0.5)
    w = m.loss_weight()
    assert w.dtype == torch.float32
    assert torch.equal(w, m.encoder_masked.gather(1, m.decoder_idx).float())
    assert m.loss_weight(torch.bfloat16).dtype == torch.bfloat16


def test_num_decoder_tokens_defaults_types_and_odd_axes():
    # encoder-only masking reconstructs the encoder-masked tokens: default ratio 0.9, tube
    assert masking.num_decoder_tokens((2, 4, 4), 0) == 2 * int(0.9 * 16) == 28
    # the mask type reaches the count: (3, 2, 2) at 0.6 masks 3 x int(2.4) = 6 (tube), int(7.2) = 7
    assert masking.num_decoder_tokens((3, 2, 2), 0, 0.6, "tube") == 6
    assert masking.num_decoder_tokens((3, 2, 2), 0, 0.6, "random") == 7
    for grid in ((2, 3, 4), (2, 4, 3)):  # one odd axis is enough to refuse
        with pytest.raises(ValueError, match="even token grid"):
            masking.num_decoder_tokens(grid, 0.5)
        with pytest.raises(ValueError, match="even token grid"):
            running_cell_patterns(grid, 0.5)
    with pytest.raises(ValueError, match="^decoder_ratio must be a number, got 'half'$"):
        masking.num_decoder_tokens((2, 4, 4), "half")
    with pytest.raises(ValueError, match="^decoder_ratio must be a number, got 'half'$"):
        masking.cell_masked_slots("half")


def test_sample_defaults_and_bad_arguments_word_for_word():
    m = DualMask.sample(2, (2, 4, 4))  # the official 0.9 tube / 0.5 running cell
    assert (m.n_visible, m.n_decoder) == (2 * (16 - int(0.9 * 16)), 2 * 4 * 2)
    for grid in (5, (0, 4, 4), (2, 4, -4)):
        with pytest.raises(ValueError, match=r"^grid must be three positive ints \(T/t, H/p, W/p\), got "):
            DualMask.sample(2, grid)
    for batch, shown in (("two", "'two'"), (2.0, "2.0"), (0, "0")):  # the value passed, as passed
        with pytest.raises(ValueError, match=f"^batch_size must be a positive int, got {shown}$"):
            DualMask.sample(batch, (2, 4, 4))
    with pytest.raises(ValueError, match="^decoder_ratio must be a number, got 'half'$"):
        DualMask.sample(2, (2, 4, 4), 0.9, "half")
    with pytest.raises(ValueError, match="^encoder_ratio must be a number, got None$"):
        masking.num_encoder_masked((2, 4, 4), None)
    for ratio in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^encoder_ratio must be in \[0, 1\), got {ratio}$"):
            masking.num_encoder_masked((2, 4, 4), ratio)
    assert masking.num_encoder_masked((2, 4, 4), 0.0) == 0 == masking.num_encoder_masked((2, 4, 4), 0.0, "random")
    with pytest.raises(ValueError, match="^encoder_ratio=0.0 masks no token, so encoder-only masking leaves the "
                                         "decoder nothing to reconstruct$"):
        DualMask.sample(2, (2, 4, 4), 0.0, 0.0)
    with pytest.raises(ValueError, match="^the generator lives on cpu but masks are sampled on meta; pass a "
                                         "generator of the same device type$"):
        DualMask.sample(2, (2, 4, 4), generator=torch.Generator(), device="meta")


@pytest.mark.parametrize("mask_type, decoder_ratio", [("tube", 0.5), ("random", 0.0), ("random", 0.75)])
def test_sample_makes_every_tensor_on_the_asked_device(mask_type, decoder_ratio):
    m = DualMask.sample(3, (2, 4, 4), 0.75, decoder_ratio, encoder_mask_type=mask_type, device="meta")
    assert {x.device.type for x in (m.encoder_masked, m.decoder_masked, m.visible_idx, m.decoder_idx)} == {"meta"}
    assert m.visible_idx.shape == (3, 32 - masking.num_encoder_masked((2, 4, 4), 0.75, mask_type))
    c = DualMask.sample(3, (2, 4, 4), 0.75, decoder_ratio, encoder_mask_type=mask_type).to("meta")
    assert {x.device.type for x in (c.encoder_masked, c.decoder_masked, c.visible_idx, c.decoder_idx)} == {"meta"}


def test_random_masks_follow_the_generator_and_all_four_cells_start():
    seeded = [DualMask.sample(8, (2, 4, 4), 0.5, 0.5, encoder_mask_type="random",
                              generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(seeded[0].encoder_masked, seeded[1].encoder_masked)
    assert not torch.equal(seeded[0].encoder_masked, seeded[2].encoder_masked)
    # the running cell's start pointer takes all four values
    m = DualMask.sample(64, (2, 4, 4), 0.5, 0.5, generator=torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in m.decoder_masked}) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_default_to_the_generators_device():
    m = DualMask.sample(2, (2, 4, 4), generator=torch.Generator("cuda").manual_seed(0))
    assert {x.device.type for x in (m.encoder_masked, m.decoder_masked, m.visible_idx, m.decoder_idx)} == {"cuda"}
