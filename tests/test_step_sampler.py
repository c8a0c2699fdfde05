"""The training sampler (``train.data.StepSampler``, docs/semantics.md §9): each epoch a
permutation seeded by ``seed + epoch`` cut into global micro-batches, rank ``r`` taking slice
``r`` of each; every sample of an epoch at most once; the union over ranks is a single process's
batch; a resume at any step replays the tail of an uninterrupted run."""
from __future__ import annotations

import itertools

import pytest
import torch

from train.data import StepSampler

# 50 videos, 2 a rank, 3 ranks: global micro-batches of 6, 8 of them an epoch (2 videos left
# over), 4 optimizer steps of 2 micro-batches each.
N, PER_RANK, WORLD, ACCUM, SEED = 50, 2, 3, 2, 7


def items(rank=0, world=WORLD, per_rank=PER_RANK, start=0, total=10, accum=ACCUM, n=N, seed=SEED, shuffle=True):
    return list(StepSampler(n, per_rank, accum, world, rank, seed, start, total, shuffle=shuffle))


def micro_batches(seq, size):
    return [seq[k:k + size] for k in range(0, len(seq), size)]


def test_geometry_and_position():
    s = StepSampler(N, PER_RANK, ACCUM, WORLD, 1, SEED, 0, 10)
    assert (s.global_micro, s.micro_per_epoch, s.steps_per_epoch) == (6, 8, 4)
    # step -> (epoch, first micro-batch of the step in its epoch)
    assert [s.position(k) for k in range(10)] == [(0, 0), (0, 2), (0, 4), (0, 6), (1, 0), (1, 2), (1, 4), (1, 6),
                                                  (2, 0), (2, 2)]
    assert len(s) == 10 * ACCUM * PER_RANK == len(items(rank=1))
    assert len(StepSampler(N, PER_RANK, ACCUM, WORLD, 0, SEED, 7, 10)) == 3 * ACCUM * PER_RANK
    assert len(StepSampler(N, PER_RANK, ACCUM, WORLD, 0, SEED, 12, 10)) == 0  # resumed past the end
    assert items(start=12) == [] and items(start=10) == []  # resumed at or past the end: nothing


def test_epoch_is_the_documented_permutation_cut_per_rank():
    # epoch e: torch.randperm(n) from a generator seeded with seed + e; rank r takes items
    # [m * 6 + 2 r, m * 6 + 2 r + 2) of micro-batch m; the 2 left over at the end are not used
    for rank in range(WORLD):
        got = items(rank=rank, total=8)
        want = []
        for epoch in (0, 1):
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
            for m in range(8):
                want += [(epoch, i) for i in perm[m * 6 + 2 * rank:m * 6 + 2 * rank + 2]]
        assert got == want
    assert items(total=8)[:4] != items(total=8, seed=SEED + 1)[:4]


def test_every_sample_at_most_once_an_epoch_and_ranks_partition_a_single_process():
    per = [items(rank=r, total=12) for r in range(WORLD)]
    single = items(world=1, per_rank=PER_RANK * WORLD, total=12)
    # the union over ranks of each micro-batch is the single process's micro-batch of 6
    joined = [x for ms in zip(*(micro_batches(p, PER_RANK) for p in per)) for m in ms for x in m]
    assert joined == single
    for epoch in range(3):
        seen = [i for e, i in single if e == epoch]
        assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(N))
    assert [e for e, _ in single] == [k // 48 for k in range(len(single))]


@pytest.mark.parametrize("start", range(10))
def test_a_resume_at_any_step_replays_the_tail(start):
    for rank in (0, 2):
        full = items(rank=rank, total=10)
        assert items(rank=rank, start=start, total=10) == full[start * ACCUM * PER_RANK:]


def test_the_run_ends_at_total_steps_mid_epoch():
    got = items(total=5)  # 1 step into epoch 1
    assert len(got) == 5 * ACCUM * PER_RANK
    assert [e for e, _ in got] == [0] * 16 + [1] * 4


def test_without_shuffle_the_order_is_the_list_order():
    got = items(rank=1, total=4, shuffle=False)
    assert got == [(0, i) for m in range(8) for i in (m * 6 + 2, m * 6 + 3)]
    assert items(rank=1, total=8, shuffle=False)[16:] == [(1, i) for _, i in got]


def test_accumulation_is_counted_in_micro_batches():
    # accumulation 3: 8 micro-batches an epoch make 2 steps (the last 2 micro-batches unused)
    s = StepSampler(N, PER_RANK, 3, WORLD, 0, SEED, 0, 3)
    assert s.steps_per_epoch == 2 and [s.position(k) for k in range(3)] == [(0, 0), (0, 3), (1, 0)]
    got = list(s)
    perm0 = torch.randperm(N, generator=torch.Generator().manual_seed(SEED)).tolist()
    perm1 = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + 1)).tolist()
    want = [(0, i) for m in range(6) for i in perm0[m * 6:m * 6 + 2]]
    want += [(1, i) for m in range(3) for i in perm1[m * 6:m * 6 + 2]]
    assert got == want and len(s) == len(got)


def test_one_step_an_epoch_is_enough_and_fewer_is_refused():
    s = StepSampler(12, 2, 2, 3, 0, 0, 0, 3)  # exactly 2 micro-batches of 6: one step an epoch
    assert s.steps_per_epoch == 1 and [e for e, _ in s] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError) as e:
        StepSampler(11, 2, 2, 3, 0, 0, 0, 3)
    assert str(e.value) == ("the dataset has 11 videos, fewer than one optimizer step needs "
                            "(12 = batch x world x accumulation)")


def test_the_defaults_shuffle():
    s = StepSampler(N, 1, 1, 1, 0, SEED, 0, 1)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(SEED)).tolist()
    assert [i for _, i in itertools.islice(iter(s), 5)] == perm[:1]
