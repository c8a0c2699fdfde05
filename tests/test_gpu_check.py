"""``python -m bench.gpu_check``: the dry run of the whole plan on the CPU (every part's code path
at toy size), the one-line refusal without CUDA, the time shares that stop a part while the rest
runs, the goals judged from the parts, and the H100 estimate under 8 minutes."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from bench.gpu_check import estimate as est_mod, plan
from bench.gpu_check.cli import cli as gpu_check
from bench.gpu_check.parts import Context, memory_count, pytest_counts
from bench.gpu_check.report import GOALS, judge_goals
from bench.gpu_check.run import run_part
from vmae_fast.flops import datasheet_hbm_gbps, pretrain_macs

STATUSES = {"ok", "failed", "not run", "error", "timeout"}


@pytest.mark.slow
def test_dry_run_runs_every_part_and_reports_every_goal(tmp_path, capsys):
    assert gpu_check(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("gpu-check-dry-run-*.json")
    result = json.loads(path.read_text())
    assert result["dry_run"] and list(result["parts"]) == [p.name for p in plan.PLAN]
    assert {f.name for f in path.with_name(path.stem + "-parts").iterdir()} == \
        {"kernels.json", "dual_masking_vit_b.json", "dual_masking_vit_g.json"}  # every raw number of those benches
    parts = result["parts"]
    for name, p in parts.items():
        assert p["status"] in ("ok", "not run"), (name, p["status"], p["reason"])
        assert p["status"] == "ok" or p["reason"]
        assert p["seconds"] < p["share_s"]
    assert parts["cuda_tests"]["data"]["counts"]["skipped"] > 0  # every gpu test collects, and skips on a CPU
    assert parts["cuda_tests"]["data"]["counts"].get("failed", 0) == 0
    rows = parts["dual_masking_vit_b"]["data"]["rows"]
    assert {(r["masking"], r["impl"]) for r in rows} == {(m, i) for m in ("encoder-only", "dual 0.5")
                                                        for i in ("vmae_fast", "vmae_fast-unfused", "reference")}
    assert all(r["status"] == "ok" and r["clips_per_s"] > 0 for r in rows)
    assert "ckpt" in parts["dual_masking_vit_g"]["data"]["rows"][0]["setup"]
    losses = parts["pretrain"]["data"]["losses"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert parts["memory_count"]["data"]["exact_peak_bytes"] > 0
    assert {r["backend"] for r in parts["attention"]["data"]["rows"]} >= {"math", "sdpa", "flash_attn", "xformers"}
    assert parts["kernels"]["data"]["copy_gbps"] > 0 and parts["kernels"]["data"]["fused_total"] == 3
    # no goal is judged on a CPU, and each says why
    assert [g["goal"] for g in result["goals"]] == [k for k, _, _ in GOALS]
    assert all(g["status"] == "not run" and "on the CPU" in g["reason"] for g in result["goals"])
    assert result["estimate"]["total_s"] < 480 and result["estimate"]["under_budget"]
    md = Path(result["files"]["markdown"]).read_text()
    assert all(what in md for _, what, _ in GOALS) and all(f"| {name} |" in md for name in parts)
    assert f"H100 estimate of the full plan: {result['estimate']['total_s']:.0f} s (under the 480 s budget" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_one_line_and_exit_2(tmp_path, capsys):
    assert gpu_check(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("python -m bench.gpu_check: error: no CUDA device (torch.cuda.is_available() is False); "
                   "--dry-run runs the plan at toy sizes on the CPU")
    assert not any(tmp_path.iterdir())


def test_bad_parts_is_a_usage_error(tmp_path, capsys):
    assert gpu_check(["--dry-run", "--parts", "kernels,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m bench.gpu_check: error: --parts takes a comma list of {', '.join(plan.PARTS)}; "
                   "got 'kernels,nope'"]


def _ctx(tmp_path):
    return Context(device=torch.device("cpu"), dry_run=True, parts_dir=tmp_path, info={})


def test_a_spent_share_stops_its_part_and_a_failing_part_is_recorded(tmp_path):
    def swallows_errors(ctx, share):  # as a bench cell loop does: `except Exception` must not hide the end
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 10:
            try:
                time.sleep(0.01)
            except Exception:
                pass
        return {}

    def fails(ctx, share):
        raise RuntimeError("CUDA error: an illegal memory access")

    t0 = time.perf_counter()
    slow = run_part(plan.Part("slow", "sleeps", 0.3), swallows_errors, _ctx(tmp_path))
    assert slow["status"] == "timeout" and slow["share_enforced"] and time.perf_counter() - t0 < 3
    assert slow["reason"] == "stopped when its time share of 0.3 s was spent"
    bad = run_part(plan.Part("bad", "raises", 5), fails, _ctx(tmp_path))
    assert bad["status"] == "error" and bad["reason"] == "RuntimeError: CUDA error: an illegal memory access"
    assert "Traceback" in bad["data"]["traceback"]
    ok = run_part(plan.Part("ok", "returns", 5), lambda c, s: {"x": 1, "summary": "one"}, _ctx(tmp_path))
    assert ok["status"] == "ok" and ok["reason"] is None and ok["data"] == {"x": 1, "summary": "one"}
    said = run_part(plan.Part("na", "", 5), lambda c, s: {"status": "not run", "reason": "no torchcodec"},
                    _ctx(tmp_path))
    assert (said["status"], said["reason"], said["data"]) == ("not run", "no torchcodec", {})


def test_memory_count_sets_aside_what_the_allocator_held_before_the_step(tmp_path, monkeypatch):
    import bench.memory

    mib = 2 ** 20
    step = {"peak_total": 900 * mib, "cuda_max_allocated": 1000 * mib, "cuda_base_allocated": 500 * mib,
            "parameters": 300 * mib, "buffers": 0, "gradients": 100 * mib, "optimizer_state": 0,
            "inputs": 60 * mib, "peak_phase": "backward"}
    monkeypatch.setattr(bench.memory, "measure", lambda *a, **k: {"step_memory": step})
    d = memory_count(_ctx(tmp_path), 25)
    assert d["untracked_before_step_bytes"] == 40 * mib  # 500 - (300 + 100 + 60)
    assert d["difference_bytes"] == 100 * mib and d["difference_in_step_bytes"] == 60 * mib
    assert d["relative_difference"] == pytest.approx(0.06)
    assert d["summary"] == ("exact 900.0 MiB, max_memory_allocated 1,000.0 MiB (+10.00%; 40.0 MiB held before the "
                            "step by no counted tensor; in the step +6.00%)")
    step["cuda_max_allocated"] = None
    assert "difference_bytes" not in memory_count(_ctx(tmp_path), 25)


def _part(data, status="ok", reason=None):
    return {"status": status, "reason": reason, "data": data}


def test_goals_met_missed_and_not_run_from_the_parts():
    dm_goals = {"applicable": True, "speedup_vs_reference": 2.4, "mem_vs_reference": 0.6, "mfu": 0.47,
                "goal_mfu": 0.45, "speedup_dual_vs_enc": None,
                "pass": {"speedup_vs_reference": True, "mem_vs_reference": False, "mfu": True,
                         "speedup_dual_vs_enc": None}}
    fused = [{"variant": "fused (dispatch: triton)", "ok": True, "op": op, "setup": "ViT-B", "gbps": g,
              "of_copy_bw": g / 3000, "of_hbm_datasheet": g / 3350} for op, g in (("gather_cubes", 2400),
                                                                                   ("masked_mse_loss", 2250))]
    parts = {"dual_masking_vit_b": _part({"goals": dm_goals}),
             "kernels": _part({"rows": fused + [{"variant": "eager ref", "ok": True, "of_copy_bw": 0.1}]}),
             "memory_count": _part({"cuda_max_allocated_bytes": 1000, "relative_difference": 0.004,
                                    "summary": "exact 996 B"})}
    got = {g["goal"]: (g["status"], g["value"]) for g in judge_goals(parts, gpu=True)}
    assert got["speedup_vs_reference"] == ("met", "2.40x")
    assert got["mem_vs_reference"] == ("missed", "0.60")
    assert got["mfu"] == ("met", "47.0%")
    assert got["speedup_dual_vs_enc"][0] == "not run"
    assert got["kernels_near_hbm"][0] == "met" and "masked_mse_loss" in got["kernels_near_hbm"][1]  # 75% >= 70%
    assert got["exact_memory"] == ("met", "exact 996 B")
    fused[1]["of_copy_bw"] = 0.69
    parts["memory_count"]["data"]["relative_difference"] = -0.02
    parts["dual_masking_vit_b"] = _part({}, "timeout", "stopped when its time share of 90 s was spent")
    goals = {g["goal"]: g for g in judge_goals(parts, gpu=True)}
    assert goals["kernels_near_hbm"]["status"] == "missed" and goals["exact_memory"]["status"] == "missed"
    assert goals["mfu"]["status"] == "not run" and "timeout (stopped when its time share of 90 s" in goals["mfu"]["reason"]
    assert all(g["status"] == "not run" for g in judge_goals({}, gpu=True))


def test_estimate_fits_the_budget_and_counts_exact_flops():
    e = est_mod.estimate(est_mod.H100)
    assert e["total_s"] < plan.BUDGET_S and e["shares_total_s"] <= plan.BUDGET_S
    assert all(p["fits_share"] for p in e["parts"].values()), e["parts"]
    # a reference step of ViT-B 16x224: 6x the paper's Table 2 forward GMACs (dual 0.5: 25.87), per clip
    step = est_mod.train_step("vit_base_patch16_224", 1, 0.5, "reference")
    assert step["flops"] / 6 / 1e9 == pytest.approx(25.87, rel=0.01)
    ours = est_mod.train_step("vit_base_patch16_224", 2, 0.5, "vmae_fast")
    assert ours["flops"] == 2 * 6 * pretrain_macs("vit_base_patch16_224", convention="vmae_fast")["total"]
    assert est_mod.train_step("vit_base_patch16_224", 2, 0.5, "vmae_fast", ckpt=True)["flops"] > ours["flops"]
    slower = est_mod.estimate(est_mod.A100)  # a third of the H100's compute, 60% of its bandwidth
    assert all(slower["parts"][k]["device_ideal_s"] >= v["device_ideal_s"] for k, v in e["parts"].items())


@pytest.mark.parametrize("name, gbps", [("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000),
                                        ("NVIDIA H200", 4800), ("NVIDIA A100-SXM4-80GB", 2039),
                                        ("NVIDIA A100-SXM4-40GB", 1555), ("NVIDIA GeForce RTX 4090", None)])
def test_datasheet_hbm_bandwidth_by_device_name(name, gbps):
    assert datasheet_hbm_gbps(name) == gbps


def test_pytest_summary_counts():
    assert pytest_counts("....\n3 passed, 1 failed, 2 skipped, 617 deselected, 1 error in 5.21s\n") == \
        {"passed": 3, "failed": 1, "skipped": 2, "deselected": 617, "error": 1}
    assert pytest_counts("34 skipped, 617 deselected, 2 warnings in 11.2s") == \
        {"skipped": 34, "deselected": 617, "warning": 2}
    assert pytest_counts("ImportError while loading conftest") == {}
