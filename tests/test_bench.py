"""Smoke test of the benchmark CLI on a tiny config (a few seconds on 2 CPU cores)."""
from __future__ import annotations

import json

import pytest
import torch

from bench import dual_masking
from bench.runner import max_batch
from bench.timing import Stats, time_fn

TINY = ["--arch", "vit_s", "--frames", "4", "--img-size", "32", "--depth", "1", "--decoder-depth", "1",
        "--batch", "2", "--masking", "enc,0.5", "--warmup", "1", "--repeats", "2", "--no-progress", "--no-plot",
        "--device", "cpu"]


@pytest.mark.parametrize("timing", ["--interleave", "--no-interleave"])
def test_cli_tiny_run_writes_json_and_table(tmp_path, capsys, timing):
    dual_masking.main(TINY + [timing, "--out", str(tmp_path), "--name", "smoke"])
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
    ref = [r for r in rows if r["impl"] == "reference"]
    assert ref[0]["speedup_vs_reference"] == 1.0
    assert data["goals"]["applicable"] is False
    assert "| setup | masking | impl |" in printed and "paper GFLOPs" in printed
    assert "vmae_fast against the official computation" in printed


@pytest.mark.parametrize("bad, message", [
    (["--arch", "vit_zz"], "unknown --arch"),
    (["--masking", "0.3"], "--masking"),
    (["--impl", "fastest"], "--impl"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--frames", "5"], "num_frames=5 is not divisible"),
    (["--dtype", "fp16"], "fp16 is not supported on CPU"),
])
def test_cli_bad_values_give_clear_errors(bad, message, capsys):
    with pytest.raises(SystemExit) as exc:
        dual_masking.main(["--device", "cpu"] + bad)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_presets_resolve():
    ns = dual_masking._parser().parse_args(["--device", "cpu"])
    ns._argv = []
    plan = dual_masking.plan_from_args(ns)
    assert plan["preset"] == "cpu" and plan["dtype"] == torch.float32
    assert plan["impls"] == ["vmae_fast", "vmae_fast-unfused", "reference"]
    ns = dual_masking._parser().parse_args(["--device", "cpu", "--preset", "table2", "--ckpt", "both"])
    plan = dual_masking.plan_from_args(ns)
    labels = [s.label() for s, _ in plan["setups"]]
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
