"""Repeat-factor sampling in isolation: the LVIS rule, the expanded epoch lists, their sharding,
per-repeat augmentation seeds, the schedule over epochs of different lengths, the flag."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from support.data import facemask_dir, needs_facemask
from distdet.classes import CLASS_NAMES
from distdet.data.records import ImageRecord
from distdet.training.checkpoint_files import CheckpointError
from distdet.training.config import TrainConfig, parse_config
from distdet.training.optim import ScheduleClock, schedule_factor_fn
from distdet.training.repeat_factors import RepeatFactors
from distdet.training.resume_settings import compare_settings
from distdet.training.sampling import (
    EpochBatchSampler, SeededSampleDataset, aspect_ratio_groups, epoch_order, key_parts, repeat_counts,
    repeated_epoch_order, sample_seed,
)


def _record(stem: str, labels: list[int], crowd: list[bool] | None = None) -> ImageRecord:
    boxes = np.tile(np.array([[0, 0, 4, 4]], dtype=np.float32), (len(labels), 1)).reshape(-1, 4)
    return ImageRecord(stem, Path(f"{stem}.png"), Path(f"{stem}.xml"), 8, 8, boxes, np.array(labels, dtype=np.int64),
                       iscrowd=np.array(crowd if crowd is not None else [False] * len(labels)))


# images: 1 = common, 2 = in 2 of 10 images, 3 = only as a crowd region (not trained, so absent)
RECORDS = [_record("a", [1, 1]), _record("b", [1, 2]), _record("c", [2, 1]), _record("d", []),
           _record("e", [1, 3], crowd=[False, True])] + [_record(f"z{i}", [1]) for i in range(5)]


def test_factors_follow_the_lvis_rule():
    threshold = 0.5
    factors = RepeatFactors.of_records(RECORDS, ("common", "rare", "crowd_only"), threshold)
    labels = [set(r.labels[~r.crowd].tolist()) for r in RECORDS]
    fractions = [sum(c in image for image in labels) / len(RECORDS) for c in (1, 2, 3)]
    assert factors.class_fractions == pytest.approx(fractions)  # 0.9, 0.2, 0.0
    assert factors.class_factors[0] == 1.0  # in more than T of the images: not repeated
    assert factors.class_factors[1] == pytest.approx(math.sqrt(threshold / fractions[1]))
    assert factors.class_factors[2] is None
    expected = [max([factors.class_factors[c - 1] for c in image], default=1.0) for image in labels]
    assert factors.image_factors == pytest.approx(expected)
    assert factors.image_factors[3] == 1.0  # no objects
    assert factors.expected_images == pytest.approx(sum(expected))
    assert factors.message() == (f"repeat factors (T=0.5): rare {math.sqrt(2.5):.2f}x (20.0% of images), "
                                 f"common 1.00x (90.0% of images), crowd_only absent; "
                                 f"epoch ~{sum(expected):.0f} images instead of 10")
    summary = factors.to_json()
    assert summary["classes"]["rare"] == {"image_fraction": pytest.approx(0.2),
                                          "repeat_factor": pytest.approx(math.sqrt(2.5))}
    assert (summary["repeated_images"], summary["train_images"]) == (2, 10)


@needs_facemask
def test_real_tutorial_training_images_give_the_issues_factors():
    from distdet.data.sources import open_index
    from distdet.data.splits import select_part

    train = select_part(open_index(facemask_dir()).records, "train")
    assert len(train) == 683
    factors = RepeatFactors.of_records(train, CLASS_NAMES, 0.5)
    fractions = dict(zip(CLASS_NAMES, factors.class_fractions))
    assert fractions == {"with_mask": pytest.approx(0.905, abs=5e-4), "without_mask": pytest.approx(0.347, abs=5e-4),
                         "mask_weared_incorrect": pytest.approx(0.108, abs=5e-4)}
    by_class = dict(zip(CLASS_NAMES, factors.class_factors))
    assert [round(by_class[c], 2) for c in ("mask_weared_incorrect", "without_mask", "with_mask")] == [2.15, 1.2, 1.0]
    assert factors.message().startswith("repeat factors (T=0.5): mask_weared_incorrect 2.15x (10.8% of images), "
                                        "without_mask 1.20x (34.7% of images), with_mask 1.00x (90.5% of images)")


FACTORS = [1.0, 2.15, 1.2, 1.0, 3.5, 1.0, 1.6]


def test_expanded_list_is_a_pure_function_of_seed_and_epoch():
    first = repeated_epoch_order(FACTORS, seed=3, epoch=2)
    assert first == repeated_epoch_order(FACTORS, seed=3, epoch=2)
    assert first != repeated_epoch_order(FACTORS, seed=3, epoch=3)
    assert first != repeated_epoch_order(FACTORS, seed=4, epoch=2)
    pairs = [key_parts(key, len(FACTORS)) for key in first]
    assert len(set(pairs)) == len(pairs)  # each repeat of an image is its own entry
    counts = repeat_counts(FACTORS, 3, 2)
    assert Counter(index for index, _ in pairs) == Counter({i: c for i, c in enumerate(counts) if c})
    assert set(pairs) == {(i, r) for i, c in enumerate(counts) for r in range(c)}
    # without repeats it is DistributedSampler's permutation
    assert repeated_epoch_order([1.0] * 9, seed=3, epoch=2) == epoch_order(9, 3, 2)


def test_stochastic_rounding_is_unbiased():
    epochs = 4000
    draws = np.array([repeat_counts(FACTORS, seed=1, epoch=e) for e in range(epochs)])
    floors = np.floor(FACTORS)
    assert ((draws == floors) | (draws == floors + 1)).all()
    # each count is floor + Bernoulli(frac): its mean is within 5 standard errors of the factor
    assert np.abs(draws.mean(axis=0) - FACTORS).max() < 5 * 0.5 / math.sqrt(epochs)
    assert len({tuple(row) for row in draws[:20]}) > 1  # epochs draw anew


@pytest.mark.parametrize("world, batch, grouping", [(2, 2, False), (3, 2, True), (2, 3, True)])
def test_ranks_share_every_repeat_once(world, batch, grouping):
    ratios = [0.6, 1.5, 1.0, 0.7, 1.8, 1.2, 0.5]
    groups = aspect_ratio_groups(ratios, 1) if grouping else None
    for epoch in range(3):
        samplers = [EpochBatchSampler(len(FACTORS), batch, world, r, seed=5, group_ids=groups, repeat_factors=FACTORS)
                    for r in range(world)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        keys = [[key[1:] for b in sampler for key in b] for sampler in samplers]
        assert len({len(list(s)) for s in samplers}) == 1  # every rank steps the same number of times
        expected = Counter(key_parts(k, len(FACTORS)) for k in repeated_epoch_order(FACTORS, 5, epoch))
        trained = Counter(pair for rank in keys for pair in rank)
        assert not expected - trained  # nothing skipped
        extra = trained - expected  # padding only: the even split, and grouping's repeated batches
        assert set(extra) <= set(expected)
        if not grouping:
            assert sum(extra.values()) <= world - 1
        for r in range(world):  # no (image, repeat) trained by two ranks, unless it is a padding repeat
            for other in range(r + 1, world):
                assert set(keys[r]) & set(keys[other]) <= set(extra)


def test_epoch_steps_follow_each_epochs_own_list():
    sampler = EpochBatchSampler(len(FACTORS), 2, 2, 0, seed=5, repeat_factors=FACTORS)
    steps = sampler.epoch_steps(6, grad_accum_steps=1)
    for epoch, count in enumerate(steps):
        sampler.set_epoch(epoch)
        assert count == len(sampler.epoch_batches()) == math.ceil(len(repeated_epoch_order(FACTORS, 5, epoch)) / 4)
    assert sampler.epoch_steps(6, grad_accum_steps=2) == tuple(math.ceil(s / 2) for s in steps)


def test_each_repeat_is_augmented_with_its_own_seed():
    class Detections(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(4), {"image_id": torch.tensor(i)}

    dataset = SeededSampleDataset(Detections(), seed=7)
    first, second = dataset[(2, 1, 0)], dataset[(2, 1, 1)]
    assert not torch.equal(first[0], second[0])
    assert (int(first[1]["repeat"]), int(second[1]["repeat"])) == (0, 1)
    assert torch.equal(first[0], dataset[(2, 1)][0])  # repeat 0 is the key without repeats
    assert torch.equal(second[0], dataset[(2, 1, 1)][0])
    assert sample_seed(7, 2, 1) == sample_seed(7, 2, 1, 0) != sample_seed(7, 2, 1, 1)


EPOCH_STEPS = (5, 6, 4)


def test_schedule_runs_by_the_fraction_of_each_epoch():
    clock = ScheduleClock.fresh(EPOCH_STEPS[0], EPOCH_STEPS)
    starts = [0, 5, 11, 15]
    assert [clock.epochs(s) for s in starts] == [0.0, 1.0, 2.0, 3.0]
    assert clock.epochs(8) == pytest.approx(1 + 3 / 6) and clock.epochs(13) == pytest.approx(2 + 2 / 4)
    assert clock.total_steps(3) == 15 and ScheduleClock.fresh(5).total_steps(3) == 15
    assert ScheduleClock.from_json(clock.to_json()) == clock

    cosine = schedule_factor_fn(TrainConfig(epochs=3, warmup_steps=0, lr_schedule="cosine"), clock)
    values = [cosine(s) for s in range(16)]
    assert values[0] == 1.0 and values[15] == pytest.approx(0.0, abs=1e-12)  # the end value at the last step
    for s, value in enumerate(values):
        assert value == pytest.approx(0.5 * (1 + math.cos(math.pi * clock.epochs(s) / 3)))
    assert values == sorted(values, reverse=True)
    # continuous across the epoch boundaries: no step moves more than one step of the shortest epoch
    assert max(a - b for a, b in zip(values, values[1:])) <= 0.5 * math.pi / 3 / min(EPOCH_STEPS)

    multistep = schedule_factor_fn(TrainConfig(epochs=3, warmup_steps=0, lr_milestones=[1, 2], lr_gamma=0.1), clock)
    assert [multistep(s) for s in (4, 5, 10, 11)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_rebased_clock_continues_into_the_new_layouts_epochs():
    old = ScheduleClock.fresh(EPOCH_STEPS[0], EPOCH_STEPS)
    new = old.rebased(7, 1, 3, 9, (9, 11, 8))  # step 2 of 6 in epoch 1, 3 steps left on the new layout
    assert new.epochs(7) == pytest.approx(old.epochs(7)) and new.epochs(10) == 2.0
    assert new.epochs(14) == pytest.approx(2 + 4 / 8) and new.epochs(18) == 3.0


def _parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        parse_config(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "inf"])
def test_threshold_outside_zero_to_one_is_a_flag_error(capsys, value):
    error = _parse_error(capsys, "--repeat-factor-threshold", value)
    assert "--repeat-factor-threshold must be" in error and "Traceback" not in error


def test_threshold_from_yaml_and_toml(tmp_path):
    assert parse_config([]).repeat_factor_threshold is None
    (tmp_path / "a.yaml").write_text("repeat_factor_threshold: 0.5\n")
    (tmp_path / "b.toml").write_text("repeat-factor-threshold = 0.25\n")
    assert parse_config(["--config", str(tmp_path / "a.yaml")]).repeat_factor_threshold == 0.5
    assert parse_config(["--config", str(tmp_path / "b.toml")]).repeat_factor_threshold == 0.25
    (tmp_path / "c.yaml").write_text("repeat_factor_threshold: 2\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(tmp_path / "c.yaml")])


def test_resume_with_another_threshold_is_refused():
    settings = {"model": "m", "optimizer": "sgd", "min_size": 1, "max_size": 2, "data_fingerprint": "x"}
    older = dict(settings)  # a checkpoint from before repeat factors existed: off
    compare_settings(Path("ckpt"), older, {**settings, "repeat_factor_threshold": None})
    with pytest.raises(CheckpointError, match="trained with --repeat-factor-threshold off, this run has 0.5"):
        compare_settings(Path("ckpt"), older, {**settings, "repeat_factor_threshold": 0.5})
    with pytest.raises(CheckpointError, match="--repeat-factor-threshold 0.5, this run has it off"):
        compare_settings(Path("ckpt"), {**settings, "repeat_factor_threshold": 0.5},
                         {**settings, "repeat_factor_threshold": None})
