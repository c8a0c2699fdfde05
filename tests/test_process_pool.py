"""train/process_pool.py: results in order over spawned workers, a job that kills its worker named
exactly and run once more, and stopping that kills the workers wherever they are."""
from __future__ import annotations

import os
import time

import pytest

import crashing_job
from train.process_pool import ordered_results


def _runs(log):
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("consumer_s", [0.0, 0.3])  # a slow caller: the crash comes while it is away
def test_a_job_that_kills_its_worker_twice_is_died_and_the_others_complete_in_order(tmp_path, consumer_s):
    log = tmp_path / "ran.txt"
    acts = {2: "crash", 5: "crash", 6: "raise"}
    jobs = [(i, acts.get(i, "ok"), str(log)) for i in range(9)]
    got = []
    for r in ordered_results(crashing_job.run, jobs, 2, crashing_job.died):
        got.append(r)
        time.sleep(consumer_s)
    assert got == [(i, "died") if i in acts else (i, "ok") for i in range(9)]
    runs = _runs(log)
    for i in range(9):  # the killers ran twice, in two processes; the others once
        pids = [p for j, p in runs if j == i]
        assert len(pids) == (2 if i in acts else 1) and len(set(pids)) == len(pids), (i, runs)
    assert not any(_alive(p) for _, p in runs)


def test_more_workers_than_jobs_and_no_jobs(tmp_path):
    log = tmp_path / "ran.txt"
    jobs = [(i, "ok", str(log)) for i in range(3)]
    assert list(ordered_results(crashing_job.run, jobs, 8, crashing_job.died)) == [(i, "ok") for i in range(3)]
    assert len({p for _, p in _runs(log)}) <= 3  # a worker is started only for a job
    assert list(ordered_results(crashing_job.run, [], 2, crashing_job.died)) == []


def test_closing_early_kills_the_workers_at_once(tmp_path):
    log = tmp_path / "ran.txt"
    jobs = [(0, "ok", str(log))] + [(i, "sleep", str(log)) for i in range(1, 6)]
    it = ordered_results(crashing_job.run, jobs, 2, crashing_job.died)
    assert next(it) == (0, "ok")
    deadline = time.monotonic() + 60
    while len(_runs(log)) < 3 and time.monotonic() < deadline:  # both workers inside a 60 s job
        time.sleep(0.05)
    t = time.monotonic()
    it.close()
    assert time.monotonic() - t < 10
    runs = _runs(log)
    assert len(runs) == 3 and not any(_alive(p) for _, p in runs)
