"""Runs that survive what clusters do to them: a stop signal at any step (checkpoint, one line,
exit 4, resumed bit-exact), the save clock, a checkpoint written by main at 66b4fa7 (the layout
before the state set), and a failing checkpoint write (the previous one stays loadable, exit 5).

Every comparison is with a run that was never stopped: final weights, optimizer state and the
metrics rows (each step once, the same values)."""
from __future__ import annotations

import errno
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("av", reason="PyAV writes the synthetic videos")

from run_helpers import (REPO, children, fail_if_ended_or_late, finish, interrupted_when, killed_after,  # noqa: E402
                         start_group)
from train import finetune, pretrain  # noqa: E402
from train.checkpointing import CHECKPOINT, PENDING  # noqa: E402
from train.cli import run_cli  # noqa: E402
from train.errors import CheckpointWriteFailed, StoppedBySignal  # noqa: E402
from train.make_synthetic import make_dataset  # noqa: E402
from train.metrics import read_metrics  # noqa: E402

TINY = ["--model", "vit_small_patch16_224", "--model-overrides",
        "depth=2,embed_dim=64,num_heads=2,decoder_embed_dim=32,decoder_num_heads=2,patch_size=8",
        "--decoder-depth", "1", "--num-frames", "4", "--sampling-rate", "2", "--img-size", "32",
        "--num-workers", "0", "--no-progress"]
# drop path draws (a lost RNG stream shows), clipping (grad_norm rows), rows every 2 steps and a
# checkpoint every 3: stops fall inside a log window, on a save step, and between.
COMMON = ["--batch-size", "2", "--num-sample", "2", "--steps", "7", "--warmup-steps", "2", "--lr", "1e-3",
          "--log-every", "2", "--save-every", "3", "--drop-path", "0.5", "--clip-grad", "1.0"]
# the row values that do not depend on the clock
SAME = ("step", "loss", "lr", "epoch", "grad_norm", "skipped_videos")


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one thread (conftest)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, n=24, frames=16, height=32, width=40, seed=0)
    return root


def args(data, out, *extra):
    return ["--data-list", str(data / "pretrain.txt"), "--data-root", str(data), "--output-dir", str(out),
            *TINY, *COMMON, *extra]


def rows(out) -> list[dict]:
    return [{k: r[k] for k in SAME if k in r} for r in read_metrics(out) if "loss" in r]


@pytest.fixture(scope="module")
def unbroken(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken")
    pretrain.main(args(data, out))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Final weights and optimizer state bit for bit, and the same metrics rows, each step once."""
    ca, cb = (torch.load(p / CHECKPOINT, weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    oa, ob = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
    assert rows(a) == rows(b)
    assert [r["step"] for r in rows(b)] == sorted({r["step"] for r in rows(b)})  # each step once


def signal_at(step, signum=signal.SIGTERM, times=1, apart=0.0):
    def on_step(done, loss):
        if done == step:
            for i in range(times):
                if i:
                    time.sleep(apart)
                os.kill(os.getpid(), signum)
    return on_step


# ----------------------------------------------------------------------------- signals
@pytest.mark.parametrize("stop, signum", [(1, signal.SIGTERM), (2, signal.SIGINT), (3, signal.SIGUSR1),
                                          (5, signal.SIGTERM)])
def test_a_signal_saves_at_the_step_and_the_resume_is_bit_exact(data, unbroken, tmp_path, stop, signum):
    out = tmp_path / "run"
    with pytest.raises(StoppedBySignal) as exc:
        pretrain.main(args(data, out), on_step=signal_at(stop, signum))
    name = signal.Signals(signum).name
    assert str(exc.value).startswith(f"{name} at step {stop}: checkpoint {out / CHECKPOINT} (step {stop}); "
                                     "resume with: vmae-pretrain --data-list")
    assert str(exc.value).endswith(" --resume auto")
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == stop and not (out / PENDING).exists()
    assert read_metrics(out)[-1] == {**read_metrics(out)[-1], "step": stop, "event": "stopped", "reason": name}
    assert signal.getsignal(signum) is signal.default_int_handler or signal.getsignal(signum) == signal.SIG_DFL
    pretrain.main(args(data, out, "--resume", "auto"))
    assert_same_run(unbroken, out)


def test_stops_at_several_steps_of_one_run(data, unbroken, tmp_path):
    out = tmp_path / "run"
    for stop in (2, 4, 6):
        with pytest.raises(StoppedBySignal):
            pretrain.main(args(data, out, *(["--resume", "auto"] if stop > 2 else [])), on_step=signal_at(stop))
    pretrain.main(args(data, out, "--resume", "auto"))
    assert_same_run(unbroken, out)
    assert [r["step"] for r in read_metrics(out) if r.get("event") == "resume"] == [2, 4, 6]


def test_a_signal_at_the_last_step_ends_the_run_normally(data, unbroken, tmp_path):
    res = pretrain.main(args(data, tmp_path / "run"), on_step=signal_at(7))
    assert res["step"] == 7 and Path(res["export"]).is_file()
    assert_same_run(unbroken, tmp_path / "run")


def test_a_repeated_delivery_counts_once(data, unbroken, tmp_path, monkeypatch):
    # SLURM signals every process and torchrun forwards to its workers: two within milliseconds
    out = tmp_path / "run"
    with pytest.raises(StoppedBySignal):
        pretrain.main(args(data, out), on_step=signal_at(4, times=2))
    pretrain.main(args(data, out, "--resume", "auto"))
    assert_same_run(unbroken, out)


def test_a_second_signal_stops_at_once_keeping_the_committed_checkpoint(data, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("train.signals.REPEAT_S", 0.05)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:  # the second arrives while the first waits for the step's end
        pretrain.main(args(data, out), on_step=signal_at(4, times=2, apart=0.1))
    assert exc.value.code == 128 + signal.SIGTERM
    assert capfd.readouterr().err.splitlines()[-1] == ("vmae-pretrain: stopped: a second SIGTERM: stopping now, "
                                                       "without a checkpoint; the last committed one is kept")
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 3


def test_the_save_clock_changes_nothing_but_the_checkpoints(data, unbroken, tmp_path, monkeypatch):
    # a clock that jumps a minute a call: every step is due (rank 0's clock decides)
    t = iter(range(0, 10 ** 6, 60))
    monkeypatch.setattr("train.signals.time.monotonic", lambda: float(next(t)))
    out = tmp_path / "run"
    with pytest.raises(StoppedBySignal):
        pretrain.main(args(data, out, "--save-every-minutes", "0.5"), on_step=signal_at(5))
    pretrain.main(args(data, out, "--resume", "auto"))
    assert_same_run(unbroken, out)


def test_the_process_stops_with_one_line_and_status_4(data, unbroken, tmp_path):
    """The real thing: SIGINT to the process group (Ctrl-C reaches the DataLoader workers too),
    one line naming the checkpoint and the command, status 4; that command finishes the run."""
    out = tmp_path / "run"
    argv = args(data, out, "--steps", "200", "--num-workers", "1")
    rc, err = interrupted_when([sys.executable, "-m", "train.pretrain", *argv],
                               lambda: (out / "metrics.jsonl").is_file() and any("loss" in r for r in read_metrics(out)),
                               "its first logged loss", env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert rc == 4, err
    line = err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("vmae-pretrain: stopped: SIGINT at step "), err
    stop = torch.load(out / CHECKPOINT, weights_only=True)["step"]
    assert f"at step {stop}: checkpoint {out / CHECKPOINT} (step {stop}); resume with: vmae-pretrain " in line[0]
    resumed = shlex.split(line[0].split("resume with: vmae-pretrain ", 1)[1])
    assert resumed[-2:] == ["--resume", "auto"] and "--steps" in resumed
    assert stop < 200


# ----------------------------------------------------------------------------- old checkpoints
LEGACY_KEYS = ("task", "step", "config", "plan", "args", "scaler", "rng", "data", "skipped_total", "skipped_files",
               "lowest_loss", "best", "task_state", "model", "optimizer")


def to_legacy(path: Path) -> None:
    """Rewrite a checkpoint in the layout of main at 66b4fa7 (``train/loop.py::_Run.save`` there:
    one top-level key per piece, the RNG a list of ranks)."""
    ck = torch.load(path, weights_only=True)
    s = ck.pop("state")
    ck.pop("format")
    ck.update(scaler=s["scaler"], rng=s["rng"]["ranks"], skipped_total=s["skips"]["total"],
              skipped_files=s["skips"]["files"], lowest_loss=s["loss_watch"]["lowest"], best=s["best_eval"]["best"],
              data={k: v for k, v in s["data"].items() if k != "step"}, task_state=s.get("task"))
    assert sorted(ck) == sorted(LEGACY_KEYS)
    torch.save(ck, path)


def test_a_checkpoint_of_the_old_layout_resumes_bit_exact(data, unbroken, tmp_path):
    # (checked by hand as well with a checkpoint written by the code of 66b4fa7 itself)
    out = tmp_path / "run"
    with pytest.raises(StoppedBySignal):
        pretrain.main(args(data, out, "--log-every", "1"), on_step=signal_at(3))
    to_legacy(out / CHECKPOINT)
    pretrain.main(args(data, out, "--resume", "auto", "--log-every", "1"))
    full = tmp_path / "full"
    pretrain.main(args(data, full, "--log-every", "1"))
    assert_same_run(full, out)


# ----------------------------------------------------------------------------- storage faults
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failing_checkpoint_write_keeps_the_previous_one_and_stops(data, unbroken, tmp_path, monkeypatch, code,
                                                                     capsys):
    """The disk fills (or fails) in the middle of the checkpoint of step 6: the one of step 3
    stays loadable, the run stops with one line (status 5), and a resume ends as an unbroken run."""
    out = tmp_path / "run"
    real_save = torch.save

    def failing(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 6:
            f.write(b"half a checkpoint")
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    rc = run_cli(pretrain.main, "vmae-pretrain", args(data, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 5
    assert len(err) == 1 and err[0].startswith(f"vmae-pretrain: stopped: writing the checkpoint {out / PENDING} "
                                               f"failed (OSError: [Errno {code}] {os.strerror(code)}); the last "
                                               f"committed checkpoint, {out / CHECKPOINT} (step 3), is kept; "
                                               "resume with: vmae-pretrain "), err
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT, "metrics.jsonl"]  # no temporary file left
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 3
    monkeypatch.setattr(torch, "save", real_save)
    pretrain.main(args(data, out, "--resume", "auto"))
    assert_same_run(unbroken, out)


def test_a_failing_commit_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_replace = os.replace

    def failing(src, dst):
        if Path(src).name == PENDING and torch.load(src, weights_only=True)["step"] == 6:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr("train.checkpointing.os.replace", failing)
    with pytest.raises(CheckpointWriteFailed, match=r"\(step 3\), is kept"):
        pretrain.main(args(data, out))
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 3


# ----------------------------------------------------------------------------- earlier runs
def test_metrics_without_a_checkpoint_refuse_a_start_unless_overwrite(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for extra in ([], ["--resume", "auto"]):
        rc = run_cli(pretrain.main, "vmae-pretrain", args(data, out, "--steps", "1", *extra))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err == (f"vmae-pretrain: error: --output-dir {out} holds the metrics of an earlier run "
                                   "(metrics.jsonl) and no checkpoint to continue from; start over with "
                                   "--overwrite (its rows are removed), or choose another --output-dir")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    pretrain.main(args(data, out, "--steps", "2", "--overwrite"))
    assert [r["step"] for r in read_metrics(out)] == [2]
    # --overwrite also replaces a checkpoint: a later --resume auto must not find the old one
    pretrain.main(args(data, out, "--steps", "1", "--overwrite", "--save-every", "1"))
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 1
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_finetune_signal_resume_keeps_ema_and_best(data, tmp_path):
    ft = ["--train-list", str(data / "train.txt"), "--val-list", str(data / "val.txt"), "--num-classes", "4",
          "--data-root", str(data), "--model", "vit_small_patch16_224", "--model-overrides",
          "depth=2,embed_dim=64,num_heads=2,patch_size=8", "--num-frames", "4", "--sampling-rate", "2",
          "--img-size", "32", "--num-workers", "0", "--no-progress", "--test-num-segment", "1",
          "--test-num-crop", "1", "--batch-size", "2",
          "--steps", "6", "--warmup-steps", "2", "--lr", "1e-3", "--log-every", "1", "--save-every", "4",
          "--eval-every", "2", "--model-ema", "--model-ema-decay", "0.9"]
    a, b = tmp_path / "a", tmp_path / "b"
    finetune.main([*ft, "--output-dir", str(a)])
    with pytest.raises(StoppedBySignal):
        finetune.main([*ft, "--output-dir", str(b)], on_step=signal_at(3))
    finetune.main([*ft, "--output-dir", str(b), "--resume", "auto"])
    ca, cb = (torch.load(p / CHECKPOINT, weights_only=True) for p in (a, b))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    ea, eb = ca["state"]["task"]["ema"], cb["state"]["task"]["ema"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert ca["state"]["best_eval"] == cb["state"]["best_eval"] and ca["state"]["best_eval"]["best"]["step"] in (2, 4, 6)
    evals = lambda out: [(r["step"], r["acc1"]) for r in read_metrics(out) if "acc1" in r]  # noqa: E731
    assert evals(a) == evals(b) and [s for s, _ in evals(b)] == [2, 4, 6]
    assert not math.isnan(evals(b)[-1][1])


# ----------------------------------------------------------------------------- torchrun
def torchrun(data, out, *extra, restarts=0, steps=16):
    """A world-2 gloo run of pretraining (a tiny model, a row every step), started in its own
    process group."""
    argv = args(data, out, "--steps", str(steps), "--batch-size", "1", "--log-every", "1", *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "-m", "train.pretrain", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return start_group(cmd, env)


def worker(proc, rank: int) -> int:
    """The pid of torchrun's worker of global rank ``rank`` (its child with that RANK)."""
    for pid in children(proc.pid):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under torchrun {proc.pid}")


def when_logged(proc, out: Path, step: int, timeout=180) -> None:
    """Wait until rank 0 logged the row of ``step``."""
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file()
               and any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(out))):
        fail_if_ended_or_late(proc, deadline, f"logging step {step}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_torchrun_one_ranks_signal_stops_every_rank_and_the_resume_is_bit_exact(data, tmp_path, engine):
    full, out = tmp_path / "full", tmp_path / "run"
    with killed_after(torchrun(data, full, "--dist", engine), torchrun(data, out, "--dist", engine)) as (ref, proc):
        when_logged(proc, out, 2)
        os.kill(worker(proc, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns it at the step boundary
        rc, log = finish(proc)
        assert rc != 0 and log.count("vmae-pretrain[rank 0]: stopped: SIGTERM at step ") == 1 and "[rank 1]: stopped" not in log, log[-6000:]
        stop = int(log.split("stopped: SIGTERM at step ")[1].split(":")[0])
        assert 2 <= stop < 16, log[-6000:]
        assert [r for r in read_metrics(out) if r.get("event") == "stopped"][0]["step"] == stop
        rc, log = finish(torchrun(data, out, "--dist", engine, "--resume", "auto"))
        assert rc == 0, log[-6000:]
        rc, log = finish(ref)
        assert rc == 0, log[-6000:]
    assert rows(out) == rows(full) and [r["step"] for r in rows(out)] == list(range(1, 17))
    wa, wb = (torch.load(p / "pretrain_official.pth", weights_only=True)["model"] for p in (full, out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    if engine == "ddp":  # the optimizer state too
        ca, cb = (torch.load(p / CHECKPOINT, weights_only=True)["optimizer"]["state"] for p in (full, out))
        assert all(torch.equal(ca[i][k], cb[i][k]) for i in ca for k in ca[i])
    else:  # the sharded folders, read whole offline: every weight and optimizer tensor
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        flat = []
        for p in (full, out):
            dcp_to_torch_save(p / (p / "checkpoint-latest.txt").read_text().strip(), tmp_path / f"{p.name}.pt")
            flat.append(tensors(torch.load(tmp_path / f"{p.name}.pt", weights_only=True)))
        assert flat[0].keys() == flat[1].keys() and any("optimizer" in k and "exp_avg" in k for k in flat[0])
        assert all(torch.equal(flat[0][k], flat[1][k]) for k in flat[0])


def tensors(obj, prefix="") -> dict:
    """Every tensor in a nested dict/list, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, val in items for k, v in tensors(val, f"{prefix}.{key}").items()}


@pytest.mark.slow
def test_torchrun_restarts_a_group_whose_rank_was_killed_and_resumes_by_itself(data, tmp_path):
    full, out = tmp_path / "full", tmp_path / "run"
    with killed_after(torchrun(data, full, "--save-every", "3"),
                      torchrun(data, out, "--save-every", "3", restarts=1)) as (ref, proc):
        when_logged(proc, out, 4)  # the checkpoint of step 3 is committed once step 4's loss vouched for it
        os.kill(worker(proc, 1), signal.SIGKILL)
        rc, log = finish(proc)
        assert rc == 0, "\n".join(ln for ln in log.splitlines() if "vmae-pretrain[" in ln or "Error" in ln)
        resumed = [r for r in read_metrics(out) if r.get("event") == "resume"]
        assert len(resumed) == 1 and resumed[0]["step"] % 3 == 0 and resumed[0]["step"] >= 3, log[-6000:]
        rc, log = finish(ref)
        assert rc == 0, log[-6000:]
    assert rows(out) == rows(full) and [r["step"] for r in rows(out)] == list(range(1, 17))
    wa, wb = (torch.load(p / "pretrain_official.pth", weights_only=True)["model"] for p in (full, out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ca, cb = (torch.load(p / CHECKPOINT, weights_only=True)["optimizer"]["state"] for p in (full, out))
    assert all(torch.equal(ca[i][k], cb[i][k]) for i in ca for k in ca[i])


# ----------------------------------------------------------------------------- lists
def test_a_label_outside_the_classes_refuses_before_any_output(data, tmp_path, capsys):
    lines = (data / "train.txt").read_text().splitlines()
    path, _ = lines[3].rsplit(maxsplit=1)
    bad = tmp_path / "train.txt"
    bad.write_text("\n".join(lines[:3] + [f"{path} 4", f"{path} -0"] + lines[4:]) + "\n")
    out = tmp_path / "run"
    argv = ["--train-list", str(bad), "--num-classes", "4", "--data-root", str(data), "--output-dir", str(out),
            "--model", "vit_small_patch16_224", "--model-overrides", "depth=2,embed_dim=64,num_heads=2,patch_size=8",
            "--num-frames", "4", "--sampling-rate", "2", "--img-size", "32", "--num-workers", "0", "--steps", "1"]
    assert run_cli(finetune.main, "vmae-finetune", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vmae-finetune: error: --train-list {bad}: 1 of {len(lines) + 1} labels are outside [0, 4) "
                   f"(--num-classes 4): {data / path} 4"]
    assert not out.exists()


def test_missing_files_are_counted_and_named_and_refused_beyond_max_missing(data, tmp_path, capsys):
    lines = (data / "pretrain.txt").read_text().splitlines()
    gone = [f"gone{i}.mp4" for i in range(7)]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(lines + [f"{g} 0 -1" for g in gone]) + "\n")
    out = tmp_path / "run"
    argv = args(data, out, "--steps", "1")
    argv[argv.index("--data-list") + 1] = str(lst)
    assert run_cli(pretrain.main, "vmae-pretrain", argv + ["--max-missing", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    named = ", ".join(str(data / g) for g in gone[:5])
    assert err == [f"vmae-pretrain: error: --data-list {lst}: 7 of {len(lines) + 7} files are missing: {named} and "
                   f"2 more (--max-missing 6; --data-root is {str(data)!r})"]
    assert not out.exists()
    assert run_cli(pretrain.main, "vmae-pretrain", argv + ["--max-missing", "7"]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "files are missing" in ln]
    assert len(warned) == 1 and warned[0].startswith(f"vmae-pretrain: warning: --data-list {lst}: 7 of "
                                                     f"{len(lines) + 7} files are missing, skipped like unreadable")


def test_ctrl_c_outside_the_steps_is_one_line(data, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("train.pretrain.count_macs", interrupted)  # while the task is built
    assert run_cli(pretrain.main, "vmae-pretrain", args(data, tmp_path / "run")) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "vmae-pretrain: stopped: interrupted (SIGINT) outside the training steps; a committed checkpoint, if any, "
        "is kept"]


FAIL_DCP_WRITE = '''
import errno, os
from torch.distributed.checkpoint import filesystem

_write = filesystem.FileSystemWriter.write_data

def write_data(self, plan, planner):  # rank 1's shard of the checkpoint of step 6: the disk is full
    if os.environ.get("RANK") == "1" and "step00000006" in str(self.path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _write(self, plan, planner)

filesystem.FileSystemWriter.write_data = write_data
'''


@pytest.mark.slow
def test_torchrun_fsdp_a_shard_that_cannot_be_written_keeps_the_previous_checkpoint(data, tmp_path):
    """One rank's shard fails (injected through sitecustomize in the workers): every rank stops
    with status 5, the sharded checkpoint of step 3 stays the one named and loads: the resume
    finishes the run."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_DCP_WRITE)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(inject), str(REPO), os.environ.get("PYTHONPATH", "")]))
    argv = args(data, out, "--steps", "8", "--batch-size", "1", "--log-every", "1", "--dist", "fsdp",
                "--save-every", "3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "train.pretrain", *argv]
    rc, log = finish(start_group(cmd, env))
    lines = [ln for ln in log.splitlines() if "vmae-pretrain[rank 0]: stopped:" in ln]
    assert rc != 0 and len(lines) == 1, log[-6000:]
    assert ("checkpoint-step00000006.dcp.tmp failed (rank 1: OSError: [Errno 28] No space left on device); the "
            f"last committed checkpoint, {out / 'checkpoint-step00000003.dcp'} (step 3), is kept; resume with: "
            "torchrun ... -m train.pretrain ") in lines[0]
    assert "exitcode  : 5" in log
    assert (out / "checkpoint-latest.txt").read_text().strip() == "checkpoint-step00000003.dcp"
    assert sorted(p.name for p in out.glob("checkpoint-step*")) == ["checkpoint-step00000003.dcp"]
    rc, log = finish(torchrun(data, out, "--dist", "fsdp", "--save-every", "3", "--resume", "auto", steps=8))
    assert rc == 0, log[-6000:]
    assert [r["step"] for r in rows(out)] == list(range(1, 9))
