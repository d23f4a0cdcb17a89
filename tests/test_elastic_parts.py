"""Resume on another layout, in isolation: the sampler arithmetic, the schedule clock, the resume plan.

Pure functions on small lists (fast); the real multi-process resumes are in
``tests/test_elastic_resume.py``.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from itertools import product

import pytest
import torch
from torch.utils.data import DistributedSampler

from distdet.training.checkpoints import STATE_NAME, TrainerState
from distdet.training.config import TrainConfig
from distdet.training.elastic import ResumeContext, continue_on_layout, layout_fields
from distdet.training.optim import ScheduleClock, build_scheduler, lr_factor_fn, rebase_scheduler, schedule_factor_fn
from distdet.training.sampling import (
    BatchLayout, EpochBatchSampler, TrainedStretch, aspect_ratio_groups, epoch_order, rank_batches, remaining_after,
    remaining_samples, shard, trained_samples,
)


@pytest.mark.parametrize("size, world", [(9, 2), (10, 3), (1, 3), (2, 5), (25, 4), (7, 1)])
def test_shard_and_epoch_order_are_distributed_samplers(size, world):
    for epoch, rank in product(range(2), range(world)):
        reference = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=3)
        reference.set_epoch(epoch)
        assert shard(epoch_order(size, 3, epoch), world, rank) == list(reference)
    order = [40, 41, 42, 43, 44][:size]  # any list, not only range(n): what a resumed epoch shards
    unshuffled = DistributedSampler(order, num_replicas=world, rank=world - 1, shuffle=False)
    assert shard(order, world, world - 1) == [order[i] for i in unshuffled]


def _epoch_counts(size: int, stretches: list[TrainedStretch], last: BatchLayout, seed: int = 0) -> Counter:
    """How often each index is trained: the stretches, then ``last`` to the end of the epoch."""
    order = epoch_order(size, seed, 1)
    trained, remaining = [], order
    for stretch in stretches:
        step = trained_samples(remaining, stretch.layout, stretch.steps)
        trained += step
        remaining = remaining_samples(remaining, step)
    rest = [i for r in range(last.world_size) for b in rank_batches(remaining, last, r) for i in b]
    return Counter(trained + rest)


@pytest.mark.parametrize("old, steps, new", [
    (BatchLayout(2, 3), 1, BatchLayout(3, 2)),                       # 2 -> 3, batch size changed
    (BatchLayout(3, 1, grad_accum_steps=2), 1, BatchLayout(1, 2, 2)),  # 3 -> 1 with accumulation
    (BatchLayout(1, 2), 3, BatchLayout(2, 2)),                        # 1 -> 2
    (BatchLayout(2, 2, 3), 1, BatchLayout(4, 1)),
])
def test_without_padding_every_sample_once_across_the_change(old, steps, new):
    counts = _epoch_counts(12, [TrainedStretch(old, steps)], new)
    assert counts == Counter(range(12))


@pytest.mark.parametrize("size", [9, 11, 13])
def test_any_change_trains_every_sample_and_repeats_only_padding(size):
    layouts = [BatchLayout(w, b, a) for w, b, a in product((1, 2, 3), (1, 2, 3), (1, 2))]
    for old, new in product(layouts, layouts):
        steps_in_epoch = math.ceil(len(rank_batches(epoch_order(size, 0, 1), old, 0)) / old.grad_accum_steps)
        for steps in range(steps_in_epoch + 1):
            counts = _epoch_counts(size, [TrainedStretch(old, steps)], new)
            assert set(counts) == set(range(size)), (old, steps, new)
            # each stretch's even split repeats at most world_size - 1 samples
            assert sum(counts.values()) - size <= (old.world_size - 1) + (new.world_size - 1), (old, steps, new)


def test_several_changes_in_one_epoch_chain():
    stretches = [TrainedStretch(BatchLayout(2, 1), 2), TrainedStretch(BatchLayout(3, 1, 2), 1)]
    assert _epoch_counts(16, stretches, BatchLayout(1, 4)) == Counter(range(16))  # 4 + 6 + 6
    assert sorted(remaining_after(epoch_order(16, 0, 1), stretches)) == sorted(
        set(range(16)) - set(trained_samples(epoch_order(16, 0, 1), BatchLayout(2, 1), 2))
        - set(trained_samples(remaining_after(epoch_order(16, 0, 1), stretches[:1]), BatchLayout(3, 1, 2), 1)))


def test_remaining_is_a_multiset_difference_so_an_expanded_epoch_list_fits():
    expanded = [5, 0, 2, 0, 2, 2, 1]  # e.g. repeat factors: 0 twice, 2 three times
    assert remaining_samples(expanded, [2, 0, 2, 9]) == [5, 0, 2, 1]  # 9: a padding repeat, ignored
    assert remaining_samples(expanded, []) == expanded


def test_grouped_layouts_train_every_sample():
    ratios = [0.4, 2.0, 1.3, 0.7, 1.0, 0.5] * 3
    old = BatchLayout(2, 2, group_ids=tuple(aspect_ratio_groups(ratios, 1)))
    new = BatchLayout(3, 2, group_ids=tuple(aspect_ratio_groups(ratios, 0)))
    counts = _epoch_counts(len(ratios), [TrainedStretch(old, 2)], new)
    assert set(counts) == set(range(len(ratios)))


def test_sampler_shards_what_the_stretches_left_only_in_that_epoch():
    stretch = TrainedStretch(BatchLayout(2, 3), 1)
    samplers = [EpochBatchSampler(12, 2, 3, r, seed=7) for r in range(3)]
    for sampler in samplers:
        sampler.set_epoch(1)
        sampler.set_trained(1, 7, [stretch])
    resumed = [i for s in samplers for b in s.epoch_batches() for i in b]
    assert Counter(resumed + trained_samples(epoch_order(12, 7, 1), stretch.layout, 1)) == Counter(range(12))
    assert len({len(s.epoch_batches()) for s in samplers}) == 1
    fresh = EpochBatchSampler(12, 2, 3, 0, seed=7)
    for epoch in (0, 2):
        samplers[0].set_epoch(epoch)
        fresh.set_epoch(epoch)
        assert samplers[0].epoch_batches() == fresh.epoch_batches()


def test_clock_without_a_change_gives_the_plain_step_schedule():
    cfg = TrainConfig(epochs=3, warmup_steps=-1, lr_milestones=[2])
    plain, clocked = lr_factor_fn(cfg, 10), schedule_factor_fn(cfg, ScheduleClock(10, 10))
    assert all(plain(step) == clocked(step) for step in range(40))
    assert ScheduleClock(10, 10).position(7) == 7


@pytest.mark.parametrize("schedule", ["multistep", "cosine"])
@pytest.mark.parametrize("old_spe, new_spe", [(10, 4), (4, 10), (6, 6)])
def test_schedule_continues_by_epochs_across_a_change(schedule, old_spe, new_spe):
    cfg = TrainConfig(epochs=4, warmup_steps=8, lr_schedule=schedule, lr_milestones=[2, 3])
    old = ScheduleClock.fresh(old_spe)
    before = schedule_factor_fn(cfg, old)
    for change_at in (3, old_spe + 1, 2 * old_spe + 1):
        epoch = change_at // old_spe
        steps_left = math.ceil((epoch + 1 - change_at / old_spe) * new_spe)  # rounded up: a short last step
        new = old.rebased(change_at, epoch, steps_left, new_spe)
        after = schedule_factor_fn(cfg, new)
        assert after(change_at) == pytest.approx(before(change_at), rel=1e-9)
        assert new.epochs(change_at + steps_left) == epoch + 1  # the next epoch starts on a whole number
        # from there on the factor is the old schedule's at the same progress in epochs
        for later in range(3 * new_spe):
            epochs = new.epochs(change_at + steps_left + later)
            assert epochs == pytest.approx(epoch + 1 + later / new_spe)
            if float(epochs * old_spe).is_integer():
                assert after(change_at + steps_left + later) == pytest.approx(before(int(epochs * old_spe)), rel=1e-9)
        # and in between it moves monotonically from the one to the other
        inside = [new.epochs(change_at + k) for k in range(steps_left + 1)]
        assert inside == sorted(inside) and inside[0] == pytest.approx(change_at / old_spe)


def _sgd_scheduler(lr: float, cfg: TrainConfig, spe: int) -> torch.optim.lr_scheduler.LambdaLR:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    return build_scheduler(optimizer, cfg, spe)


def test_rebased_scheduler_applies_the_new_base_rate_and_keeps_stepping():
    cfg = TrainConfig(epochs=4, warmup_steps=0, lr_schedule="cosine")
    scheduler = _sgd_scheduler(0.02, cfg, 8)
    for _ in range(5):
        scheduler.optimizer.step()
        scheduler.step()
    factor_before = scheduler.get_last_lr()[0] / 0.02
    rebase_scheduler(scheduler, cfg, ScheduleClock.fresh(8).rebased(5, 0, 2, 3), base_lr=0.03)
    group = scheduler.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.03 * factor_before) and group["initial_lr"] == 0.03
    scheduler.optimizer.step()
    scheduler.step()
    # 3 of 8 steps of epoch 0 were left, taken in 2 steps: one of them brings progress to 5/8 + 3/16
    assert scheduler.get_last_lr()[0] == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * (5 / 8 + 3 / 16) / 4)))


def _resume(saved: TrainerState, cfg: TrainConfig, world: int, rank: int, size: int = 12):
    """continue_on_layout on real sampler and scheduler objects, for rank ``rank`` of ``world``."""
    sampler = EpochBatchSampler(size, cfg.batch_size, world, rank, cfg.seed)
    spe = math.ceil(len(sampler.epoch_batches()) / cfg.grad_accum_steps)
    scheduler = _sgd_scheduler(0.01, cfg, spe)
    scheduler.last_epoch = saved.updates  # what load_state restores
    current = TrainerState(**layout_fields(cfg, world), schedule=ScheduleClock.fresh(spe).to_json())
    context = ResumeContext(cfg, sampler, scheduler, 0.01 * world, [1.0] * size)
    state, change = continue_on_layout(saved, current, "ckpt", context)
    return state, change, sampler, scheduler


def test_resume_plan_from_two_processes_to_three():
    old_cfg = TrainConfig(batch_size=3, seed=5)
    saved = TrainerState(epoch=1, step_in_epoch=1, global_step=3, updates=3, **layout_fields(old_cfg, 2),
                         schedule=ScheduleClock.fresh(2).to_json())
    cfg = TrainConfig(batch_size=2, seed=5)
    results = [_resume(saved, cfg, 3, rank) for rank in range(3)]
    state, change, _, scheduler = results[0]
    assert (state.world_size, state.batch_size, state.step_in_epoch, state.epoch) == (3, 2, 0, 1)
    assert state.earlier_segments == [{"epoch": 1, "steps": 1, **layout_fields(old_cfg, 2)}]
    assert change.message() == ("resuming 3 processes from a 2-process checkpoint at epoch 1, step 1: "
                                "6 samples left in this epoch")
    assert state.schedule["anchor_epochs"] == 1.5 and state.schedule["steps_per_epoch"] == 2
    assert (state.schedule["boundary_step"], state.schedule["boundary_epoch"]) == (4, 2)  # 1 step for the 6 left
    assert change.to_json()["new_global_batch"] == 6 and change.to_json()["old_global_batch"] == 6
    assert scheduler.base_lrs == [0.03]  # the base rate given by the new run's global-batch rule
    rest = [i for _, _, sampler, _ in results for b in sampler.epoch_batches() for i in b]
    old_part = trained_samples(epoch_order(12, 5, 1), BatchLayout(2, 3), 1)
    assert Counter(rest + old_part) == Counter(range(12))


def test_same_layout_resume_changes_nothing():
    cfg = TrainConfig(batch_size=2)
    saved = TrainerState(epoch=0, step_in_epoch=2, global_step=2, updates=2, **layout_fields(cfg, 2),
                         schedule=ScheduleClock.fresh(3).to_json())
    state, change, sampler, scheduler = _resume(saved, cfg, 2, 0)
    assert change is None and state == saved
    assert sampler.epoch_batches() == EpochBatchSampler(12, 2, 2, 0, cfg.seed).epoch_batches()
    assert scheduler.base_lrs == [0.01]


def test_older_trainer_state_without_layout_details_loads(tmp_path):
    path = tmp_path / STATE_NAME
    path.write_text(json.dumps({"epoch": 2, "step_in_epoch": 1, "global_step": 9, "updates": 9, "best_metric": None,
                                "best_step": None, "world_size": 2, "batch_size": 2, "grad_accum_steps": 1}))
    state = TrainerState.from_file(path)
    assert (state.epoch, state.seed, state.earlier_segments, state.schedule) == (2, None, [], None)


def test_older_checkpoint_without_a_clock_resumes_on_another_layout():
    """No ``schedule`` saved: the old layout's steps per epoch are recomputed from the layout."""
    saved = TrainerState(epoch=1, step_in_epoch=1, global_step=3, updates=3, world_size=2, batch_size=3)
    state, change, _, _ = _resume(saved, TrainConfig(batch_size=2), 3, 0)
    assert change.old_steps_per_epoch == 2 and state.schedule["anchor_epochs"] == 1.5
    assert change.old["seed"] == TrainConfig().seed  # missing layout fields: taken as unchanged
