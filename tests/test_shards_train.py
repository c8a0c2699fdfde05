"""Training from shards: --shards and --log-samples in the loops, and under torchrun (gloo, 2 ranks
x 2 loader workers) every sample exactly once an epoch, and a resume mid-epoch that visits
exactly the samples the epoch had left, in the order of an uninterrupted run."""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("av", reason="PyAV writes the synthetic videos")
pytest.importorskip("webdataset", reason="the shards extra: pip install webdataset")

from train import finetune, pretrain, write_shards  # noqa: E402
from train.cli import UsageError  # noqa: E402
from train.make_synthetic import make_dataset  # noqa: E402
from vmae_fast.video import shards as fmt  # noqa: E402

from run_helpers import finish, start_group  # noqa: E402
from test_train_loop import TINY, TINY_CLF  # noqa: E402

N = 11  # samples: does not divide by 2 ranks (DistributedSampler-style padding of one)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    make_dataset(root, n=16, frames=12, height=32, width=40, seed=0)
    lines = (root / "pretrain.txt").read_text().splitlines()[:N]
    assert len(lines) == N
    (root / "pre11.txt").write_text("".join(f"{ln}\n" for ln in lines))
    out = root / "shards"
    assert write_shards.main(["--data-list", str(root / "pre11.txt"), "--data-root", str(root), "--kind",
                              "pretrain", "--out", str(out), "--samples-per-shard", "3", "--workers", "1",
                              "--no-progress"]) == 0
    return root, out


def args_for(shards, out, *extra):
    return ["--shards", str(shards), "--output-dir", str(out), *TINY, "--no-progress", "--batch-size", "1",
            "--num-sample", "1", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1", "--log-samples",
            *extra]


def sample_lines(out, world):
    return [[json.loads(ln) for ln in (Path(out) / f"samples-rank{r}.jsonl").read_text().splitlines()]
            for r in range(world)]


def test_one_of_list_or_shards(data, tmp_path):
    root, shards = data
    with pytest.raises(UsageError, match="--data-list LIST or --shards SPEC"):
        pretrain.parse_args(["--output-dir", str(tmp_path), *TINY])
    with pytest.raises(UsageError, match="--data-list LIST or --shards SPEC"):
        pretrain.parse_args(["--output-dir", str(tmp_path), "--data-list", str(root / "pre11.txt"), "--shards",
                             str(shards), *TINY])
    with pytest.raises(UsageError, match="--train-list LIST or --shards SPEC"):
        finetune.parse_args(["--output-dir", str(tmp_path), "--num-classes", "4", *TINY_CLF])
    (tmp_path / "s").mkdir()
    for f in shards.iterdir():
        if f.name != "shard-000002.tar":
            (tmp_path / "s" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UsageError, match=r"shard .*shard-000002.tar is missing$"):
        pretrain.main(args_for(tmp_path / "s", tmp_path / "o", "--steps", "2", "--num-workers", "0"))
    assert not (tmp_path / "o").exists()


def test_single_process_epochs_cover_every_sample_and_list_runs_log_the_same_keys(data, tmp_path):
    root, shards = data
    pretrain.main(args_for(shards, tmp_path / "a", "--steps", "11", "--num-workers", "2"))
    (lines,) = sample_lines(tmp_path / "a", 1)
    keys = [k for ln in lines for k in ln["keys"]]
    assert Counter(keys) == Counter(fmt.sample_key(i) for i in range(N))  # one epoch: 11 steps of 1
    assert {ln["epoch"] for ln in lines} == {0} and [ln["step"] for ln in lines] == list(range(1, 12))
    # a list run logs its list lines the same way
    pretrain.main(["--data-list", str(root / "pre11.txt"), "--data-root", str(root), *args_for(shards, tmp_path / "b",
                   "--steps", "2", "--num-workers", "0")[2:]])
    (lines,) = sample_lines(tmp_path / "b", 1)
    assert [ln["step"] for ln in lines] == [1, 2] and all(len(ln["keys"]) == 1 for ln in lines)


@pytest.mark.slow
def test_torchrun_two_ranks_two_workers_every_sample_once_and_an_exact_resume(data, tmp_path):
    root, shards = data
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # ceil(11 / 2) = 6 samples a rank an epoch, 3 a worker: 12 steps of 1 sample are 2 epochs
    runs = {"whole": ["--steps", "12"], "part": ["--steps", "5"], "rest": ["--steps", "12", "--resume", "auto"]}
    for name, extra in runs.items():
        out = tmp_path / ("whole" if name == "whole" else "cut")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "train.pretrain", *args_for(shards, out, "--num-workers", "2", "--save-every", "5", *extra)]
        rc, output = finish(start_group(cmd, env), timeout=300)
        assert rc == 0, output[-6000:]
    whole, cut = sample_lines(tmp_path / "whole", 2), sample_lines(tmp_path / "cut", 2)
    lay = {e: fmt.EpochLayout(fmt.resolve(str(shards)).counts, 2, seed=0, epoch=e) for e in (0, 1)}
    for e in (0, 1):
        keys = [k for rank in whole for ln in rank if ln["epoch"] == e for k in ln["keys"]]
        pad = fmt.sample_key(_first_index(shards, lay[e]))  # the padding repeats the epoch's first sample
        assert Counter(keys) == Counter([fmt.sample_key(i) for i in range(N)] + [pad]), e
    # stopped after step 5 (mid-epoch, worker 1's turn next) and resumed: the same lines
    assert cut == whole
    ck = torch.load(tmp_path / "cut" / "checkpoint-last.pt", weights_only=True)
    assert [s["world"] for s in ck["state"]["data"]["shards"]] == [2, 2]


def _first_index(shards, layout) -> int:
    """The list index of the first sample of the epoch's shard order (what the padding repeats)."""
    ss = fmt.resolve(str(shards))
    (sample,) = list(fmt.read_piece(ss.urls[layout.order[0]], 0, 1))
    return fmt.meta_of(sample)["index"]


def test_finetune_trains_from_shards_and_evaluates_the_list(data, tmp_path):
    root, _ = data
    out = tmp_path / "ftshards"
    assert write_shards.main(["--data-list", str(root / "train.txt"), "--data-root", str(root), "--kind", "finetune",
                              "--out", str(out), "--samples-per-shard", "4", "--workers", "1", "--no-progress"]) == 0
    res = finetune.main(["--shards", str(out), "--val-list", str(root / "val.txt"), "--data-root", str(root),
                         "--num-classes", "4", "--output-dir", str(tmp_path / "ft"), *TINY_CLF, "--no-progress",
                         "--num-workers", "0", "--batch-size", "2", "--num-sample", "1", "--steps", "2",
                         "--warmup-steps", "1", "--lr", "1e-3", "--test-num-segment", "1", "--test-num-crop", "1",
                         "--log-samples"])
    assert res["step"] == 2 and res["skipped"] == 0 and res["eval"]["acc1"] >= 0
    (lines,) = sample_lines(tmp_path / "ft", 1)
    assert [ln["step"] for ln in lines] == [1, 2] and all(len(ln["keys"]) == 2 for ln in lines)
