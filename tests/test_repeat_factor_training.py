"""Repeat-factor sampling in real training runs, counted from what every rank trained.

One run of 2 epochs with ``--repeat-factor-threshold`` and ``--debug-record-samples``:
2 gloo processes stop after 2 steps, resume on 2 processes (same layout) into the first step
of epoch 1, and finish on 1 process (a resume on another layout, issue 15). The synthetic data
draws its classes 50/30/20 %, so the rarest is in fewer images and repeated most.
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


def test_two_processes_resume_then_one_process_train_every_repeat_once(data_dir, tmp_path):
    out = tmp_path / "run"
    first = check_ok(run(launch_command(_args(data_dir, out, "--max-steps", "2"))))
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2
    assert sorted(p.name for p in latest_checkpoint(out).glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # the group really had 2 ranks
    factors = _image_factors(data_dir, out)
    assert max(factors) > 1.0 and resolved["repeat_factors"]["threshold"] == THRESHOLD
    assert resolved["repeat_factors"]["expected_images_per_epoch"] == pytest.approx(sum(factors))
    assert f"repeat factors (T={THRESHOLD:g}): " in first.stderr
    l0, l1 = resolved["steps_by_epoch"]
    assert [math.ceil(sum(_expected(factors, e).values()) / 4) for e in (0, 1)] == [l0, l1]  # 2 ranks x 2 images

    check_ok(run(launch_command(_args(data_dir, out, "--resume", "auto", "--max-steps", str(l0 + 1)))))
    left = sum(_expected(factors, 1).values()) - 4  # one step of 2 ranks x 2 images trained in epoch 1
    last = check_ok(run(train_command(_args(data_dir, out, "--resume", "auto"))))
    assert (f"resuming 1 process from a 2-process checkpoint at epoch 1, step 1: {left} samples left in this epoch"
            in last.stderr)
    samples = {r: read_jsonl(out / "debug" / f"samples_rank{r}.jsonl") for r in (0, 1)}

    # epoch 0, on 2 processes, stopped and resumed: each rank's batches are the uninterrupted order
    for rank in (0, 1):
        sampler = EpochBatchSampler(len(factors), 2, 2, rank, SEED, repeat_factors=factors)
        assert [_pairs(r) for r in samples[rank] if r["epoch"] == 0] == [
            [key[1:] for key in batch] for batch in sampler]
    per_rank = [Counter(p for r in samples[rank] if r["epoch"] == 0 for p in _pairs(r)) for rank in (0, 1)]
    padding = per_rank[0] + per_rank[1] - _expected(factors, 0)
    assert not _expected(factors, 0) - (per_rank[0] + per_rank[1])  # every repeat of every image trained
    assert sum(padding.values()) <= 1  # the even split's one padded repeat at most
    assert set(per_rank[0]) & set(per_rank[1]) <= set(padding)  # no (image, repeat) trained on both ranks
    image_counts = Counter(i for rank in (0, 1) for r in samples[rank] if r["epoch"] == 0 for i in r["image_ids"])
    repeats = repeated_epoch_order(factors, SEED, 0)
    assert image_counts - Counter(key_parts(k, len(factors))[0] for k in repeats) == Counter(
        {i: c for (i, _), c in padding.items()})

    # epoch 1, over the change to 1 process: the multiset of (image, repeat) is the epoch list's
    epoch1 = Counter(p for rank in (0, 1) for r in samples[rank] if r["epoch"] == 1 for p in _pairs(r))
    assert epoch1 == _expected(factors, 1)

    # the schedule by fraction of epochs: exact on 2 processes, then linear over what epoch 1 had left
    steps = {r["step"]: r["lr"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"}
    final = json.loads((out / "report.json").read_text())["global_step"]
    assert sorted(steps) == list(range(1, final + 1)) and final == l0 + 1 + math.ceil(left / 2)
    anchor = 1 + 1 / l1
    for step, lr in steps.items():
        epochs = (step / l0 if step <= l0 else 1 + (step - l0) / l1 if step == l0 + 1 else
                  anchor + (step - l0 - 1) / (final - l0 - 1) * (2 - anchor))
        assert lr == pytest.approx(_cosine(epochs), rel=1e-9, abs=1e-15), step
    assert steps[final] == pytest.approx(0.0, abs=1e-15)  # the end value at the end of the last epoch

    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 0, final)
    with (out / "results.csv").open() as f:
        assert [(row["epoch"], row["step"]) for row in csv.DictReader(f)] == [("1", str(l0)), ("2", str(final))]
