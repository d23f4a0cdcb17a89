"""Repeat-factor sampling in real training runs, counted from what every rank trained.

Runs of 2 epochs with ``--repeat-factor-threshold`` and ``--debug-record-samples`` on 2 gloo
processes: straight through, and (slow) stopped after 2 steps, resumed on 2 processes into the
first step of epoch 1 and finished on 1 process (a resume on another layout, issue 15). The
synthetic data draws its classes 50/30/20 %, so the rarest is in fewer images and repeated most.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from distdet.classes import CLASS_NAMES
from distdet.data.sources import open_index
from distdet.data.splits import select_records
from distdet.training.checkpoints import latest_checkpoint
from distdet.training.repeat_factors import RepeatFactors
from distdet.training.sampling import EpochBatchSampler, key_parts, repeated_epoch_order
from support.trainer import FAST, check_ok, launch_command, make_tiny_dataset, read_jsonl, run, train_command

pytestmark = pytest.mark.timeout(900)

THRESHOLD = 1.0
SEED = 42  # the trainer's default --seed
LR = 0.005  # the trainer's default --lr, for the global batch whatever the layout


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def _args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "2",
            "--repeat-factor-threshold", str(THRESHOLD), "--lr-schedule", "cosine", "--warmup-steps", "0",
            "--debug-record-samples", *extra]


def _image_factors(data_dir: Path, out: Path) -> tuple[float, ...]:
    train = select_records(open_index(data_dir).records, json.loads((out / "split.json").read_text())["train"])
    return RepeatFactors.of_records(train, CLASS_NAMES, THRESHOLD).image_factors


def _pairs(record: dict) -> list[tuple[int, int]]:
    return list(zip(record["image_ids"], record["repeats"]))


def _expected(factors: tuple[float, ...], epoch: int) -> Counter:
    return Counter(key_parts(key, len(factors)) for key in repeated_epoch_order(factors, SEED, epoch))


def _cosine(epochs: float) -> float:
    return LR * 0.5 * (1 + math.cos(math.pi * epochs / 2))


def _start(data_dir: Path, out: Path, *extra: str) -> tuple[tuple[float, ...], tuple[int, int], str]:
    """A 2-process run; returns the image factors, the two epochs' steps and the log."""
    done = check_ok(run(launch_command(_args(data_dir, out, *extra))))
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2
    assert sorted(p.name for p in latest_checkpoint(out).glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # the group really had 2 ranks
    factors = _image_factors(data_dir, out)
    assert max(factors) > 1.0 and resolved["repeat_factors"]["threshold"] == THRESHOLD
    assert resolved["repeat_factors"]["expected_images_per_epoch"] == pytest.approx(sum(factors))
    assert f"repeat factors (T={THRESHOLD:g}): " in done.stderr
    l0, l1 = resolved["steps_by_epoch"]
    assert [math.ceil(sum(_expected(factors, e).values()) / 4) for e in (0, 1)] == [l0, l1]  # 2 ranks x 2 images
    return factors, (l0, l1), done.stderr


def _samples(out: Path) -> dict[int, list[dict]]:
    return {r: read_jsonl(out / "debug" / f"samples_rank{r}.jsonl") for r in (0, 1)}


def _assert_two_rank_epoch(samples: dict[int, list[dict]], factors: tuple[float, ...], epoch: int) -> None:
    """Each rank trained the uninterrupted order; together every repeat once, plus padding."""
    for rank in (0, 1):
        sampler = EpochBatchSampler(len(factors), 2, 2, rank, SEED, repeat_factors=factors)
        sampler.set_epoch(epoch)
        assert [_pairs(r) for r in samples[rank] if r["epoch"] == epoch] == [
            [key[1:] for key in batch] for batch in sampler]
    per_rank = [Counter(p for r in samples[rank] if r["epoch"] == epoch for p in _pairs(r)) for rank in (0, 1)]
    expected = _expected(factors, epoch)
    padding = per_rank[0] + per_rank[1] - expected
    assert not expected - (per_rank[0] + per_rank[1])  # every repeat of every image trained
    assert sum(padding.values()) <= 1  # the even split's one padded repeat at most
    assert set(per_rank[0]) & set(per_rank[1]) <= set(padding)  # no (image, repeat) trained on both ranks
    image_counts = Counter(i for rank in (0, 1) for r in samples[rank] if r["epoch"] == epoch for i in r["image_ids"])
    assert image_counts - Counter(i for i, _ in expected.elements()) == Counter(i for i, _ in padding.elements())


def _train_lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"}


def _assert_finished(out: Path, epoch_ends: tuple[int, int]) -> None:
    """Checkpoint, results.csv and report agree on where each epoch ended."""
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 0, epoch_ends[1])
    assert json.loads((out / "report.json").read_text())["global_step"] == epoch_ends[1]
    with (out / "results.csv").open() as f:
        assert [(int(row["epoch"]), int(row["step"])) for row in csv.DictReader(f)] == [(1, epoch_ends[0]),
                                                                                       (2, epoch_ends[1])]


def test_two_processes_train_every_repeat_once_and_the_schedule_ends_with_the_last_epoch(data_dir, tmp_path):
    out = tmp_path / "run"
    factors, (l0, l1), _ = _start(data_dir, out)
    samples = _samples(out)
    for epoch in (0, 1):
        _assert_two_rank_epoch(samples, factors, epoch)
    lrs = _train_lrs(out)
    assert sorted(lrs) == list(range(1, l0 + l1 + 1))
    for step, lr in lrs.items():  # by the fraction of each epoch's own length
        epochs = step / l0 if step <= l0 else 1 + (step - l0) / l1
        assert lr == pytest.approx(_cosine(epochs), rel=1e-9, abs=1e-15), step
    assert lrs[l0 + l1] == pytest.approx(0.0, abs=1e-15)  # the end value at the end of the last epoch
    _assert_finished(out, (l0, l0 + l1))


@pytest.mark.slow  # three training runs: 35 s on a quiet moment of the shared 2-core machine, 75 s under load
def test_resume_on_two_then_one_process_keeps_the_order_and_trains_every_repeat_once(data_dir, tmp_path):
    out = tmp_path / "run"
    factors, (l0, l1), _ = _start(data_dir, out, "--max-steps", "2")
    check_ok(run(launch_command(_args(data_dir, out, "--resume", "auto", "--max-steps", str(l0 + 1)))))
    left = sum(_expected(factors, 1).values()) - 4  # one step of 2 ranks x 2 images trained in epoch 1
    last = check_ok(run(train_command(_args(data_dir, out, "--resume", "auto"))))
    assert (f"resuming 1 process from a 2-process checkpoint at epoch 1, step 1: {left} samples left in this epoch"
            in last.stderr)
    samples = _samples(out)
    _assert_two_rank_epoch(samples, factors, 0)  # stopped and resumed on 2 processes: the uninterrupted order
    # epoch 1, over the change to 1 process: the multiset of (image, repeat) is the epoch list's
    epoch1 = Counter(p for rank in (0, 1) for r in samples[rank] if r["epoch"] == 1 for p in _pairs(r))
    assert epoch1 == _expected(factors, 1)

    # the schedule by fraction of epochs: exact on 2 processes, then linear over what epoch 1 had left
    lrs = _train_lrs(out)
    final = l0 + 1 + math.ceil(left / 2)
    assert sorted(lrs) == list(range(1, final + 1))
    anchor = 1 + 1 / l1
    for step, lr in lrs.items():
        epochs = (step / l0 if step <= l0 else anchor if step == l0 + 1 else
                  anchor + (step - l0 - 1) / (final - l0 - 1) * (2 - anchor))
        assert lr == pytest.approx(_cosine(epochs), rel=1e-9, abs=1e-15), step
    assert lrs[final] == pytest.approx(0.0, abs=1e-15)
    _assert_finished(out, (l0, final))
