"""Real runs interrupted mid-epoch and resumed on another number of processes (gloo on CPU).

Each test trains 12 images (15 synthetic, a 0.2 test split) with ``--debug-record-samples``
and checks, from what every rank wrote: over the interruption, the epoch trains each image
exactly once (the layouts are chosen so that no stretch needs padding), the next epoch is a
fresh run's, the processes really were as many as asked, the loss stays finite and the rate
follows the global-batch rule without a jump.
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from distdet.training.checkpoints import latest_checkpoint
from distdet.training.sampling import EpochBatchSampler
from support.trainer import FAST, check_ok, child_env, launch_command, read_jsonl, run, train_command, wait_for

pytestmark = pytest.mark.timeout(900)

TRAIN_IMAGES = 12
SEED = 42  # the trainer's default --seed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from distdet.data.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("data") / "synth15"
    make_synthetic_dataset(out, num_images=15, seed=0, image_size=(96, 72), max_objects_per_image=2,
                           face_size=(16, 36))
    return out


def _command(processes: int, args: list[str]) -> list[str]:
    return train_command(args) if processes == 1 else launch_command(args, processes=processes)


def _args(data_dir: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return [*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--batch-size", str(batch_size),
            "--debug-record-samples", *extra]


def _samples(out: Path) -> dict[int, list[dict]]:
    files = (out / "debug").glob("samples_rank*.jsonl")
    return {int(p.stem.removeprefix("samples_rank")): read_jsonl(p) for p in files}


def _trained(out: Path, epoch: int) -> Counter:
    records = [r for per_rank in _samples(out).values() for r in per_rank if r["epoch"] == epoch]
    return Counter(i for r in records for i in r["image_ids"])


def _assert_ranks(out: Path, processes: int) -> None:
    """The run really had ``processes`` ranks: resolved world size and one RNG file per rank."""
    assert json.loads((out / "config.json").read_text())["resolved"]["world_size"] == processes
    rng_files = sorted(p.name for p in latest_checkpoint(out).glob("random_states_*.pkl"))
    assert rng_files == [f"random_states_{r}.pkl" for r in range(processes)]


def _train_records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def _assert_next_epoch_is_a_fresh_runs(out: Path, epoch: int, batch_size: int, processes: int) -> None:
    samples = _samples(out)
    for rank in range(processes):
        fresh = EpochBatchSampler(TRAIN_IMAGES, batch_size, processes, rank, SEED)
        fresh.set_epoch(epoch)
        assert [r["image_ids"] for r in samples[rank] if r["epoch"] == epoch] == fresh.epoch_batches()


def test_two_to_three_processes_with_another_batch_size(data_dir, tmp_path):
    """2 ranks x 3 images: 1 of 2 steps, stop; 3 ranks x 2 images train the other 6, then epoch 1."""
    out = tmp_path / "run"
    check_ok(run(_command(2, _args(data_dir, out, 3, "--epochs", "2", "--max-steps", "1"))))
    _assert_ranks(out, 2)
    assert len(_trained(out, 0)) == 6
    done = check_ok(run(_command(3, _args(data_dir, out, 2, "--epochs", "2", "--resume", "auto"))))
    _assert_ranks(out, 3)
    assert ("resuming 3 processes from a 2-process checkpoint at epoch 0, step 1: 6 samples left in this epoch"
            in done.stderr)
    assert _trained(out, 0) == Counter(range(TRAIN_IMAGES))
    assert _trained(out, 1) == Counter(range(TRAIN_IMAGES))
    _assert_next_epoch_is_a_fresh_runs(out, 1, batch_size=2, processes=3)

    change = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "layout_changed"]
    assert len(change) == 1
    assert (change[0]["old_layout"]["world_size"], change[0]["new_layout"]["batch_size"]) == (2, 2)
    assert json.loads((out / "config.json").read_text())["resolved"]["layout_change"]["samples_left"] == 6
    train = _train_records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # 1 step, 1 step for the 6 left, 2 in epoch 1
    assert all(math.isfinite(r["loss"]) for r in train)
    assert len({r["lr"] for r in train}) == 1  # --lr is for the global batch: 6 images in both layouts


@pytest.mark.slow
def test_three_to_one_process_with_accumulation_keeps_the_warmup_by_epochs(data_dir, tmp_path):
    """3 ranks x 1 image x 2 batches per step: 1 of 2 steps; then 1 process, batch 2, 2 batches per step.

    ``--scale-lr-from-batch 6``: the base rate goes from lr (global batch 6) to lr * 4/6; the
    4-step warmup of the first layout is 2 epochs long and stays 2 epochs long.
    """
    out = tmp_path / "run"
    schedule = ["--lr", "0.01", "--scale-lr-from-batch", "6", "--warmup-steps", "4", "--warmup-factor", "0.1",
                "--grad-accum-steps", "2", "--epochs", "2"]
    check_ok(run(_command(3, _args(data_dir, out, 1, *schedule, "--max-steps", "1"))))
    _assert_ranks(out, 3)
    done = check_ok(run(_command(1, _args(data_dir, out, 2, *schedule, "--resume", "auto"))))
    _assert_ranks(out, 1)
    assert ("resuming 1 process from a 3-process checkpoint at epoch 0, step 1: 6 samples left in this epoch"
            in done.stderr)
    assert _trained(out, 0) == Counter(range(TRAIN_IMAGES)) == _trained(out, 1)
    _assert_next_epoch_is_a_fresh_runs(out, 1, batch_size=2, processes=1)

    train = _train_records(out)
    # steps: 1 on 3 ranks (2 per epoch), then 2 for the 6 images left and 3 in epoch 1 (3 per epoch)
    # (the 2 steps for the second half of epoch 0, the last a short one, share it evenly)
    epochs_done = [0.5, 0.75, 1.0, 1 + 1 / 3, 1 + 2 / 3, 2.0]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in train)
    for record, epochs, base in zip(train, epochs_done, [0.01] + [0.01 * 4 / 6] * 5):
        warmup = 0.1 + 0.9 * min(1.0, epochs / 2)  # linear over 2 epochs from 0.1 of the rate
        assert record["lr"] == pytest.approx(base * warmup, rel=1e-9), (record["step"], epochs)


@pytest.mark.slow
def test_one_to_two_processes_after_sigterm(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(1, _args(data_dir, out, 2, "--epochs", "50", "--warmup-steps", "0")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(),
                            start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(lambda: proc.poll() is not None or (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2),
                 timeout=300, what="two logged steps")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 75, err[-3000:]
    _assert_ranks(out, 1)
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    epoch, steps = state["epoch"], state["step_in_epoch"]
    assert 0 < steps < 6, state  # 6 steps per epoch: stopped mid-epoch
    done = check_ok(run(_command(2, _args(data_dir, out, 2, "--epochs", str(epoch + 2), "--warmup-steps", "0",
                                          "--resume", "auto"))))
    _assert_ranks(out, 2)
    left = TRAIN_IMAGES - 2 * steps
    assert (f"resuming 2 processes from a 1-process checkpoint at epoch {epoch}, step {steps}: "
            f"{left} samples left in this epoch") in done.stderr
    assert _trained(out, epoch) == Counter(range(TRAIN_IMAGES)) == _trained(out, epoch + 1)
    _assert_next_epoch_is_a_fresh_runs(out, epoch + 1, batch_size=2, processes=2)
    train = _train_records(out)
    assert all(math.isfinite(r["loss"]) for r in train)
    assert len({r["lr"] for r in train}) == 1  # no warmup: --lr is for the global batch, 2 then 4 images
