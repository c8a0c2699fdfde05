"""Smoke test of the benchmark CLI on a tiny config (a few seconds on 2 CPU cores)."""
from __future__ import annotations

import gc
import json
import statistics
import weakref

import pytest
import torch

from bench.common.timing import Stats, is_oom, time_fn
from bench.dual_masking import main as dual_masking_main
from bench.dual_masking.cli import build_parser
from bench.dual_masking.metrics import derive
from bench.dual_masking.plan import PRESETS, SMOKE_MAX_BATCH_CAP, plan_from_args
from bench.runner import Setup, clip_dtype, make_inputs, max_batch
from vmae_fast.device import parse_device
from vmae_fast.flops import count_macs

TINY = ["--arch", "vit_s", "--frames", "4", "--img-size", "32", "--depth", "1", "--decoder-depth", "1",
        "--batch", "2", "--masking", "enc,0.5", "--warmup", "1", "--repeats", "2", "--no-progress", "--no-plot",
        "--device", "cpu"]


@pytest.mark.parametrize("timing", ["--interleave", "--no-interleave"])
def test_cli_tiny_run_writes_json_and_table(tmp_path, capsys, timing):
    dual_masking_main(TINY + [timing, "--out", str(tmp_path), "--name", "smoke"])
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert {"device", "config", "rows", "matmul_ceiling", "goals", "command", "created"} <= data.keys()
    for key in ("name", "torch", "triton", "timm", "cuda", "git_commit", "cpu_model", "torch_threads", "native_ext"):
        assert key in data["device"]
    rows = data["rows"]
    # 2 maskings x 3 default CPU implementations, all measured
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert {r["impl"] for r in rows} == {"vmae_fast", "vmae_fast-unfused", "reference"}
    for r in rows:
        s = r["step_s"]
        assert len(s["samples"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["min"] > 0
        assert r["clips_per_s"] == pytest.approx(2 / s["median"])
        assert r["counted_flops_train_step"] > 0 and r["gmacs_official"] >= r["gmacs_vmae_fast"] > 0
        assert r["params"] > 0 and r["timing"] == timing.strip("-").replace("no-interleave", "sequential") \
            .replace("interleave", "interleaved")
    # same weights, masks and dtype: every implementation computes the same loss
    for ratio in (0.0, 0.5):
        losses = [r["loss"] for r in rows if r["decoder_ratio"] == ratio]
        assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    fast = [r for r in rows if r["impl"] == "vmae_fast"]
    assert fast[1]["speedup_dual_vs_enc"] == pytest.approx(fast[0]["step_s"]["median"] / fast[1]["step_s"]["median"])
    # every speedup recomputed from the rows' own samples (the reference's is then 1 by arithmetic)
    for r in rows:
        assert r["step_s"]["median"] == pytest.approx(statistics.median(r["step_s"]["samples"]))
        ref = next(x for x in rows if x["impl"] == "reference" and x["decoder_ratio"] == r["decoder_ratio"])
        want = statistics.median(ref["step_s"]["samples"]) / statistics.median(r["step_s"]["samples"])
        assert r["speedup_vs_reference"] == pytest.approx(want)
    assert data["goals"]["applicable"] is False
    assert "| setup | masking | impl |" in printed and "paper GFLOPs" in printed
    assert "vmae_fast against the official computation" in printed


@pytest.mark.parametrize("bad, message", [
    (["--arch", "vit_zz"], "--arch: unknown arch 'vit_zz'"),
    (["--masking", "0.3"], "--masking"),
    (["--impl", "fastest"], "--impl"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--frames", "5"], "num_frames=5 is not divisible"),
    (["--dtype", "fp16"], "fp16 is not supported on CPU"),
])
def test_cli_bad_values_give_clear_errors(bad, message, capsys):
    with pytest.raises(SystemExit) as exc:
        dual_masking_main(["--device", "cpu"] + bad)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_presets_resolve():
    ns = build_parser().parse_args(["--device", "cpu"])
    ns._argv = []
    plan = plan_from_args(ns)
    assert plan.preset == "cpu" and plan.dtype == torch.float32
    assert plan.impls == ["vmae_fast", "vmae_fast-unfused", "reference"]
    ns = build_parser().parse_args(["--device", "cpu", "--preset", "table2", "--ckpt", "both"])
    plan = plan_from_args(ns)
    labels = [s.label() for s, _ in plan.setups]
    assert "ViT-B 16x224 b32" in labels and "ViT-g 16x224 b8 ckpt" in labels and len(labels) == 4


def test_stats_and_timer():
    st = Stats.of([3.0, 1.0, 2.0, 4.0])
    assert (st.median, st.min, st.max) == (2.5, 1.0, 4.0) and st.iqr == pytest.approx(1.5)
    calls = []
    st = time_fn(lambda: calls.append(1), "cpu", warmup=2, repeats=3)
    assert len(calls) == 5 and len(st.samples) == 3
    with pytest.raises(ValueError):
        time_fn(lambda: None, "cpu", repeats=0)


def test_max_batch_bisection_finds_the_limit():
    def run_once(b):  # a fake device that fits 37 clips
        if b > 37:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
    out = max_batch(run_once, 4, torch.device("cpu"), cap=4096)
    assert out["max_batch"] == 37 and not out["capped"]
    assert max_batch(lambda b: None, 4, torch.device("cpu"), cap=16)["capped"]


# ------------------------------------------------------------------- out-of-memory and the search
@pytest.mark.parametrize("exc, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. ... out of memory"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                  "non-contiguous input."), False),  # a real error, not memory
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),
])
def test_is_oom(exc, oom):
    assert is_oom(exc) is oom


def test_is_oom_follows_the_cause():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as outer:
        assert is_oom(outer)


@pytest.mark.parametrize("error", [lambda: torch.OutOfMemoryError("CUDA out of memory (fake)"),
                                   lambda: RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")])
def test_max_batch_frees_after_the_failed_step_is_gone(error):
    refs, frees = [], []

    def run_once(b):  # a fake device that fits 37 clips; `acts` stands for the step's activations
        acts = torch.empty(b)
        refs.append(weakref.ref(acts))
        if b > 37:
            raise error()

    def free():  # what the search calls to release memory: the failed step must be gone by then
        frees.append(sum(r() is not None for r in refs))

    gc.disable()  # only reference counting may release the step here (no cycle collector luck)
    try:
        out = max_batch(run_once, 4, torch.device("cpu"), cap=4096, free=free)
    finally:
        gc.enable()
    assert out["max_batch"] == 37 and not out["capped"]
    failed = [t for t in out["tries"] if not t["fits"]]
    assert frees == [0] * len(failed) and len(failed) >= 2  # 64 failed, then the bisection's misses
    assert all(t["batch"] > 37 and ("out of memory" in t["error"] or "ALLOC_FAILED" in t["error"]) for t in failed)
    assert [t["batch"] for t in out["tries"]][:5] == [4, 8, 16, 32, 64]


def test_max_batch_raises_real_errors_and_stops_at_the_cap():
    def run_once(b):
        if b >= 8:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        max_batch(run_once, 2, torch.device("cpu"), free=lambda: None)
    out = max_batch(lambda b: None, 4, torch.device("cpu"), cap=20)
    assert out["capped"] and out["max_batch"] == 20 and [t["batch"] for t in out["tries"]] == [4, 8, 16, 20]


def test_search_and_timed_step_use_the_training_clip_dtype():
    assert clip_dtype("vmae_fast") == clip_dtype("vmae_fast-unfused") == torch.uint8
    assert clip_dtype("reference") == clip_dtype("reference+compile") == torch.float32
    s = Setup("vit_small_patch16_224", 4, 32, 2)
    v8, m8 = make_inputs(s, 2, 0.5, 0.9, "cpu", 0, torch.uint8)
    v32, m32 = make_inputs(s, 2, 0.5, 0.9, "cpu", 0, torch.float32)
    assert v8.dtype == torch.uint8 and v32.dtype == torch.float32 and v8.float().std() > 0
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(v32, (v8.float() / 255 - mean.view(3, 1, 1, 1)) / std.view(3, 1, 1, 1))
    assert torch.equal(m8.visible_idx, m32.visible_idx) and torch.equal(m8.decoder_idx, m32.decoder_idx)


# ------------------------------------------------------------------------------- device selection
@pytest.mark.parametrize("text, avail, count, current, want", [
    ("cpu", True, 2, 0, ("cpu", None)),
    ("auto", False, 0, 0, ("cpu", None)),
    ("auto", True, 2, 1, ("cuda:1", 1)),   # the current device
    ("cuda", True, 2, 1, ("cuda:1", 1)),
    ("cuda:1", True, 2, 0, ("cuda:1", 1)),    # made current: events, streams, handles follow it
    ("cuda:0", True, 2, 1, ("cuda:0", 0)),
])
def test_bench_device_selection(text, avail, count, current, want):
    dev, index = parse_device(text, cuda_available=avail, device_count=count, current=current)
    assert (str(dev), index) == want


@pytest.mark.parametrize("text, avail, message", [
    ("cuda:2", True, "this machine has 2 CUDA device"), ("cuda", False, "CUDA is not available"),
    ("mps", True, "must be cpu or cuda"), ("gpu0", True, "is not a device"),
])
def test_bench_device_selection_errors(text, avail, message):
    with pytest.raises(ValueError, match=message):
        parse_device(text, cuda_available=avail, device_count=2 if avail else 0, current=0)


@pytest.mark.parametrize("text, avail, local, world, current, want", [
    (None, False, 0, 1, 0, ("cpu", None)),
    ("cpu", True, 0, 1, 0, ("cpu", None)),
    (None, True, 0, 1, 1, ("cuda:1", 1)),
    ("cuda", True, 0, 1, 1, ("cuda:1", 1)),    # one process: the current device
    ("cuda", True, 3, 4, 0, ("cuda:3", 3)),    # torchrun: this rank's LOCAL_RANK
    ("cuda:2", True, 0, 1, 0, ("cuda:2", 2)),  # the named device, made current
])
def test_train_device_selection(text, avail, local, world, current, want):
    dev, index = parse_device(text, cuda_available=avail, device_count=4 if avail else 0, current=current,
                                local_rank=local, world=world)
    assert (str(dev), index) == want


@pytest.mark.parametrize("text, avail, local, world, message", [
    ("cuda:1", True, 0, 2, "names one GPU for all 2 processes"),
    ("cuda:7", True, 0, 1, "does not exist"),
    ("cuda", True, 5, 8, "does not exist"),
    ("cuda", False, 0, 1, "CUDA is not available"),
])
def test_train_device_selection_errors(text, avail, local, world, message):
    with pytest.raises(ValueError, match=message):
        parse_device(text, cuda_available=avail, device_count=4 if avail else 0, current=0,
                       local_rank=local, world=world)


# ------------------------------------------------------------------------------------- MFU / HFU
def test_mfu_counts_model_flops_hfu_hardware_flops():
    def row(impl, hw, model, t=2.0):
        return {"setup": {"label": "ViT-g ckpt"}, "decoder_ratio": 0.5, "impl": impl, "status": "ok",
                "dtype": "bfloat16", "step_s": {"median": t, "min": t}, "peak_mem_bytes": 1,
                "counted_flops_train_step": hw, "counted_flops_model_step": model}
    rows = [row("vmae_fast", 13e12, 10e12), row("reference", 16e12, 12e12, t=4.0)]
    derive(rows, {"bf16_dense_peak_tflops": 1000.0}, {"tflops": 500.0})
    fast, ref = rows
    assert fast["model_flops_train_step"] == ref["model_flops_train_step"] == 10e12  # the needed work
    assert (fast["hardware_flops_train_step"], ref["hardware_flops_train_step"]) == (13e12, 16e12)
    assert fast["mfu_datasheet"] == pytest.approx(10 / 2 / 1000) and fast["hfu_datasheet"] == pytest.approx(13 / 2 / 1000)
    assert ref["mfu_measured_ceiling"] == pytest.approx(10 / 4 / 500) and ref["hfu_measured_ceiling"] == pytest.approx(16 / 4 / 500)
    assert fast["achieved_tflops"] == pytest.approx(6.5) and fast["model_tflops"] == pytest.approx(5.0)


# ------------------------------------------------------------------------ CPU smoke of the GPU plans
def _norm_free(p):
    return p["total"] - p["encoder_norm"] - p["decoder_norm"]


def _train_step_flops(p, batch):  # fwd + bwd (2x), no input gradient for the patch embedding
    return 2 * batch * (3 * _norm_free(p) - p["patch_embed"])


@pytest.mark.parametrize("preset, timing", [("gpu", "--no-interleave"), ("table2", "--interleave")])
def test_smoke_runs_the_gpu_plans_on_cpu(tmp_path, capsys, one_thread, preset, timing):
    pytest.importorskip("matplotlib", reason="the smoke run's PNG needs matplotlib (the bench extra)")
    result = dual_masking_main(["--preset", preset, "--smoke", "--device", "cpu", "--no-progress", timing,
                                "--out", str(tmp_path), "--name", preset])
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / f"{preset}.json").read_text())
    assert (tmp_path / f"{preset}.png").stat().st_size > 0 and result["files"]["json"] == str(tmp_path / f"{preset}.json")
    assert data["config"]["smoke"] is True and data["config"]["max_batch_cap"] == SMOKE_MAX_BATCH_CAP
    plan = PRESETS[preset]
    n_cells = sum(len(m) for _, m in plan.setups) * len(plan.impls)
    rows = data["rows"]
    assert len(rows) == n_cells and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert {r["setup"]["ckpt"] for r in rows} == {False, True}  # ViT-g rows keep the preset's checkpointing
    for r in rows:
        setup = Setup(**{k: v for k, v in r["setup"].items() if k != "label"})
        b, ratio = setup.batch, r["decoder_ratio"]
        fast = _train_step_flops(count_macs(setup.config(), 0.9, ratio, "vmae_fast"), b)
        ref = r["impl"].startswith("reference")
        own = _train_step_flops(count_macs(setup.config(), 0.9, ratio, "official"), b) if ref else fast
        # counted FLOPs follow the analytic rule, attention included (torch 2.14 counts 0 for CPU SDPA)
        assert r["counted_flops_model_step"] == own and r["model_flops_train_step"] == fast > 0
        assert all("attention" in op for op in r["flop_counter_missed"])
        hw = r["hardware_flops_train_step"]
        assert hw == r["counted_flops_train_step"]
        if setup.ckpt:  # the recomputed forward is hardware work, not model work
            assert hw > own and r["hfu_measured_ceiling"] > r["mfu_measured_ceiling"]
        else:
            assert hw == own
        t = r["step_s"]["median"]
        assert r["mfu_measured_ceiling"] == pytest.approx(fast / t / 1e12 / data["matmul_ceiling"]["tflops"])
        assert r["mfu_measured_ceiling"] <= r["hfu_measured_ceiling"]
        assert r["mfu_datasheet"] is None and r["hfu_datasheet"] is None  # no bf16 peak for a CPU
        # the search ran, bounded, with the timed step's clip (uint8 where the impl takes it)
        mb = r["max_batch"]
        assert mb["max_batch"] == 4 and mb["capped"] and [x["batch"] for x in mb["tries"]] == [2, 4]
        assert mb["clip_dtype"] == r["clip_dtype"] == ("float32" if ref else "uint8")
        assert r["memory_kind"] == "rss_vmhwm" and r["peak_mem_bytes"] > 0 and r["saved_act_per_clip_bytes"] > 0
    assert "| HFU peak / ceiling |" in printed and "paper GFLOPs" in printed and "4+ |" in printed
    assert "SMOKE RUN" in printed and data["files"]["json"].endswith(".json")


@pytest.mark.parametrize("timing", ["--interleave", "--no-interleave"])
def test_hf_peer_runs_encoder_only_and_reports_dual_masking_unsupported(tmp_path, capsys, timing):
    pytest.importorskip("transformers", reason="the hf peer needs transformers (test extra)")
    dual_masking_main(TINY + [timing, "--impl", "vmae_fast,hf", "--out", str(tmp_path), "--name", "hf"])
    rows = {(r["impl"], r["decoder_ratio"]): r for r in json.loads((tmp_path / "hf.json").read_text())["rows"]}
    assert rows[("hf", 0.0)]["status"] == "ok" and rows[("vmae_fast", 0.0)]["status"] == "ok"
    assert rows[("hf", 0.5)]["status"] == "unsupported" and "no dual masking" in rows[("hf", 0.5)]["error"]
    assert rows[("vmae_fast", 0.5)]["status"] == "ok"
    # same weights, same pixels and masks: the same loss (float clip vs uint8 normalized in-kernel)
    assert abs(rows[("hf", 0.0)]["loss"] - rows[("vmae_fast", 0.0)]["loss"]) < 1e-4 * abs(rows[("vmae_fast", 0.0)]["loss"])
    assert rows[("hf", 0.0)]["clip_dtype"] == "float32"


def test_kernels_timing_reports_the_path_the_dispatch_takes(tmp_path):
    """The timed ``bench.kernels`` (not only ``--compile-only``): every op has its eager row and a
    fused row named after ``kernel_paths()`` (or the reason it runs the reference)."""
    from bench import kernels
    from vmae_fast.ops._dispatch import kernel_paths

    res = kernels.main(["--device", "cpu", "--arch", "vit_b", "--batch", "1", "--warmup", "0", "--repeats", "1",
                        "--no-compile", "--out", str(tmp_path), "--name", "k"])
    rows = res["rows"]
    assert {r["op"] for r in rows} == {"gather_cubes", "decoder_input", "masked_mse_loss"}
    for op in ("gather_cubes", "decoder_input", "masked_mse_loss"):
        path = kernel_paths()[op]["cpu"]
        fused = [r for r in rows if r["op"] == op and r["variant"].startswith("fused")]
        assert len(fused) == 1
        if path.startswith("reference"):
            assert not fused[0]["ok"] and path in fused[0]["why"]
        else:
            assert fused[0]["ok"] and fused[0]["variant"] == f"fused (dispatch: {path})"
            assert fused[0]["seconds"]["median"] > 0
        assert any(r["op"] == op and r["variant"] == "eager ref" and r["ok"] for r in rows)
    assert (tmp_path / "k.json").is_file()
