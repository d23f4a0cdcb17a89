"""Checkpoint files written for real by save_checkpoint, then corrupted, poisoned or made hostile.

The checkpoints come from a real (single-process, CPU) Accelerator and a small model; every
attack rewrites the marker's checksums too (as anyone who can write the folder can), so the
loader itself, not the checksum, has to refuse.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from distdet.io_utils import WriteFailed, append_line
from distdet.training.checkpoint_files import CheckpointError, read_marker, write_marker
from distdet.training.resume_settings import apply_hyperparameters, group_hyperparameters
from distdet.training.checkpoints import (
    Trainables, TrainerState, load_checkpoint, resolve_resume, save_checkpoint,
)
from distdet.training.ema import ModelEMA, parameters_digest

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


def _parts(lr: float = 0.1, ema: bool = False) -> Trainables:
    """A small model after one optimizer step; with ``ema``, an EMA (decay 0.9, tau 1) updated after it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    averaged = ModelEMA(model, 0.9, 1.0) if ema else None
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    if averaged is not None:
        averaged.update()
    return Trainables(model, optimizer, scheduler, averaged)


def _prepared(accelerator: Accelerator, parts: Trainables) -> Trainables:
    return Trainables(*accelerator.prepare(parts.model, parts.optimizer), parts.scheduler, parts.ema)


def _checkpoint(accelerator: Accelerator, run_dir: Path, step: int = 1, ema: bool = False) -> Path:
    prepared = _prepared(accelerator, _parts(ema=ema))
    return save_checkpoint(accelerator, run_dir, TrainerState(global_step=step), 3, prepared, SETTINGS)


def _load(accelerator: Accelerator, folder: Path, deterministic: bool = True, lr: float = 0.1, ema: bool = False):
    """Resume as the trainer does: load, then put the current flags' optimizer settings back."""
    prepared = _prepared(accelerator, _parts(lr, ema))
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


def test_ema_is_a_checksummed_piece_that_round_trips(accelerator, tmp_path):
    saved = _prepared(accelerator, _parts(ema=True))
    saved.ema.update()
    saved.ema.update()  # 3 updates in all
    folder = save_checkpoint(accelerator, tmp_path, TrainerState(global_step=1), 3, saved, SETTINGS)
    marker = read_marker(folder)
    assert marker["pieces"]["ema"] == ["ema.json", "ema.safetensors"]
    assert "model.safetensors" in marker["pieces"]["model"] and "ema.safetensors" not in marker["pieces"]["model"]
    assert {"ema.json", "ema.safetensors"} <= set(marker["files"])
    info = json.loads((folder / "ema.json").read_text())
    digest = parameters_digest(saved.ema.state_tensors().items())
    assert (info["decay"], info["tau"], info["updates"], info["rank_digests"]) == (0.9, 1.0, 3, [digest])
    assert parameters_digest(load_file(folder / "ema.safetensors").items()) == digest

    loaded = _prepared(accelerator, _parts(ema=True))  # its EMA has 1 update: other values
    assert parameters_digest(loaded.ema.state_tensors().items()) != digest
    load_checkpoint(accelerator, folder, loaded, SETTINGS, True)
    assert loaded.ema.updates == 3 and parameters_digest(loaded.ema.state_tensors().items()) == digest


def test_nonfinite_ema_weights_are_never_saved(accelerator, tmp_path):
    parts = _prepared(accelerator, _parts(ema=True))
    with torch.no_grad():
        parts.ema.module[1].bias[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not saving checkpoint .*step_000001.*\(EMA 1.bias\)"):
        save_checkpoint(accelerator, tmp_path, TrainerState(global_step=1), 3, parts, SETTINGS)
    assert not (tmp_path / "checkpoints").exists()


def test_ema_weights_that_do_not_fit_are_refused_naming_the_file(accelerator, tmp_path):
    folder = _checkpoint(accelerator, tmp_path, ema=True)
    tensors = load_file(folder / "ema.safetensors")
    save_file({**tensors, "0.weight": torch.zeros(5, 5)}, folder / "ema.safetensors")
    _reseal(folder)
    with pytest.raises(CheckpointError, match=r"ema.safetensors.*0.weight has shape \(5, 5\)"):
        _load(accelerator, folder, ema=True)


def test_checkpoint_without_ema_resumed_with_ema_starts_it_from_the_resumed_weights(accelerator, tmp_path, caplog):
    folder = _checkpoint(accelerator, tmp_path)
    with caplog.at_level(logging.WARNING, logger="distdet"):
        _, parts = _load(accelerator, folder, ema=True)
    assert f"checkpoint {folder} holds no EMA weights" in caplog.text and "ramp from update 0" in caplog.text
    assert parts.ema.updates == 0
    for averaged, live in zip(parts.ema.module.parameters(), parts.model.parameters()):
        assert torch.equal(averaged, live)


def test_checkpoint_with_ema_resumed_without_it_warns_that_the_raw_weights_are_kept(accelerator, tmp_path, caplog):
    folder = _checkpoint(accelerator, tmp_path, ema=True)
    with caplog.at_level(logging.WARNING, logger="distdet"):
        (state, _), parts = _load(accelerator, folder)
    assert parts.ema is None and state.global_step == 1
    assert (f"checkpoint {folder} holds EMA weights (decay 0.9, update count 1) but --ema-decay is not set"
            in caplog.text)
    assert "model.pt will hold the raw weights" in caplog.text


def test_another_ema_decay_on_resume_continues_the_saved_average_with_a_warning(accelerator, tmp_path, caplog):
    folder = _checkpoint(accelerator, tmp_path, ema=True)
    parts = _prepared(accelerator, _parts(ema=True))
    parts.ema.decay = 0.5
    with caplog.at_level(logging.WARNING, logger="distdet"):
        load_checkpoint(accelerator, folder, parts, SETTINGS, True)
    assert ("the EMA (update count 1, saved with decay 0.9, tau 1.0) continues with --ema-decay 0.5 --ema-tau 1"
            in caplog.text)
    assert parts.ema.updates == 1 and parts.ema.decay == 0.5
