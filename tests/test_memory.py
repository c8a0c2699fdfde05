"""The exact memory count (``vmae_fast.memory_count``), its extrapolation in batch and depth and the
planner (``bench.memory``): real counts of real steps, checked against what they must be."""
from __future__ import annotations

import gc
import json
from dataclasses import replace

import pytest
import torch

import vmae_fast
from bench import memory as bm
from bench.runner import Setup
from vmae_fast.memory_count import LiveTensorMemory, cuda_autocast_rules, measure_train_step

from conftest import ODD

CPU = torch.device("cpu")
# A small pretraining setup whose encoder is deep enough to scale (depths 2 and 3 -> 5).
TINY = Setup("vit_small_patch16_224", 4, 64, 2, embed_dim=96, decoder_embed_dim=48, depth=5, decoder_depth=2)
KW = dict(dtype=torch.bfloat16, device=CPU, flops=False)


def _nbytes(*ts):
    return sum(t.untyped_storage().nbytes() for t in ts)


def test_live_tensor_count_is_exact():
    """Allocations, views (one storage), frees (also of tensors autograd held, freed by
    backward), the peak, and tensors that existed before the region (external: not counted)."""
    outside = torch.randn(1000)
    w = torch.randn(256, requires_grad=True)
    with LiveTensorMemory() as mem:
        a = torch.empty(1000)          # 4000 bytes
        v = a[10:].view(-1)            # a view: no bytes
        b = outside * 2                # 4000; `outside` is external
        y = (w * 3).exp()              # w * 3 (1024) freed at once, exp's output (1024) saved
        del v, a
        loss = y.sum()                 # 4
        mem.set_phase("backward")
        loss.backward()
        del b, y, loss
        gc.collect()
    r = mem.peaks(lambda uid: "activations")
    assert r["phase_peaks"]["setup"] == 4000 + 4000 + 1024 + 1024
    assert r["at_phase_start"]["backward"]["activations"] == 4000 + 1024 + 4
    assert r["at_end"]["activations"] == _nbytes(w.grad)  # only the gradient is left
    assert mem.external_bytes() == _nbytes(outside, w)


def test_train_step_split():
    """One train step: parameters, gradients (q/v bias gradients share one storage per block)
    and AdamW state are what they must be; the split at the peak sums to the peak."""
    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", **ODD)
    video = torch.randn(2, 3, 6, 48, 48)
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.6, 0.5)
    opt = bm.make_optimizer(model, CPU)
    m = measure_train_step(model, lambda: model(video, masks).loss, opt, inputs=[video],
                           autocast_dtype=torch.bfloat16)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert m.parameters == params
    assert m.gradients == sum({p.grad.untyped_storage()._cdata: p.grad.untyped_storage().nbytes()
                               for p in model.parameters()}.values())
    steps = sum(s["step"].untyped_storage().nbytes() for s in opt.state.values())
    assert m.optimizer_state == 2 * params + steps
    assert m.inputs == _nbytes(video)
    assert sum(m.at_peak.values()) == m.peak_total
    assert m.peak_activations >= m.held_after_forward > 0
    assert set(m.phase_peaks) >= {"forward", "backward"}  # fused AdamW allocates nothing


def test_cuda_autocast_rules_on_cpu():
    """Under CPU autocast, the rules make LayerNorm and softmax run in float32 as CUDA autocast
    does (and leave GELU and matmuls in bf16); they are gone after the context."""
    x = torch.randn(4, 8).bfloat16()
    ln = torch.nn.LayerNorm(8)

    def dtypes():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ln(x).dtype, x.softmax(-1).dtype, torch.nn.functional.gelu(x).dtype, (x @ x.t()).dtype

    assert dtypes() == (torch.bfloat16,) * 4
    with cuda_autocast_rules():
        assert dtypes() == (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16)
    assert dtypes() == (torch.bfloat16,) * 4


@pytest.fixture(scope="module")
def profiles():
    """none and selective at depths 2 and 3 (scaled to 5), and none measured at depth 5."""
    out = {pol: bm.profile(TINY, "vmae_fast", pol, 0.5, batches=(2, 3), depths=(2, 3), full_depth=5, **KW)
           for pol in (False, "selective")}
    out["exact"] = bm.profile(TINY, "vmae_fast", False, 0.5, batches=(2, 3), depths=None, full_depth=5, **KW)
    return out


def test_batch_lines_exact(profiles):
    """The live bytes at batch 4 and 5 predicted from batches 2 and 3 (event by event) equal the
    measured ones: activation peak and step peak."""
    lines = profiles["exact"]["lines"][5]
    assert lines.aligned
    for b in (4, 5):
        m = bm.measure(replace(TINY, batch=b), "vmae_fast", False, 0.5, **KW)["step_memory"]
        assert lines.activation_peak(b) == m["peak_activations"]
        assert lines.total_peak(b)["peak"] == m["peak_total"]


def test_depth_scaling_exact(profiles):
    """Depths 2 and 3 scaled to 5 give the numbers measured at depth 5: activations per clip,
    activation and step peaks at small and large batches (where the step's peak moves from the
    end of backward to the activations), parameters, gradients, AdamW state."""
    scaled, exact = profiles[False], profiles["exact"]
    s, e = bm.summary(scaled), bm.summary(exact)
    for k in ("act_per_clip", "act_peak", "total_peak", "held_per_clip", "parameters", "gradients",
              "optimizer_state"):
        assert s[k] == pytest.approx(e[k], rel=1e-9, abs=1e-3), k
    for b in (1, 2, 8, 12, 16, 24, 64, 1024):
        assert bm.estimate_peak(scaled, b) == pytest.approx(bm.estimate_peak(exact, b), rel=1e-9), b
        assert bm.activation_peak(scaled, b) == pytest.approx(bm.activation_peak(exact, b), rel=1e-9), b


def test_planner(profiles):
    """The largest batch fits the estimate and the next does not; a bigger GPU, sharding and
    a lighter policy never make it smaller; DDP's buckets make it smaller."""
    none, sel = profiles[False], profiles["selective"]
    gib = 2 ** 30
    b = bm.max_batch(none, 0.25 * gib, 0.1)
    assert b > 0
    assert bm.estimate_peak(none, b) <= 0.9 * 0.25 * gib < bm.estimate_peak(none, b + 1)
    assert bm.max_batch(none, 0.5 * gib, 0.1) > b
    assert bm.max_batch(sel, 0.25 * gib, 0.1) > b
    assert bm.max_batch(none, 0.25 * gib, 0.1, "ddp", 2) < b
    extra = bm.fsdp_working_set(TINY)
    assert bm.max_batch(none, 0.25 * gib, 0.1, "fsdp", 8, extra) >= b
    assert bm.max_batch(none, 1e3, 0.1) == 0


def test_memory_cli(tmp_path, capsys):
    """``python -m bench.memory`` end to end on a tiny model: JSON and the tables."""
    res = bm.main(["--arch", "vit_s", "--frames", "4", "--img-size", "32", "--depth", "1", "--decoder-depth", "1",
                   "--policies", "none,selective", "--impl", "vmae_fast", "--gpu-mem", "1,2", "--dist", "fsdp",
                   "--world", "4", "--out", str(tmp_path), "--name", "m"])
    out = capsys.readouterr().out
    assert "Largest batch per GPU: ESTIMATE (fsdp, 4 GPUs" in out and "| vmae_fast | selective |" in out
    data = json.loads((tmp_path / "m.json").read_text())
    assert [x["policy"] for x in data["summaries"]] == ["none", "selective"]
    assert [p["dist"] for p in data["planners"]] == ["fsdp"] and data["planners"][0]["estimate"] is True
    assert data["summaries"][0]["act_per_clip"] > 0
    assert res["summaries"][1]["extra_flops"] >= 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_count_matches_allocator():
    """On a GPU the exact count and ``torch.cuda.max_memory_allocated`` of the same step agree up
    to what only the allocator sees (512-byte rounding, library workspaces, kernels' scratch)."""
    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", num_frames=8, img_size=112).cuda()
    video = torch.randint(0, 256, (4, 3, 8, 112, 112), dtype=torch.uint8, device="cuda")
    masks = vmae_fast.DualMask.sample(4, model.grid, 0.9, 0.5, device="cuda")
    opt = bm.make_optimizer(model, torch.device("cuda"))
    m = measure_train_step(model, lambda: model(video, masks).loss, opt, inputs=[video],
                           autocast_dtype=torch.bfloat16)
    assert m.cuda_max_allocated is not None
    assert m.peak_total <= m.cuda_max_allocated <= 1.1 * m.peak_total + (64 << 20)


def test_bench_cell_counts_exactly():
    """Every ``bench.dual_masking`` cell carries the exact count of its step and, under a
    checkpointing policy, the FLOPs of the recomputation: here "selective" on a tiny setup."""
    from bench.runner import CellOptions, build, make_optimizer, master_state, measure_cell

    setup = replace(TINY, depth=1, decoder_depth=1, ckpt="selective")
    module = build("vmae_fast", setup, master_state(setup, 0), CPU)
    opt = CellOptions(device=CPU, dtype=torch.bfloat16, warmup=1, repeats=1)
    row = measure_cell("vmae_fast", module, setup, 0.5, opt, make_optimizer(module, CPU))
    m = row["exact_memory"]
    assert m["peak_total"] == sum(m["at_peak"].values()) > m["parameters"] > 0
    assert row["saved_act_per_clip_bytes"] == m["held_after_forward"] / setup.batch > 0
    assert 0 < row["recompute_share"] < 0.1
    assert row["recompute_flops"] == row["counted_flops_train_step"] - row["counted_flops_model_step"]


def test_the_unfused_row_counts_the_references(monkeypatch):
    """``--impl vmae_fast-unfused`` counts the model on the fused ops' references, like the timed
    bench's row of that name; the other rows count the kernels."""
    import bench.runner as br
    from vmae_fast.ops import kernels_enabled

    seen = []
    real = br.loss_fn

    def spy(*args, **kw):
        fwd = real(*args, **kw)
        return lambda: seen.append(kernels_enabled()) or fwd()

    monkeypatch.setattr(br, "loss_fn", spy)
    monkeypatch.setattr(bm, "loss_fn", spy, raising=False)
    setup = replace(TINY, depth=1, decoder_depth=1)
    for impl, want in (("vmae_fast", True), ("vmae_fast-unfused", False)):
        seen.clear()
        bm.measure(setup, impl, False, 0.5, **{**KW, "flops": True})
        assert seen and set(seen) == {want}, (impl, seen)
    with pytest.raises(SystemExit):
        bm.main(["--impl", "vmae_fast,nope", "--out", "/nonexistent"])
