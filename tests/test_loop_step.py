"""The trainer's step (``train.loop.Trainer``) on a linear model, where every gradient has a
closed form: each optimizer step gets the gradient of the mean loss over all its micro-batches
(each micro-batch loss divided by the accumulation steps), at the planned lr, clipped to the norm
asked; the loss handed on and logged is that mean; rows, evaluations, checkpoints and a resume
fall on the right steps. Milliseconds a run: the whole file is fast enough for ``make mutate``."""
from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn as nn

from run_helpers import Crash, crash_at
from train import loop
from train.checkpointing import CHECKPOINT, PENDING
from train.config import RunConfig
from train.data_source import ListSource
from train.distributed import Dist
from train.metrics import read_metrics
from vmae_fast.errors import UsageError
from vmae_fast.video.shards import sample_key

N, FEATURES = 24, 6
BAD = "videos/broken.mp4"  # the toy dataset reports it skipped when it serves sample 5


class Toy(torch.utils.data.Dataset):
    """``(epoch, i)`` -> one uint8 "view" of 6 values and an integer target."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (N, FEATURES), dtype=torch.uint8, generator=g)
        self.y = torch.randint(0, 5, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, key):
        _, i = key
        return {"video": [self.x[i]], "label": int(self.y[i]), "index": i, "skipped": [BAD] if i == 5 else []}


class Linear(nn.Linear):
    def official_state_dict(self):  # what the run exports at its end
        return self.state_dict()


def features(video):
    return video.double().flatten(1) / 255


class Recorder:
    """The task's loss (recording each micro-batch), and a pre-step hook recording what the
    optimizer is about to apply: weights, gradients, lr."""

    def __init__(self, nan_at_call=None):
        self.micro, self.steps, self.after, self.calls = [], [], [], 0
        self.gen = torch.Generator().manual_seed(9)  # a task's own stream (like the masks'), checkpointed
        self.draws, self.training = [], []
        self.nan_at_call = nan_at_call

    def loss(self, model, batch):
        self.calls += 1
        self.micro.append(batch["index"].tolist())
        self.draws.append(torch.randint(1 << 30, (1,), generator=self.gen).item())
        self.training.append(model.training)
        pred = model(features(batch["video"]).float()).squeeze(1)
        out = ((pred - batch["label"].float()) ** 2).mean()
        return out * math.nan if self.calls == self.nan_at_call else out

    def pre_step(self, opt, args, kwargs):
        p = (self.model.weight, self.model.bias)
        self.steps.append({"params": [q.detach().clone() for q in p], "grads": [q.grad.detach().clone() for q in p],
                           "lr": [g["lr"] for g in opt.param_groups], "calls": self.calls})

    def after_step(self, model, step):
        self.after.append((step, model.weight.detach().clone()))


def reference(w, b, idx, ds):
    """Mean squared error over the samples ``idx`` at weights ``(w, b)``, and its gradients, in
    float64 from the closed form."""
    x, y = features(ds.x[idx]), ds.y[idx].double()
    r = x @ w.double().flatten() + b.double() - y
    return (r ** 2).mean().item(), 2 * (r[:, None] * x).mean(0), 2 * r.mean()


def config(out, **kw):
    base = dict(task="pretrain", output_dir=str(out), batch_size=2, accum_steps=2, steps=5, warmup_steps=2, lr=0.1,
                min_lr=0.01, warmup_lr=0.02, weight_decay=0.0, no_progress=True, log_every=2, save_every=3, seed=3)
    base.update(kw)
    return RunConfig(**base)


def make_trainer(out, rec=None, *, dataset=None, evaluate=None, eval_every=0, on_step=None, name="pretrain",
                 state=None, flops=0.0, **kw):
    rec = rec or Recorder()
    torch.manual_seed(0)
    rec.model = Linear(FEATURES, 1)
    task = loop.Task(name=name, model=rec.model, model_config={"arch": "toy", "depth": 1},
                     loss=rec.loss, dataset=Toy() if dataset is None else dataset, after_step=rec.after_step,
                     evaluate=evaluate, eval_every=eval_every,
                     generators={"noise": rec.gen}, state=state, flops_per_clip=flops)
    trainer = loop.Trainer(config(out, task=name, **kw), Dist(), task, on_step=on_step)
    if trainer.opt is not None:
        trainer.opt.register_step_pre_hook(rec.pre_step)
    return trainer, rec


def rows(out):
    return [r for r in read_metrics(out) if "loss" in r]


@pytest.mark.parametrize("accum", [1, 2, 3])
def test_each_step_applies_the_gradient_of_the_mean_over_its_micro_batches(tmp_path, accum):
    done = []
    trainer, rec = make_trainer(tmp_path, accum_steps=accum, on_step=lambda s, loss: done.append((s, loss.item())))
    res = trainer.run()
    ds = trainer.task.dataset
    assert rec.calls == 5 * accum and all(len(m) == 2 for m in rec.micro)
    assert [s for s, _ in done] == [1, 2, 3, 4, 5] and res["step"] == 5
    for k, st in enumerate(rec.steps):
        idx = [i for m in rec.micro[k * accum:(k + 1) * accum] for i in m]
        w, b = st["params"]
        want_loss, gw, gb = reference(w, b, idx, ds)
        torch.testing.assert_close(st["grads"][0].double().flatten(), gw, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st["grads"][1].double(), gb.reshape(1), rtol=1e-5, atol=1e-7)
        assert done[k][1] == pytest.approx(want_loss, rel=1e-5)
        # the lr the optimizer applies is the plan's for this step (0-based), on every group
        assert st["lr"] == [trainer.plan.lr_at(k)] * len(st["lr"])
    # the official plan: warmup linspace(0.02, 0.1, 2), then the cosine from 0.1 to 0.01 over 3 steps
    assert [s["lr"][0] for s in rec.steps] == pytest.approx(
        [0.02, 0.1, 0.1, 0.01 + 0.09 * (1 + math.cos(math.pi / 3)) / 2, 0.01 + 0.09 * (1 + math.cos(2 * math.pi / 3)) / 2])
    # after_step: each step index once, after the optimizer moved the weights
    assert [s for s, _ in rec.after] == [0, 1, 2, 3, 4]
    for (_, w_after), st_next in zip(rec.after, rec.steps[1:]):
        assert torch.equal(w_after, st_next["params"][0])
    assert not torch.equal(rec.after[0][1], rec.steps[0]["params"][0])
    assert all(rec.training)


def test_rows_hold_the_window_mean_loss_lr_epoch_and_skips(tmp_path):
    done = []
    trainer, rec = make_trainer(tmp_path, steps=7, on_step=lambda s, loss: done.append(loss.item()))
    assert trainer.run()["skipped"] == 1
    got = rows(tmp_path)
    # a row every 2 steps, and at the save steps 3 and 6 and the last, 7
    assert [r["step"] for r in got] == [2, 3, 4, 6, 7]
    windows = {2: done[0:2], 3: done[2:3], 4: done[3:4], 6: done[4:6], 7: done[6:7]}
    for r in got:
        assert r["loss"] == pytest.approx(sum(windows[r["step"]]) / len(windows[r["step"]]), rel=1e-6)
        assert r["lr"] == trainer.plan.lr_at(r["step"] - 1)
        # 24 videos, 4 a step: 6 steps an epoch; the epoch of the row's last step
        assert r["epoch"] == (r["step"] - 1) // 6
        assert r["clips_per_s"] > 0 and r["mfu"] is None
        assert "grad_norm" not in r and "loss_scale" not in r  # no clipping, fp32
    # sample 5 (skipped once) comes in the first epoch: counted from the row after, once
    first = next(k for k, m in enumerate(rec.micro) if 5 in m) // 2 + 1
    assert [r["skipped_videos"] for r in got] == [int(r["step"] >= first) for r in got]


def test_clipping_applies_the_norm_asked_and_logs_the_norm_before_it(tmp_path):
    trainer, rec = make_trainer(tmp_path, steps=4, clip_grad=0.05, log_every=2, save_every=100)
    trainer.run()
    ds, norms = trainer.task.dataset, []
    for k, st in enumerate(rec.steps):
        idx = [i for m in rec.micro[2 * k:2 * k + 2] for i in m]
        _, gw, gb = reference(*st["params"], idx, ds)
        norm = torch.cat([gw, gb.reshape(1)]).norm().item()
        assert norm > 0.05
        norms.append(norm)
        clipped = torch.cat([g.double().flatten() for g in st["grads"]])
        torch.testing.assert_close(clipped, torch.cat([gw, gb.reshape(1)]) * (0.05 / norm), rtol=1e-4, atol=1e-8)
    assert [r["grad_norm"] for r in rows(tmp_path)] == pytest.approx(
        [(norms[0] + norms[1]) / 2, (norms[2] + norms[3]) / 2], rel=1e-5)


def test_fp16_unscales_before_the_step_and_skips_overflowing_steps(tmp_path):
    # GradScaler: loss x 2**16 at first, halved (and the step skipped) on each overflow; the
    # optimizer sees the true gradients of the steps it applies
    trainer, rec = make_trainer(tmp_path, steps=6, precision="fp16", clip_grad=1e6, log_every=6, save_every=6)
    trainer.run()
    ds, applied = trainer.task.dataset, len(rec.steps)
    assert 0 < applied < 6  # the first steps overflow at 2**16 x gradients ~10 (fp16 max 65504)
    for st in rec.steps:
        idx = [i for m in rec.micro[st["calls"] - 2:st["calls"]] for i in m]
        _, gw, gb = reference(*st["params"], idx, ds)
        torch.testing.assert_close(st["grads"][0].double().flatten(), gw, rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(st["grads"][1].double(), gb.reshape(1), rtol=2e-2, atol=2e-3)
    (row,) = rows(tmp_path)
    assert row["loss_scale"] == 2.0 ** 16 / 2 ** (6 - applied) and math.isinf(row["grad_norm"])


def test_evaluations_fall_on_their_steps_and_the_end_and_keep_the_best(tmp_path):
    accs = iter([30.0, 70.0, 50.0, 60.0])
    seen = []

    def evaluate(model):
        seen.append(model.weight.detach().clone())
        return {"acc1": next(accs), "videos": 3}

    trainer, rec = make_trainer(tmp_path, steps=7, evaluate=evaluate, eval_every=3)
    res = trainer.run()
    evals = [r for r in read_metrics(tmp_path) if "acc1" in r]
    assert [(r["step"], r["acc1"], r["best_acc1"]) for r in evals] == [(3, 30.0, 30.0), (6, 70.0, 70.0),
                                                                     (7, 50.0, 70.0)]
    assert res["eval"] == {"acc1": 50.0, "videos": 3} and res["best"] == {"acc1": 70.0, "videos": 3, "step": 6}
    assert torch.equal(seen[0], rec.after[2][1])  # evaluated the weights after step 3


def test_checkpoints_and_samples_log_follow_the_steps(tmp_path):
    trainer, rec = make_trainer(tmp_path, steps=5, dataset=ListSource(Toy(), 3, log_dir=str(tmp_path)))
    res = trainer.run()
    ck = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ck["step"] == 5 and res["checkpoint"] == tmp_path / CHECKPOINT
    assert ck["format"] == loop.CHECKPOINT_FORMAT == 2 and ck["task"] == "pretrain"
    assert ck["config"] == {"arch": "toy", "depth": 1} and ck["args"]["accum_steps"] == 2
    assert ck["plan"]["world"] == 1 and ck["plan"]["seed"] == 3 and ck["plan"]["total_steps"] == 5
    assert ck["plan"]["steps_per_epoch"] == 6 and ck["plan"]["videos_per_step"] == 4
    assert list(ck["state"]) == ["data", "scaler", "loss_watch", "skips", "best_eval", "rng"]
    # 24 videos, 2 a micro-batch, 2 micro-batches a step: 6 steps an epoch; step 5 is micro-batch 10
    assert ck["state"]["data"] == {"step": 5, "epoch": 0, "micro_in_epoch": 10, "seed": 3}
    assert ck["state"]["skips"] == {"files": [BAD], "total": 1}
    exported = torch.load(res["export"], weights_only=True)["model"]
    assert torch.equal(exported["weight"], trainer.task.model.weight)
    lines = [json.loads(x) for x in (tmp_path / "samples-rank0.jsonl").read_text().splitlines()]
    # a line a micro-batch: the step it went into (1-based) and its samples' keys
    assert [x["step"] for x in lines] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [x["keys"] for x in lines] == [[sample_key(i) for i in m] for m in rec.micro]


# ----------------------------------------------------------------------------- resume
SAME = ("step", "loss", "lr", "epoch", "skipped_videos")


def test_a_resume_replays_the_unbroken_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    ta, ra = make_trainer(a, steps=8, log_every=1, save_every=4)
    ta.run()
    # killed after step 6 (before its row): the checkpoint of step 4 was committed at step 5,
    # whose row the resumed run drops and writes again
    with pytest.raises(Crash):
        make_trainer(b, steps=8, log_every=1, save_every=4, on_step=crash_at(6))[0].run()
    capsys.readouterr()
    (b / PENDING).write_bytes(b"left by the killed run")
    pending_seen = []
    tb, rec = make_trainer(b, steps=8, log_every=1, save_every=4, resume="auto",
                           on_step=lambda done, loss: pending_seen.append((b / PENDING).exists()))
    assert tb.step == 0
    res = tb.run()
    assert pending_seen[0] is False  # removed before the first step
    assert f"resumed {b / CHECKPOINT} at step 4 (1 metrics rows after it dropped)" in capsys.readouterr().out.splitlines()
    assert res["step"] == 8 and len(rec.steps) == 4  # steps 5-8 only
    assert [s["lr"][0] for s in rec.steps] == [tb.plan.lr_at(k) for k in range(4, 8)]
    assert rec.draws == ra.draws[8:]  # the task's generator went on where it was
    for k in ("weight", "bias"):
        assert torch.equal(getattr(ta.task.model, k), getattr(tb.task.model, k))
    keep = [[{k: r[k] for k in SAME} for r in rows(out)] for out in (a, b)]
    assert keep[0] == keep[1] and [r["step"] for r in keep[1]] == list(range(1, 9))
    events = [r for r in read_metrics(b) if "event" in r]
    assert [(r["step"], r["event"], r["checkpoint"]) for r in events] == [(4, "resume", str(b / CHECKPOINT))]
    ca, cb = (torch.load(out / CHECKPOINT, weights_only=True) for out in (a, b))
    assert ca["state"]["data"] == cb["state"]["data"] == {"step": 8, "epoch": 1, "micro_in_epoch": 4, "seed": 3}
    assert ca["state"]["skips"] == cb["state"]["skips"] and ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()


def test_resume_auto_without_a_checkpoint_starts_at_step_0(tmp_path, capsys):
    res = make_trainer(tmp_path, steps=2, resume="auto")[0].run()
    assert res["step"] == 2
    assert f"--resume auto: no checkpoint in {tmp_path} yet, starting at step 0" in capsys.readouterr().out


def _checkpoint(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, steps=2, save_every=2)[0].run()
    return out / CHECKPOINT


def _edit(path, **change):
    ck = torch.load(path, weights_only=True)
    for k, v in change.items():
        if v is None:
            del ck[k]
        else:
            ck[k] = v
    torch.save(ck, path)


@pytest.mark.parametrize("change, why", [
    ({"config": None}, "not a checkpoint written by train.pretrain"),
    ({"step": None}, "not a checkpoint written by train.pretrain"),
    ({"format": 3}, "written in checkpoint format 3 by a newer vmae-fast; this one reads up to 2"),
    ({"task": "finetune"}, "a finetune checkpoint; this is pretrain"),
    ({"config": {"arch": "toy", "depth": 2}}, "the checkpoint's model differs from this run's (depth 2 -> 1); "
                                              "use the same model options or another --output-dir"),
])
def test_a_checkpoint_of_another_run_is_refused_in_one_line(tmp_path, change, why):
    path = _checkpoint(tmp_path)
    _edit(path, **change)
    with pytest.raises(UsageError) as e:
        make_trainer(tmp_path / "new", steps=4, resume=str(path))[0].run()
    assert str(e.value) == f"--resume {path}: {why}"
    assert not (tmp_path / "new").exists()  # refused before any output


def test_unreadable_and_sharded_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError) as e:
        make_trainer(tmp_path / "new", steps=2, resume=str(bad))[0].run()
    assert str(e.value).startswith(f"--resume {bad}: cannot read it (ValueError: cannot read checkpoint {bad}: ")
    folder = tmp_path / "checkpoint-step2.dcp"
    folder.mkdir()
    with pytest.raises(UsageError) as e:
        make_trainer(tmp_path / "new", steps=2, resume=str(folder))[0].run()
    assert str(e.value) == f"--resume {folder}: a sharded (FSDP) folder; this run is not --dist fsdp under torchrun"


def test_a_resume_with_another_schedule_warns_what_changed(tmp_path):
    path = _checkpoint(tmp_path)
    with pytest.warns(UserWarning) as w:
        make_trainer(tmp_path / "new", steps=4, resume=str(path))[0].run()
    msgs = [str(x.message) for x in w if str(x.message).startswith("resuming")]
    assert msgs == [f"resuming {path} at step 2: schedule changed (total_steps 2 -> 4)"]
    with pytest.warns(UserWarning) as w:  # the batch too: one phrase each, "; " between
        make_trainer(tmp_path / "new2", steps=4, batch_size=3, resume=str(path))[0].run()
    (msg,) = [str(x.message) for x in w if str(x.message).startswith("resuming")]
    assert msg.startswith(f"resuming {path} at step 2: batch changed (videos_per_step 4 -> 6") and \
        "); schedule changed (" in msg and "total_steps 2 -> 4" in msg


def test_evaluation_only_reads_the_checkpoint_and_writes_one_row(tmp_path, capsys):
    path = _checkpoint(tmp_path)
    weights = torch.load(path, weights_only=True)["model"]["weight"]
    seen = []

    def evaluate(model):
        seen.append(model.weight.detach().clone())
        return {"acc1": 42.5, "videos": 3}

    out = tmp_path / "eval"
    res = make_trainer(out, evaluate=evaluate, eval_only=True, resume=str(path), steps=None)[0].run()
    assert res == {"step": 0, "eval": {"acc1": 42.5, "videos": 3}} and torch.equal(seen[0], weights)
    assert f"pretrain eval of {path}: acc1 42.50, videos 3" in capsys.readouterr().out.splitlines()
    (row,) = read_metrics(out)
    assert row["eval_only"] is True and row["weights"] == str(path) and row["acc1"] == 42.5 and row["step"] == 0
    assert not (out / CHECKPOINT).exists()
    with pytest.raises(UsageError) as e:
        make_trainer(tmp_path / "none", evaluate=evaluate, eval_only=True, resume="auto", steps=None)[0].run()
    assert str(e.value) == f"--eval --resume auto: no checkpoint in {tmp_path / 'none'}"


def test_overwrite_removes_the_earlier_runs_files(tmp_path):
    make_trainer(tmp_path, steps=3, log_every=1)[0].run()
    stale = [tmp_path / "checkpoint-step2.dcp", tmp_path / "checkpoint-step2.dcp.pending", tmp_path / "tb"]
    for p in stale:
        p.mkdir()
    (tmp_path / "checkpoint-latest.txt").write_text("checkpoint-step2.dcp\n")
    make_trainer(tmp_path, steps=2, log_every=1, overwrite=True)[0].run()
    assert [r["step"] for r in rows(tmp_path)] == [1, 2] and not any(p.exists() for p in stale)
    assert not (tmp_path / "checkpoint-latest.txt").exists()
    # nothing to remove (a fresh folder, or some of the files only): no error
    assert make_trainer(tmp_path / "fresh", steps=1, overwrite=True)[0].run()["step"] == 1
    assert make_trainer(tmp_path / "fresh", steps=1, overwrite=True)[0].run()["step"] == 1
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------- stops
def test_a_non_finite_loss_stops_naming_the_step_and_the_last_safe_checkpoint(tmp_path):
    # accumulation 2: calls 5 and 6 are step 3; checkpoints every step, each committed once the
    # next step's loss vouches for it: the one of step 1 is the last safe one
    trainer, _ = make_trainer(tmp_path, Recorder(nan_at_call=5), steps=6, save_every=1)
    with pytest.raises(loop.NonFiniteLoss) as e:
        trainer.run()
    assert str(e.value) == (f"the loss became nan at step 3. The last safe checkpoint is {tmp_path / CHECKPOINT} "
                            "(step 1); resume from it with --resume auto and a lower lr, --clip-grad, or bf16 "
                            "instead of fp16.")
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 1
    stopped = [r for r in read_metrics(tmp_path) if r.get("event") == "stopped"]
    assert [(r["step"], r["reason"]) for r in stopped] == [(3, "the loss became nan at step 3")]


def test_a_non_finite_loss_before_any_checkpoint(tmp_path):
    trainer, _ = make_trainer(tmp_path, Recorder(nan_at_call=3), steps=6, log_every=1)
    with pytest.raises(loop.NonFiniteLoss) as e:
        trainer.run()
    assert str(e.value) == "the loss became nan at step 2. The last safe checkpoint is none: no checkpoint was kept."


@pytest.mark.parametrize("poisoned", [0, 3])
def test_non_finite_weights_stop_at_the_save(tmp_path, poisoned):
    rec = Recorder()
    after = rec.after_step

    def poison(model, step):
        after(model, step)
        if step == poisoned:
            with torch.no_grad():
                model.weight[0, 0] = math.inf

    rec.after_step = poison
    trainer, _ = make_trainer(tmp_path, rec, steps=6, save_every=4, log_every=100)
    with pytest.raises(loop.NonFiniteLoss) as e:
        trainer.run()
    if poisoned == 0:  # the loss of step 2 is already inf: the first host sync (the save of step 4) names it
        assert str(e.value) == "the loss became inf at step 2. The last safe checkpoint is none: no checkpoint was kept."
    else:  # poisoned by step 4 itself: its losses are finite, its weights are not
        assert str(e.value) == ("the weights became non-finite at step 4. The last safe checkpoint is none: no "
                                "checkpoint was kept.")
        stopped = [r for r in read_metrics(tmp_path) if r.get("event") == "stopped"]
        assert [(r["step"], r["reason"]) for r in stopped] == [(4, "the weights became non-finite at step 4")]
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_diverging_loss_keeps_no_checkpoint_of_it(tmp_path):
    class Jump(Recorder):
        def loss(self, model, batch):
            out = super().loss(model, batch)
            return out * 1000 if self.calls > 6 else out  # steps 4 on: 1000 x

    trainer, _ = make_trainer(tmp_path, Jump(), steps=6, save_every=2, log_every=100)
    with pytest.warns(UserWarning) as w:
        res = trainer.run()
    msgs = [str(x.message) for x in w]
    # the checkpoint of step 2 is vouched for by step 3's loss; step 4's loss is too high: no
    # checkpoint written at 4; the last one (6) is not written either
    assert any(m.startswith("no checkpoint written at step 4: loss ") and " > 10 x the run's lowest step loss " in m
               for m in msgs), msgs
    assert any(m.startswith("no checkpoint written at step 6: ") for m in msgs), msgs
    assert res["checkpoint"] == tmp_path / CHECKPOINT
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 2


def test_a_checkpoint_whose_next_loss_grew_is_dropped(tmp_path):
    class Jump(Recorder):
        def loss(self, model, batch):
            out = super().loss(model, batch)
            return out * 1000 if self.calls in (5, 6) else out  # step 3 only

    trainer, _ = make_trainer(tmp_path, Jump(), steps=4, save_every=2, log_every=100)
    with pytest.warns(UserWarning) as w:
        res = trainer.run()
    msgs = [str(x.message) for x in w]
    assert any(m.startswith("the checkpoint of step 2 was not kept: loss ") for m in msgs), msgs
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 4 and res["step"] == 4


def test_a_signal_saves_commits_and_stops_with_the_resume_command(tmp_path):
    import os
    import signal

    def on_step(done, loss):
        if done == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer, _ = make_trainer(tmp_path, steps=6, save_every=100, on_step=on_step)
    with pytest.raises(loop.StoppedBySignal) as e:
        trainer.run()
    assert str(e.value) == (f"SIGTERM at step 3: checkpoint {tmp_path / CHECKPOINT} (step 3); "
                            "resume with: vmae-pretrain --resume auto")
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 3
    stopped = [r for r in read_metrics(tmp_path) if r.get("event") == "stopped"]
    assert [(r["step"], r["reason"], r["checkpoint"]) for r in stopped] == [(3, "SIGTERM", str(tmp_path / CHECKPOINT))]


# ----------------------------------------------------------------------------- messages, clock
class Clock:
    """``loop.time`` for a test: the seconds move only when the test moves them."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


def test_start_done_and_evaluation_lines_and_the_throughput_without_pauses(tmp_path, capsys, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)

    class Timed(Recorder):
        def loss(self, model, batch):
            clock.now += 0.5  # a micro-batch: half a second, a step (2 of them) one second
            return super().loss(model, batch)

    def evaluate(model):
        clock.now += 100.0  # an evaluation's time is not training time
        return {"acc1": 12.345, "acc5": 50.0, "videos": 3, "note": "x"}

    trainer, _ = make_trainer(tmp_path, Timed(), steps=6, log_every=2, save_every=100, evaluate=evaluate,
                              eval_every=1, flops=2e9)
    trainer.peak = 1e12  # as for a GPU of 1 TFLOP/s (None on a CPU: no MFU)
    res = trainer.run()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("pretrain toy: 0.0M params, 24 videos, 4 clips/step (4 videos x 1), lr 0.1 (x1: --lr, not "
                      "scaled), min 0.01, warmup from 0.02 over 2 steps, steps 0->6, fp32, world 1 (single)")
    assert out[1] == "step 1: acc1 12.35, acc5 50.00 (best acc1 12.35 at step 1)"
    assert out[-1] == (f"done: 6 steps, 1 videos skipped; checkpoint {tmp_path / CHECKPOINT}; "
                       f"weights in {res['export']}")
    # 4 clips a step, one second a step: 4 clips/s in every row, evaluations left out
    assert [r["clips_per_s"] for r in rows(tmp_path)] == [4.0, 4.0, 4.0]
    # MFU: 4 clips/s x 2 GFLOP a clip over the world's 1 TFLOP/s
    assert [r["mfu"] for r in rows(tmp_path)] == pytest.approx([0.008] * 3, rel=1e-12)


def test_the_run_seeds_the_global_streams_with_the_seed(tmp_path):
    draws = []

    class Draw(Recorder):
        def loss(self, model, batch):
            if not draws:
                draws.append(torch.rand(3))  # e.g. drop path: the global torch stream
            return super().loss(model, batch)

    make_trainer(tmp_path, Draw(), steps=1, seed=11)[0].run()
    assert torch.equal(draws[0], torch.rand(3, generator=torch.Generator().manual_seed(11)))


def test_evaluation_without_eval_every_runs_at_the_end_only(tmp_path):
    steps = []
    make_trainer(tmp_path, steps=5, evaluate=lambda m: steps.append(1) or {"acc1": 1.0})[0].run()
    assert steps == [1] and [r["step"] for r in read_metrics(tmp_path) if "acc1" in r] == [5]


def test_too_few_videos_for_one_step_is_a_usage_error(tmp_path):
    small = torch.utils.data.Subset(Toy(), range(3))
    with pytest.raises(UsageError) as e:
        make_trainer(tmp_path, dataset=small)
    assert str(e.value) == ("the dataset has 3 videos, fewer than one optimizer step needs "
                            "(4 = batch x world x accumulation)")


def test_auto_resume_refuses_a_sharded_checkpoint_of_another_layout(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "checkpoint-latest.txt").write_text("checkpoint-step2.dcp\n")
    with pytest.raises(UsageError) as e:
        make_trainer(tmp_path, steps=2, resume="auto")[0].run()
    assert str(e.value) == (f"--resume auto: {tmp_path} holds a sharded (FSDP) checkpoint (checkpoint-latest.txt); "
                            "resume it with --dist fsdp")


def test_a_restarted_group_resumes_by_itself(tmp_path, capsys):
    with pytest.raises(Crash):
        make_trainer(tmp_path, steps=4, save_every=2, log_every=2, on_step=crash_at(3))[0].run()
    res = make_trainer(tmp_path, steps=4, save_every=2, log_every=2, restart=1)[0].run()
    assert res["step"] == 4
    assert f"resumed {tmp_path / CHECKPOINT} at step 2 (torchrun restart 1)" in capsys.readouterr().out.splitlines()


def test_a_failing_checkpoint_write_stops_naming_what_is_kept(tmp_path, monkeypatch):
    from train.checkpointing import Checkpointer
    from train.errors import CheckpointWriteFailed

    write = Checkpointer.write_pending

    def fail_at_4(self, model, opt, extra):
        if extra["step"] == 4:
            raise CheckpointWriteFailed("no space left")
        return write(self, model, opt, extra)

    monkeypatch.setattr(Checkpointer, "write_pending", fail_at_4)
    with pytest.raises(CheckpointWriteFailed) as e:
        make_trainer(tmp_path, steps=6, save_every=2)[0].run()
    assert str(e.value) == (f"no space left; the last committed checkpoint, {tmp_path / CHECKPOINT} (step 2), is "
                            "kept; resume with: vmae-pretrain --resume auto")
    stopped = [r for r in read_metrics(tmp_path) if r.get("event") == "stopped"]
    assert [(r["step"], r["reason"]) for r in stopped] == [(4, "no space left")]


def test_a_failing_first_commit_says_none_was_kept(tmp_path, monkeypatch):
    from train.checkpointing import Checkpointer
    from train.errors import CheckpointWriteFailed

    def fail(self):
        raise CheckpointWriteFailed("rename failed")

    monkeypatch.setattr(Checkpointer, "commit", fail)
    with pytest.raises(CheckpointWriteFailed) as e:
        make_trainer(tmp_path, steps=6, save_every=2)[0].run()
    assert str(e.value) == "rename failed; no checkpoint of this run was committed before it"


def test_the_save_clock_writes_checkpoints_between_the_save_steps(tmp_path, monkeypatch):
    import train.signals
    from train.checkpointing import Checkpointer

    mono = Clock()
    monkeypatch.setattr(train.signals, "time", types.SimpleNamespace(monotonic=lambda: mono.now))
    written, write = [], Checkpointer.write_pending

    def record(self, model, opt, extra):
        written.append(extra["step"])
        return write(self, model, opt, extra)

    monkeypatch.setattr(Checkpointer, "write_pending", record)

    class Minute(Recorder):
        def loss(self, model, batch):
            mono.now += 20.0  # 40 s a step: a minute has passed at every second step
            return super().loss(model, batch)

    make_trainer(tmp_path, Minute(), steps=7, save_every=100, save_every_minutes=1.0)[0].run()
    assert written == [2, 4, 6, 7]


def test_a_second_signal_stops_at_once_naming_the_command(tmp_path, capfd, monkeypatch):
    import os
    import signal

    import train.signals

    mono = Clock()
    monkeypatch.setattr(train.signals, "time", types.SimpleNamespace(monotonic=lambda: mono.now))

    def on_step(done, loss):
        if done == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            mono.now += 60.0  # not a repeated delivery of the same one
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as e:
        make_trainer(tmp_path, steps=4, on_step=on_step)[0].run()
    assert e.value.code == 128 + signal.SIGTERM
    assert capfd.readouterr().err == ("vmae-pretrain: stopped: a second SIGTERM: stopping now, without a checkpoint; "
                                      "the last committed one is kept\n")


def test_a_resumed_run_names_its_checkpoint_as_the_last_safe_one(tmp_path):
    with pytest.raises(Crash):
        make_trainer(tmp_path, steps=6, save_every=2, on_step=crash_at(3))[0].run()
    trainer, _ = make_trainer(tmp_path, Recorder(nan_at_call=1), steps=6, resume="auto", log_every=1)
    with pytest.raises(loop.NonFiniteLoss) as e:
        trainer.run()
    assert str(e.value).startswith(f"the loss became nan at step 3. The last safe checkpoint is {tmp_path / CHECKPOINT} "
                                   "(step 2); ")


def test_the_progress_bar_and_tensorboard_follow_their_options(tmp_path, capfd):
    make_trainer(tmp_path / "quiet", steps=3)[0].run()
    assert capfd.readouterr().err == ""  # --no-progress: no bar
    make_trainer(tmp_path / "bar", steps=3, no_progress=False, tensorboard=True)[0].run()
    err = capfd.readouterr().err
    assert "3/3" in err and "0/3" in err  # from step 0 to the plan's total
    assert any((tmp_path / "bar" / "tb").iterdir()) and not (tmp_path / "quiet" / "tb").exists()


def test_layer_decay_and_weight_decay_reach_the_optimizer_groups(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Linear(FEATURES, 1)  # layer 0 of the layer-wise lr decay

        def forward(self, x):
            return self.patch_embed(x)

        def official_state_dict(self):
            return self.state_dict()

    def loss(model, batch):
        return ((model(features(batch["video"]).float()).squeeze(1) - batch["label"].float()) ** 2).mean()

    seen = []
    task = loop.Task(name="finetune", model=Net(), model_config={"arch": "toy", "depth": 2}, loss=loss,
                     dataset=Toy(), layer_decay=0.5)
    trainer = loop.Trainer(config(tmp_path, task="finetune", steps=3, weight_decay=0.05), Dist(), task)
    trainer.opt.register_step_pre_hook(
        lambda opt, a, k: seen.append(sorted((g["weight_decay"], g["lr"]) for g in opt.param_groups)))
    trainer.run()
    # depth 2: layer 0's lr scale is 0.5 ** 3; the bias has no weight decay
    assert seen == [[(0.0, trainer.plan.lr_at(k) * 0.125), (0.05, trainer.plan.lr_at(k) * 0.125)] for k in range(3)]
    assert (tmp_path / "finetune_official.pth").is_file()


def test_evaluation_only_of_a_weights_file_names_it(tmp_path, capsys):
    # --eval --finetune W: no checkpoint, the model holds W's weights (the task loaded them)
    res = make_trainer(tmp_path, evaluate=lambda m: {"acc1": 1.0}, eval_only=True, start_weights="w.pth",
                       steps=None)[0].run()
    assert res == {"step": 0, "eval": {"acc1": 1.0}}
    assert "pretrain eval of w.pth: acc1 1.00" in capsys.readouterr().out.splitlines()
    assert read_metrics(tmp_path)[0]["weights"] == "w.pth"


def test_a_signal_when_no_checkpoint_could_be_kept(tmp_path):
    import os
    import signal

    class Jump(Recorder):
        def loss(self, model, batch):
            out = super().loss(model, batch)
            return out * 1000 if self.calls > 2 else out  # step 2 on: 1000 x step 1's loss

    def on_step(done, loss):
        if done == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer, _ = make_trainer(tmp_path, Jump(), steps=6, save_every=100, on_step=on_step)
    with pytest.raises(loop.StoppedBySignal) as e, pytest.warns(UserWarning, match="no checkpoint written at step 2"):
        trainer.run()
    assert str(e.value) == "SIGTERM at step 2: no checkpoint (none could be kept); resume with: vmae-pretrain --resume auto"


def test_a_single_file_is_refused_by_a_sharded_run(tmp_path):
    # FSDP needs torchrun's process group; the check before it reads only the path and the engine
    fsdp = types.SimpleNamespace(d=Dist(fsdp=True), task=types.SimpleNamespace(name="pretrain"))
    path = _checkpoint(tmp_path)
    with pytest.raises(UsageError) as e:
        loop.Trainer._read_checkpoint(fsdp, path)
    assert str(e.value) == f"--resume {path}: a single file; this run is --dist fsdp under torchrun"


def test_a_finetune_run_refusing_a_file_points_at_finetune(tmp_path):
    path = _checkpoint(tmp_path)
    _edit(path, config=None)
    with pytest.raises(UsageError) as e:
        make_trainer(tmp_path / "new", steps=4, resume=str(path), name="finetune")[0].run()
    assert str(e.value) == (f"--resume {path}: not a checkpoint written by train.finetune (to start from a weights "
                            "file use --finetune)")


def test_a_checkpoint_without_format_and_task_keys_resumes(tmp_path):
    path = _checkpoint(tmp_path)  # 2 steps
    _edit(path, format=None, task=None)  # as the first checkpoints were written
    res = make_trainer(tmp_path / "run", steps=2, save_every=2, resume="auto")[0].run()
    assert res["step"] == 2 and res["checkpoint"] == path


def test_evaluation_ignores_the_dropout_rates_training_refuses(tmp_path):
    path = _checkpoint(tmp_path)
    _edit(path, config={"arch": "toy", "depth": 1, "drop_path_rate": 0.3, "head_drop_rate": 0.5})
    with pytest.raises(UsageError) as e:
        make_trainer(tmp_path / "train", steps=4, resume=str(path))[0].run()
    assert "(drop_path_rate 0.3 -> None; head_drop_rate 0.5 -> None)" in str(e.value)
    res = make_trainer(tmp_path / "eval", evaluate=lambda m: {"acc1": 2.0}, eval_only=True, resume=str(path),
                       steps=None)[0].run()
    assert res == {"step": 0, "eval": {"acc1": 2.0}}


class Piece:
    """A task's own piece of the state set (the EMA weights of fine-tuning)."""

    def __init__(self, value=0):
        self.value, self.loaded = value, None

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.loaded = state


def test_the_tasks_piece_is_saved_and_restored_for_training_and_evaluation(tmp_path):
    with_piece, without = tmp_path / "with", tmp_path / "without"
    make_trainer(with_piece, steps=2, save_every=2, state=Piece(7))[0].run()
    make_trainer(without, steps=2, save_every=2)[0].run()
    assert torch.load(with_piece / CHECKPOINT, weights_only=True)["state"]["task"] == {"value": 7}
    evaluate = lambda m: {"acc1": 1.0}  # noqa: E731
    for ck, piece, want in ((with_piece, Piece(), {"value": 7}), (without, Piece(), None)):
        make_trainer(tmp_path / "e", evaluate=evaluate, eval_only=True, resume=str(ck / CHECKPOINT), steps=None,
                     state=piece)[0].run()
        assert piece.loaded == want
    # a task without a piece evaluates a checkpoint that has one
    assert make_trainer(tmp_path / "e2", evaluate=evaluate, eval_only=True, resume=str(with_piece / CHECKPOINT),
                        steps=None)[0].run()["eval"] == {"acc1": 1.0}
    piece = Piece()
    with pytest.warns(UserWarning, match="schedule changed"):
        make_trainer(with_piece, steps=3, save_every=3, resume="auto", state=piece)[0].run()
    assert piece.loaded == {"value": 7}


def test_a_signal_at_the_last_step_ends_the_run_normally(tmp_path):
    import os
    import signal

    def on_step(done, loss):
        if done == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    res = make_trainer(tmp_path, steps=4, save_every=100, on_step=on_step)[0].run()
    assert res["step"] == 4 and res["checkpoint"] == tmp_path / CHECKPOINT
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 4
    assert not [r for r in read_metrics(tmp_path) if r.get("event") == "stopped"]


def test_the_output_folder_is_made_with_its_parents(tmp_path):
    out = tmp_path / "runs" / "toy"
    assert make_trainer(out, steps=1, save_every=1)[0].run()["checkpoint"] == out / CHECKPOINT


def test_auto_resume_of_a_sharded_run_refuses_a_single_file(tmp_path):
    # FSDP needs torchrun's process group; the check reads only the folder and the engine
    from train.checkpointing import Checkpointer

    d = Dist(fsdp=True)
    (tmp_path / CHECKPOINT).write_bytes(b"")
    fsdp = types.SimpleNamespace(cfg=config(tmp_path, resume="auto"), ck=Checkpointer(str(tmp_path), d), d=d)
    with pytest.raises(UsageError) as e:
        loop.Trainer._find_checkpoint(fsdp)
    assert str(e.value) == (f"--resume auto: {tmp_path} holds a single-file checkpoint ({CHECKPOINT}); resume it "
                            "without --dist fsdp")


def test_a_checkpoint_of_another_world_size_reseeds_from_seed_rank_and_step(tmp_path):
    path = _checkpoint(tmp_path)  # seed 3, step 2, one rank's streams
    ck = torch.load(path, weights_only=True)
    ck["state"]["rng"]["ranks"] *= 2  # as if written by 2 ranks
    torch.save(ck, path)
    draws = []

    class Draw(Recorder):
        def loss(self, model, batch):
            if not draws:
                draws.append(torch.rand(3))
            return super().loss(model, batch)

    with pytest.warns(UserWarning) as w:
        make_trainer(tmp_path / "new", Draw(), steps=3, resume=str(path))[0].run()
    assert any("holds the RNG states of 2 ranks, this run has 1" in str(x.message) for x in w)
    assert torch.equal(draws[0], torch.rand(3, generator=torch.Generator().manual_seed(3 + 0 + 2)))


def test_the_sample_log_is_one_per_batches_call_and_closed_once(tmp_path):
    """Both sources keep --log-samples' file in one place (data_source._LoggedSource): a second
    batches() closes the first log, close() may be called twice, no log_dir opens nothing."""
    from types import SimpleNamespace

    from train.data_source import ShardSource

    cfg = SimpleNamespace(batch_size=2, accum_steps=2, seed=3, num_workers=0)
    d = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"))
    src = ListSource(Toy(), 3, log_dir=str(tmp_path))
    src.batches(cfg, d, 0, 5)
    first = src.log
    src.batches(cfg, d, 0, 5)
    assert first.f.closed and not src.log.f.closed
    second = src.log
    src.close()
    src.close()
    assert second.f.closed and src.log is None
    quiet = ListSource(Toy(), 3)
    quiet.batches(cfg, d, 0, 5)
    assert quiet.log is None and ShardSource.close is ListSource.close
