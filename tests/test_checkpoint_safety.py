"""Checkpoint files written for real by save_checkpoint, then corrupted, poisoned or made hostile.

The checkpoints come from a real (single-process, CPU) Accelerator and a small model; every
attack rewrites the marker's checksums too (as anyone who can write the folder can), so the
loader itself, not the checksum, has to refuse.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from distdet.io_utils import WriteFailed, append_line
from distdet.training.checkpoint_files import CheckpointError, read_marker, write_marker
from distdet.training.resume_settings import apply_hyperparameters, group_hyperparameters
from distdet.training.checkpoints import (
    Trainables, TrainerState, load_checkpoint, resolve_resume, save_checkpoint,
)

SETTINGS = {"model": "tiny", "optimizer": "sgd", "min_size": 64, "max_size": 96, "data_fingerprint": "abc"}


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def _parts(lr: float = 0.1) -> Trainables:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return Trainables(model, optimizer, scheduler)


def _checkpoint(accelerator: Accelerator, run_dir: Path, step: int = 1) -> Path:
    parts = _parts()
    prepared = Trainables(*accelerator.prepare(parts.model, parts.optimizer), parts.scheduler)
    return save_checkpoint(accelerator, run_dir, TrainerState(global_step=step), 3, prepared, SETTINGS)


def _load(accelerator: Accelerator, folder: Path, deterministic: bool = True, lr: float = 0.1):
    """Resume as the trainer does: load, then put the current flags' optimizer settings back."""
    parts = _parts(lr)
    prepared = Trainables(*accelerator.prepare(parts.model, parts.optimizer), parts.scheduler)
    wanted = group_hyperparameters(prepared.optimizer)
    state = load_checkpoint(accelerator, folder, prepared, SETTINGS, deterministic)
    return (state, apply_hyperparameters(prepared.optimizer, prepared.scheduler, wanted)), prepared


def _reseal(folder: Path) -> None:
    """Rewrite the marker so every file's checksum matches again."""
    write_marker(folder, read_marker(folder)["pieces"])


def test_saved_checkpoint_lists_pieces_with_checksums_and_round_trips(accelerator, tmp_path):
    folder = _checkpoint(accelerator, tmp_path)
    marker = read_marker(folder)
    assert {"model", "optimizer", "rng", "scheduler", "settings", "trainer_state"} <= set(marker["pieces"])
    assert set(marker["files"]) == {p.name for p in folder.iterdir()} - {"COMPLETE"}
    assert not list(folder.glob("*custom_checkpoint*"))  # no pickled scheduler
    (state, changes), parts = _load(accelerator, folder)
    assert state.global_step == 1 and changes == {}
    assert parts.scheduler.last_epoch == 1 and parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.json",
                                  "run_settings.json", "trainer_state.json", "custom_checkpoint_0.pkl"])
def test_a_malicious_pickle_in_any_file_never_runs(accelerator, tmp_path, name):
    folder = _checkpoint(accelerator, tmp_path / "run")
    marker = tmp_path / "pwned"
    if name.endswith((".bin", ".pkl")):
        torch.save({"state": Payload(marker)}, folder / name)  # torch's own zip format, hostile data.pkl
    else:
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    _reseal(folder)
    try:
        resolve_resume(str(folder), None)
        _load(accelerator, folder, deterministic=True)
    except CheckpointError as exc:
        assert name in str(exc) and str(folder) in str(exc)
    else:
        assert name == "custom_checkpoint_0.pkl"  # a planted extra file is never opened
    assert not marker.exists(), f"unpickling {name} ran the payload"


def test_nonfinite_optimizer_state_is_refused_after_loading(accelerator, tmp_path):
    folder = _checkpoint(accelerator, tmp_path)
    state = torch.load(folder / "optimizer.bin", weights_only=True)
    next(iter(state["state"].values()))["momentum_buffer"][0] = float("nan")
    torch.save(state, folder / "optimizer.bin")
    _reseal(folder)
    with pytest.raises(CheckpointError, match=r"loaded: non-finite weights or optimizer state \(optimizer state 0"):
        _load(accelerator, folder)


def test_nonfinite_weights_are_never_saved(accelerator, tmp_path):
    _checkpoint(accelerator, tmp_path, step=1)
    parts = _parts()
    with torch.no_grad():
        parts.model[0].weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"not saving checkpoint .*step_000002.*\(0.weight\)"):
        save_checkpoint(accelerator, tmp_path, TrainerState(global_step=2), 3, parts, SETTINGS)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]


def test_truncated_rng_state_warns_or_is_refused_under_deterministic(accelerator, tmp_path, caplog):
    folder = _checkpoint(accelerator, tmp_path)
    rng = folder / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])
    _reseal(folder)  # truncated before the marker was written: the checksum cannot tell
    with pytest.raises(CheckpointError, match="random_states_0.pkl.*--deterministic cannot resume exactly"):
        _load(accelerator, folder, deterministic=True)
    with caplog.at_level(logging.WARNING, logger="distdet"):
        _load(accelerator, folder, deterministic=False)
    assert "random_states_0.pkl" in caplog.text and "this resume is not exact" in caplog.text


def test_a_new_lr_on_resume_is_applied_and_reported(accelerator, tmp_path):
    folder = _checkpoint(accelerator, tmp_path)
    (_, changes), parts = _load(accelerator, folder, lr=0.4)
    assert changes == {"initial_lr": [0.1, 0.4]}
    assert parts.scheduler.base_lrs == [0.4] and parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_another_model_or_optimizer_is_refused_naming_the_checkpoint_s(accelerator, tmp_path):
    folder = _checkpoint(accelerator, tmp_path)
    parts = _parts()
    for key, flag in (("model", "--model"), ("optimizer", "--optimizer")):
        with pytest.raises(CheckpointError, match=rf"holds a '{SETTINGS[key]}' {key}, but {flag} is 'other'"):
            load_checkpoint(accelerator, folder, parts, {**SETTINGS, key: "other"}, True)


def test_other_sizes_or_data_on_resume_warn(accelerator, tmp_path, caplog):
    folder = _checkpoint(accelerator, tmp_path)
    parts = _parts()
    with caplog.at_level(logging.WARNING, logger="distdet"):
        load_checkpoint(accelerator, folder, parts, {**SETTINGS, "max_size": 128, "data_fingerprint": "other"}, True)
    assert "--max-size 128 (the checkpoint was trained with 96)" in caplog.text
    assert "training data whose files differ" in caplog.text


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_on_a_log_append_names_the_file():
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    with pytest.raises(WriteFailed, match=r"cannot write /dev/full: No space left on device"):
        append_line(Path("/dev/full"), "{}")


def test_pruning_keeps_the_checkpoint_a_run_resumed_from(accelerator, tmp_path):
    source = _checkpoint(accelerator, tmp_path, step=1)
    _load(accelerator, source)  # a resume from step 1 notes it in checkpoints/RESUMED_FROM
    for step in (2, 3):
        _checkpoint(accelerator, tmp_path, step=step)  # keep=3 ...
    parts = _parts()
    save_checkpoint(accelerator, tmp_path, TrainerState(global_step=4), 1, parts, SETTINGS)  # ... now keep=1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["step_000001", "step_000004"]
