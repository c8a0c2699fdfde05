"""``vmae_fast.flops.counted_flops``: torch's FLOP counter with attention counted one way on
every build (and filled in where the counter misses it). Passes whether or not this torch's
counter knows the CPU SDPA kernel (2.14 does not): the formulas are removed or added on purpose
below to pin both paths."""
from __future__ import annotations

import pytest
import torch
import torch.utils.flop_counter as flop_counter

import vmae_fast
from vmae_fast.flops import _attention_call_flops, attention_flops, count_macs, counted_flops

from conftest import ODD

B, ENC = 2, 0.6


pytestmark = pytest.mark.usefixtures("one_thread")  # toy-size ops (conftest)


def _norm_free(p):  # LayerNorm is not counted by torch
    return p["total"] - p["encoder_norm"] - p["decoder_norm"]


def _blocks(p):  # the most activation checkpointing recomputes: every block's forward
    return p["encoder_linear"] + p["encoder_attn"] + p["decoder_linear"] + p["decoder_attn"]


def _model_and_inputs(backend, ratio):
    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", attn_backend=backend, **ODD)
    video = torch.randint(0, 256, (B, 3, 6, 48, 48), dtype=torch.uint8)
    masks = vmae_fast.DualMask.sample(B, model.grid, ENC, ratio)
    return model, video, masks


def _check_missed(missed, backend):
    assert all("attention" in op or "attn" in op for op in missed), missed
    assert not any(op.endswith("(not filled)") for op in missed), missed
    if backend == "math":  # explicit matmuls: nothing for the counter to miss
        assert missed == []


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_counted_equals_analytic(backend, ratio):
    model, video, masks = _model_and_inputs(backend, ratio)
    p = count_macs(model.cfg, ENC, ratio, "vmae_fast")
    with torch.no_grad():
        flops, missed = counted_flops(model, video, masks)
    assert flops == 2 * B * _norm_free(p)
    _check_missed(missed, backend)
    # forward + backward: 3x forward, less the patch embedding's input gradient (the clip needs none)
    flops, missed = counted_flops(lambda: model(video, masks).loss.backward())
    assert flops == 2 * B * (3 * _norm_free(p) - p["patch_embed"])
    _check_missed(missed, backend)
    # activation checkpointing: the blocks' forward runs again in backward, counted where it runs;
    # at most all of it (torch's early stop skips what no backward needs, e.g. the last fc2)
    model.set_grad_checkpointing(True)
    ckpt, _ = counted_flops(lambda: model(video, masks).loss.backward())
    assert flops < ckpt <= flops + 2 * B * _blocks(p)


CPU_SDPA = ("aten._scaled_dot_product_flash_attention_for_cpu",
            "aten._scaled_dot_product_flash_attention_for_cpu_backward")


def _cpu_sdpa_ops():
    return [getattr(torch.ops.aten, name.split(".", 1)[1], None) for name in CPU_SDPA]


def test_filled_in_when_the_counter_has_no_attention_formula(monkeypatch):
    # as torch 2.14 for the CPU kernel, on any build: drop every attention formula
    registry = {k: v for k, v in flop_counter.flop_registry.items() if "attention" not in str(k)}
    monkeypatch.setattr(flop_counter, "flop_registry", registry)
    model, video, masks = _model_and_inputs("sdpa", 0.5)
    p = count_macs(model.cfg, ENC, 0.5, "vmae_fast")
    flops, missed = counted_flops(lambda: model(video, masks).loss.backward())
    assert flops == 2 * B * (3 * _norm_free(p) - p["patch_embed"])
    if all(_cpu_sdpa_ops()):  # builds whose CPU SDPA runs that fused kernel
        assert missed == list(CPU_SDPA)


def test_nothing_missed_when_the_counter_counts_attention(monkeypatch):
    # as builds that know the CPU kernel: give the counter torch's own SDPA formulas (whose
    # backward, on recent builds, adds the flash recompute of the scores: counted as 2x here)
    fwd, bwd = _cpu_sdpa_ops()
    if fwd is None or bwd is None:
        pytest.skip("this torch's CPU SDPA has no fused kernel to count")
    registry = dict(flop_counter.flop_registry)
    registry[fwd] = lambda q, k, v, *a, out_val=None, **kw: flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape)
    registry[bwd] = lambda g, q, k, v, *a, out_val=None, **kw: flop_counter.sdpa_backward_flop_count(
        g.shape, q.shape, k.shape, v.shape)
    monkeypatch.setattr(flop_counter, "flop_registry", registry)
    model, video, masks = _model_and_inputs("sdpa", 0.0)
    p = count_macs(model.cfg, ENC, 0.0, "vmae_fast")
    flops, missed = counted_flops(lambda: model(video, masks).loss.backward())
    assert missed == [] and flops == 2 * B * (3 * _norm_free(p) - p["patch_embed"])


def test_attention_call_flops_reads_both_layouts():
    Bt, H, N, M, d = 2, 3, 5, 7, 8
    bhnd = [torch.empty(Bt, H, n, d, device="meta") for n in (N, M, M)]
    bnhd = [torch.empty(Bt, n, H, d, device="meta") for n in (N, M, M)]
    want = attention_flops(Bt * H, N, M, d)
    assert want == 4 * Bt * H * N * M * d  # the convention of count_macs' attention terms, 2 FLOPs/MAC
    assert _attention_call_flops("aten._scaled_dot_product_flash_attention_for_cpu", bhnd) == want
    assert _attention_call_flops("flash_attn._flash_attn_forward", bnhd) == want
    grad = torch.empty(Bt, H, N, d, device="meta")
    assert _attention_call_flops("aten._scaled_dot_product_flash_attention_for_cpu_backward",
                                 [grad, *bhnd]) == 2 * want
    packed = [torch.empty(Bt * N, H, d, device="meta")] * 3  # varlen: not readable
    assert _attention_call_flops("flash_attn._flash_attn_varlen_forward", packed) is None
    assert _attention_call_flops("mylib.my_attention", bhnd) is None  # unknown layout: left to torch
    assert _attention_call_flops("aten._scaled_dot_product_attention_math", bhnd) is None  # torch counts its matmuls
