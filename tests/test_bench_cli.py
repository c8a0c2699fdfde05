"""``vmae-bench`` and the options every benchmark shares: one error for a bad ``--arch`` or a
device this machine lacks, and results under the current directory when bench is installed."""
from __future__ import annotations

import json

import pytest
import torch

from bench.__main__ import COMMANDS, main as vmae_bench
from bench.common import paths

MODEL_BENCHES = ["dual-masking", "memory", "kernels", "attention"]


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        vmae_bench(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_help_lists_every_command_and_where_results_go(capsys):
    with pytest.raises(SystemExit) as exc:
        vmae_bench(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "usage: vmae-bench" in out
    assert all(f"  {name}  " in out for name in COMMANDS) and "results:" in out
    for argv, got in ((["fastest"], "got 'fastest'"), ([], "got none")):
        err = _usage_error(argv, capsys)
        assert err.startswith("vmae-bench: error: COMMAND must be one of dual-masking, ") and err.count("\n") == 1
        assert got in err


def test_gpu_check_without_cuda_names_the_command_as_typed(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _usage_error(["gpu-check"], capsys)
    assert err.startswith("vmae-bench gpu-check: error: no CUDA device") and err.count("\n") == 1


@pytest.mark.parametrize("command", MODEL_BENCHES)
def test_a_bad_arch_is_the_same_usage_error_everywhere(command, capsys):
    err = _usage_error([command, "--arch", "vit_zz"], capsys)
    assert err.startswith(f"vmae-bench {command}: error: ") and err.count("\n") == 1  # one line, as typed
    assert "argument --arch: unknown arch 'vit_zz'; expected one of" in err


def test_kernels_takes_only_the_archs_it_measures(capsys):
    assert "'vit_s': this benchmark measures vit_base_patch16_224 or vit_giant_patch14_224 only" in \
        _usage_error(["kernels", "--arch", "vit_s"], capsys)


@pytest.mark.parametrize("command", MODEL_BENCHES)
def test_cuda_without_cuda_is_a_usage_error(command, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _usage_error([command, "--device", "cuda"], capsys)
    assert "error: --device 'cuda': CUDA is not available on this machine" in err


def test_installed_smoke_from_another_directory_writes_under_it(tmp_path, monkeypatch, capsys):
    """As installed (no source checkout above bench/), run from elsewhere: the results go to
    ./bench-results there, --help says so, and no git repository is asked for a commit."""
    monkeypatch.setattr(paths, "SOURCE_ROOT", None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        vmae_bench(["memory", "--help"])
    assert "./bench-results under the current directory" in " ".join(capsys.readouterr().out.split())
    status = vmae_bench(["dual-masking", "--smoke", "--arch", "vit_s", "--masking", "enc", "--impl", "vmae_fast",
                         "--device", "cpu", "--no-plot", "--no-progress"])
    assert status == 0
    (path,) = (tmp_path / "bench-results").glob("custom-*.json")
    result = json.loads(path.read_text())
    assert [r["status"] for r in result["rows"]] == ["ok"] and result["config"]["smoke"]
    assert result["device"]["git_commit"] == "unknown"
    assert result["command"].startswith("python -m bench.dual_masking --smoke --arch vit_s")
    assert "| setup | masking | impl |" in capsys.readouterr().out


def test_loader_names_missing_videos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tests/data is a checkout's folder, not the current directory's
    with pytest.raises(SystemExit, match="--videos: tests/data does not exist"):
        vmae_bench(["loader", "--videos", "tests/data"])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_names_itself_as_typed(command, capsys):
    from bench.common import cli as common_cli

    with pytest.raises(SystemExit) as exc:
        vmae_bench([command, "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith(f"usage: vmae-bench {command} ")
    assert common_cli.INVOKED_AS is None  # reset: python -m bench.<module> later in the process keeps its name


def _row(impl, label="ViT-S 16x224 b2", ratio=0.5, ms=10.0):
    return {"impl": impl, "status": "ok", "setup": {"label": label}, "decoder_ratio": ratio, "masking": "dual 0.5",
            "loss": 1.0, "step_s": {"median": ms / 1e3, "min": ms / 1e3}, "speedup_vs_reference": 2.0,
            "speedup_vs_reference_min": 2.0, "mem_vs_reference": 0.5, "mem_vs_reference_basis": "peak"}


@pytest.mark.parametrize("smoke", [False, True])
def test_a_smoke_run_says_so_and_stresses_no_speedup(smoke):
    from bench.dual_masking.markdown import SMOKE, _vs_reference

    text = "\n".join(_vs_reference([_row("vmae_fast", ms=5.0), _row("reference")], smoke))
    assert ("**2.00x**" in text) is (not smoke) and "2.00x" in text
    assert (SMOKE in text) is smoke


def test_the_memory_planner_does_not_print_its_cap_as_a_batch():
    from bench.memory import MAX_BATCH_CAP, _batch_cell

    assert _batch_cell(37) == "37" and _batch_cell(1536) == "1,536" and _batch_cell(0) == "none fits"
    assert _batch_cell(MAX_BATCH_CAP) == ">= 65,536 (search cap; limit not reached)"


def test_worker_batch_times_both_ways_inside_a_worker(tmp_path, capsys):
    from bench import worker_batch

    res = worker_batch.main(["--batches", "3", "--views", "2", "--frames", "2", "--size", "8", "--out", str(tmp_path)])
    # 3 of each way, the first of each left out as warm-up
    assert set(res["cpu_ms_per_batch"]) == set(worker_batch.WAYS)
    assert all(r["n"] == 2 and 0 <= r["min"] <= r["median"] <= r["max"] for r in res["cpu_ms_per_batch"].values())
    assert res["config"]["batch_mb"] == pytest.approx(2 * 3 * 2 * 8 * 8 / 1e6)
    assert len(list(tmp_path.glob("worker-batch-*.json"))) == 1
    with pytest.raises(SystemExit) as exc:
        vmae_bench(["worker-batch", "--batches", "1"])
    assert exc.value.code == 2 and "--batches must be >= 2, got 1" in capsys.readouterr().err
