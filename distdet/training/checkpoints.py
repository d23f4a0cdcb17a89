"""Complete, verified, atomic training checkpoints: ``checkpoints/step_000123`` in the run folder.

A checkpoint is written by every rank with ``accelerator.save_state`` (model as safetensors,
optimizer, gradient scaler, each rank's RNG states) into a temporary folder
``checkpoints/.tmp_step_000123``; the main process then adds distdet's own state as JSON
(``scheduler.json``, ``run_settings.json``, ``trainer_state.json``) and the completion marker
``COMPLETE`` holding the checksum of every file (:mod:`distdet.training.checkpoint_files`), and
renames the folder into place. A crash at any point leaves either the previous checkpoints
alone or a temporary folder that is never picked up: "latest" is the highest-step folder named
``step_<digits>`` that holds the marker, and ``--resume auto`` takes the newest one whose
files all match their checksums, naming each one it passes over.

Weights and optimizer state are checked finite before every save and after every load, so a
saved checkpoint never holds NaN/inf and pruning (the newest ``keep``) never removes the last
finite one in favour of a poisoned one, nor the checkpoint a run resumed from (``RESUMED_FROM``):
a resumed run that goes wrong leaves the last checkpoint from before it. A save that fails
(disk full) removes its temporary folder, keeps every earlier checkpoint and raises
:class:`CheckpointError` saying how much space is left.

A new kind of state is one more file written in :func:`_write_own_state` (JSON, or
safetensors for tensors) and listed under its name in the marker's ``pieces``; the checksums
cover it without further change. The weight EMA (``--ema-decay``) is such a piece, ``ema``:
``ema.safetensors`` (the averaged parameters) and ``ema.json`` (decay, tau, update count, and
each rank's digest of its average, which must all agree before anything is saved). A checkpoint
without it resumed with ``--ema-decay`` starts the EMA from the resumed weights (ramp from update
0); one with it resumed without ``--ema-decay`` continues without an EMA. Both warn.
"""
from __future__ import annotations

import logging
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import save_file

from distdet.io_utils import atomic_write_json, fsync_dir, read_json, write_failure_cause
from distdet.runtime.accelerator import agree_any
from distdet.training.checkpoint_files import (
    COMPLETE_MARKER,
    CheckpointError,
    first_nonfinite,
    load_json_piece,
    load_safetensors,
    load_tensor_file,
    optimizer_tensors,
    piece_files,
    read_marker,
    verify_checkpoint,
    write_marker,
)
from distdet.training.ema import ModelEMA, parameters_digest
from distdet.training.resume_settings import compare_settings

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
SCHEDULER_NAME = "scheduler.json"
SETTINGS_NAME = "run_settings.json"
EMA_WEIGHTS_NAME = "ema.safetensors"
EMA_STATE_NAME = "ema.json"
#: ``checkpoints/RESUMED_FROM``: the checkpoint the latest resume loaded. Pruning never removes
#: it, so weights that go wrong after a resume (diverging, or finite garbage) cannot cost the
#: last checkpoint from before it; the next resume moves the note to its own source.
RESUMED_NAME = "RESUMED_FROM"
_NAME = re.compile(r"^step_(\d+)$")
#: trainer-state fields that older checkpoints do not have
_ADDED_LATER = frozenset({"seed", "aspect_ratio_group_factor", "earlier_segments", "schedule"})


@dataclass
class TrainerState:
    """Where training stands; saved with every checkpoint.

    ``epoch`` is the epoch to continue with and ``step_in_epoch`` the optimizer steps already
    taken in it with the current layout (0 at an epoch boundary); ``global_step`` counts
    optimizer steps (skipped non-finite steps included) since the start of training.

    The layout (``seed``, ``world_size``, ``batch_size``, ``grad_accum_steps``,
    ``aspect_ratio_group_factor``) fixes which samples those steps took. ``earlier_segments``
    lists the stretches of an epoch trained before a resume on another layout (each: ``epoch``,
    ``steps`` and that layout); ``schedule`` is the learning-rate clock
    (:class:`~distdet.training.optim.ScheduleClock`). See :mod:`distdet.training.elastic`.
    Checkpoints written before these existed lack them; the defaults stand in.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    updates: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    world_size: int = 1
    batch_size: int = 1
    grad_accum_steps: int = 1
    seed: int | None = None
    aspect_ratio_group_factor: int | None = None
    earlier_segments: list[dict[str, int]] = field(default_factory=list)
    schedule: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_file(cls, path: Path) -> "TrainerState":
        """Read and type-check ``path``; CheckpointError naming the file and the key otherwise."""
        try:
            data = read_json(path, "trainer state")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"trainer state {path} is not a JSON object")
        known = {f.name for f in fields(cls)}
        missing = known - set(data) - _ADDED_LATER
        if missing:
            raise CheckpointError(f"trainer state {path} lacks {', '.join(sorted(missing))}")
        for key in known & set(data):
            _check_state_field(path, key, data[key])
        return cls(**{k: data[k] for k in known if k in data})


#: The JSON type of each trainer-state field (bool is never an int here) and whether null is allowed.
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], bool, str]] = {
    "best_metric": ((int, float), True, "a number or null"),
    "best_step": ((int,), True, "an integer or null"), "seed": ((int,), True, "an integer or null"),
    "aspect_ratio_group_factor": ((int,), True, "an integer or null"),
    "earlier_segments": ((list,), False, "a list"), "schedule": ((dict,), True, "an object or null"),
}


def _check_state_field(path: Path, key: str, value: Any) -> None:
    """Raise CheckpointError naming the file and the key for a value of the wrong JSON type."""
    types, nullable, wanted = _FIELD_TYPES.get(key, ((int,), False, "an integer"))
    if (value is None and nullable) or (isinstance(value, types) and not isinstance(value, bool)):
        return
    raise CheckpointError(f"trainer state {path}: {key!r} is {value!r}, expected {wanted}")


def checkpoint_name(global_step: int) -> str:
    return f"step_{global_step:06d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder name, or None if the name is not one."""
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """True for a folder named like a checkpoint that holds its marker and trainer state."""
    return (checkpoint_step(path) is not None and (path / COMPLETE_MARKER).is_file()
            and (path / STATE_NAME).is_file())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: checkpoint_step(p))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def verify(path: Path) -> TrainerState:
    """Check every file of checkpoint ``path`` against its marker; return its trainer state."""
    verify_checkpoint(path)
    return TrainerState.from_file(path / STATE_NAME)


def newest_verified(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` that verifies, warning about each newer one that does not.

    None when there is no complete checkpoint; CheckpointError when there are some but none verifies.
    """
    found = complete_checkpoints(run_dir)
    problems = []
    for path in reversed(found):
        try:
            verify(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            logger.warning("%s; falling back to the checkpoint before it", exc)
            continue
        if problems:
            logger.warning("resuming from %s, the newest checkpoint that verifies", path)
        return path
    if problems:
        raise CheckpointError(f"no checkpoint of {run_dir} verifies: " + "; ".join(problems))
    return None


def resolve_resume(resume: str, output_dir: Path | None) -> tuple[Path | None, Path | None]:
    """Turn ``--resume`` into (checkpoint to load or None, run folder it implies or None).

    ``none``: nothing. ``auto``: the newest complete checkpoint of ``output_dir`` that verifies,
    if any. A path: a complete checkpoint folder (which must verify), or a run folder (its newest
    checkpoint that verifies).
    """
    if resume == "none":
        return None, None
    if resume == "auto":
        if output_dir is None:
            return None, None
        return newest_verified(output_dir), None
    path = Path(resume)
    if is_complete(path):
        verify(path)
        return path, path.parent.parent
    if (path / CHECKPOINTS_DIR).is_dir():
        latest = newest_verified(path)
        if latest is None:
            raise FileNotFoundError(f"--resume {path}: the run folder holds no complete checkpoint")
        return latest, path
    if path.is_dir() and checkpoint_step(path) is not None:
        raise FileNotFoundError(f"--resume {path}: the checkpoint is incomplete (no {COMPLETE_MARKER} marker)")
    raise FileNotFoundError(f"--resume {path}: not a checkpoint folder or a run folder with checkpoints")


@dataclass
class Trainables:
    """What a checkpoint saves besides the trainer state: the prepared model, optimizer, scheduler,
    and the weight EMA when there is one."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ModelEMA | None = None


def check_finite(accelerator: Accelerator, parts: Trainables, when: str) -> None:
    """Raise CheckpointError on every rank if any rank's weights, EMA weights or optimizer state hold NaN/inf."""
    model = accelerator.unwrap_model(parts.model)
    averaged = parts.ema.module.named_parameters() if parts.ema is not None else ()
    bad = (first_nonfinite(model.state_dict().items()) or first_nonfinite((f"EMA {k}", v) for k, v in averaged)
           or first_nonfinite(optimizer_tensors(parts.optimizer.state_dict())))
    if agree_any(accelerator, [bad is not None])[0]:
        raise CheckpointError(f"{when}: non-finite weights or optimizer state ({bad or 'on another rank'})")


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep: int, parts: Trainables,
                    settings: dict[str, Any]) -> Path:
    """Save a complete checkpoint of the current training state; every rank must call this.

    Returns the final folder. Keeps the newest ``keep`` checkpoints and removes leftover
    temporary folders and checkpoints newer than this one (an abandoned line of training).
    ``settings`` (what the weights were trained with, see :mod:`distdet.training.resume_settings`)
    is saved as ``run_settings.json``.
    """
    folder = Path(run_dir) / CHECKPOINTS_DIR
    name = checkpoint_name(state.global_step)
    final, tmp = folder / name, folder / f".tmp_{name}"
    check_finite(accelerator, parts, f"not saving checkpoint {final} (the previous ones are kept)")
    ema_digests = _ema_rank_digests(accelerator, parts.ema, final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _collective_write(accelerator, tmp, final, lambda: accelerator.save_state(str(tmp)))
    own_state = ((lambda: _write_own_state(tmp, state, parts, settings, ema_digests)) if accelerator.is_main_process
                 else (lambda: None))
    _collective_write(accelerator, tmp, final, own_state)
    if accelerator.is_main_process:
        if final.exists():
            stale = folder / f".old_{name}"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            shutil.rmtree(stale)
        tmp.rename(final)
        fsync_dir(folder)
        _prune(folder, final, keep)
        logger.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def _write_own_state(tmp: Path, state: TrainerState, parts: Trainables, settings: dict[str, Any],
                     ema_digests: list[str]) -> None:
    atomic_write_json(tmp / SCHEDULER_NAME, parts.scheduler.state_dict())
    atomic_write_json(tmp / SETTINGS_NAME, settings)
    atomic_write_json(tmp / STATE_NAME, state.to_json())
    if parts.ema is not None:
        save_file(parts.ema.state_tensors(), str(tmp / EMA_WEIGHTS_NAME))
        atomic_write_json(tmp / EMA_STATE_NAME, {**parts.ema.state_info(), "rank_digests": ema_digests})
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    pieces = {"model": [n for n in names if n.startswith("model") and n.endswith(".safetensors")],
              "optimizer": [n for n in names if n.startswith("optimizer")],
              "rng": [n for n in names if n.startswith("random_states_")],
              "scaler": [n for n in names if n.startswith("scaler")],
              "scheduler": [SCHEDULER_NAME], "settings": [SETTINGS_NAME], "trainer_state": [STATE_NAME]}
    if parts.ema is not None:
        pieces["ema"] = [EMA_STATE_NAME, EMA_WEIGHTS_NAME]
    write_marker(tmp, pieces, time=time.time(), finite=True)
    fsync_dir(tmp)


def _ema_rank_digests(accelerator: Accelerator, ema: ModelEMA | None, final: Path) -> list[str]:
    """Every rank's digest of its EMA weights (one gather); CheckpointError on every rank if they differ.

    The ranks' averages are equal by construction (see :mod:`distdet.training.ema`) and the
    checkpoint keeps the main process's only, so a difference would go unnoticed otherwise.
    """
    if ema is None:
        return []
    digests = [parameters_digest(ema.state_tensors().items())]
    if accelerator.num_processes > 1:
        digests = gather_object(digests)
    if len(set(digests)) > 1:
        raise CheckpointError(f"not saving checkpoint {final}: the ranks' EMA weights differ (SHA-256 "
                              + ", ".join(f"rank{r} {d[:12]}" for r, d in enumerate(digests)) + ")")
    return digests


def _collective_write(accelerator: Accelerator, tmp: Path, final: Path, write) -> None:
    """Run ``write`` on this rank; if it fails on any rank, remove ``tmp`` and raise on every rank."""
    error: BaseException | None = None
    try:
        write()
    except (OSError, RuntimeError, ValueError, TypeError) as exc:  # TypeError: state that is not JSON
        error = exc
    if not agree_any(accelerator, [error is not None])[0]:
        return
    free_during = shutil.disk_usage(tmp.parent).free
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    raise CheckpointError(_save_failure_message(final, tmp, error, free_during)) from error


def _save_failure_message(final: Path, tmp: Path, error: BaseException | None, free_during: int) -> str:
    cause = write_failure_cause(error, free_during) if error is not None else "another rank failed to write its part"
    previous = latest_checkpoint(final.parent.parent)
    return (f"cannot save checkpoint {final}: {cause} ({shutil.disk_usage(tmp.parent).free} bytes free in "
            f"{tmp.parent} after removing the partial {tmp.name}; {free_during} when the write failed); "
            f"the previous checkpoint {previous or '(none)'} is kept")


def _prune(folder: Path, current: Path, keep: int) -> None:
    current_step = checkpoint_step(current)
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith((".tmp_", ".old_")):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and (checkpoint_step(path) if checkpoint_step(path) is not None else -1) > current_step:
            logger.warning("removing checkpoint %s: newer than the run's current step %d", path, current_step)
            shutil.rmtree(path, ignore_errors=True)
    protected = _resumed_from(folder)
    for path in complete_checkpoints(folder.parent)[:-keep]:
        if path.name == protected:
            logger.info("keeping %s: the checkpoint this run resumed from", path)
            continue
        shutil.rmtree(path, ignore_errors=True)


def _resumed_from(folder: Path) -> str | None:
    """The name of the checkpoint the current run resumed from (see :data:`RESUMED_NAME`), if any."""
    try:
        name = read_json(folder / RESUMED_NAME, "resume note").get("checkpoint")
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def read_settings(path: Path) -> dict[str, Any]:
    """The ``run_settings.json`` of checkpoint ``path``."""
    return load_json_piece(path / SETTINGS_NAME, "run settings")


def load_checkpoint(accelerator: Accelerator, path: Path, parts: Trainables, settings: dict[str, Any],
                    deterministic: bool) -> TrainerState:
    """Restore model, optimizer, scheduler, scaler and this rank's RNG states from ``path``.

    Every rank calls this, after the main process verified the checksums. Nothing is unpickled
    (see :mod:`distdet.training.checkpoint_files`); a file that cannot be read raises
    CheckpointError naming it, and the loaded weights and optimizer state must be finite.
    ``settings`` are the current run's (:func:`~distdet.training.resume_settings.run_settings`),
    compared with the checkpoint's before anything is loaded. The optimizer's hyperparameters are
    the saved ones afterwards (:func:`~distdet.training.resume_settings.apply_hyperparameters`
    puts the current flags' back).
    """
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete or not a checkpoint")
    state = TrainerState.from_file(path / STATE_NAME)
    marker = read_marker(path)
    compare_settings(path, read_settings(path), settings)
    error = None
    try:
        _load_model(accelerator, path, parts.model)
        _load_ema(path, marker, parts.ema, accelerator.unwrap_model(parts.model))
        _load_optimizer(path, parts.optimizer)
        scheduler_state = load_json_piece(path / SCHEDULER_NAME, "scheduler state")
        try:
            parts.scheduler.load_state_dict(scheduler_state)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: {SCHEDULER_NAME} is not a scheduler state: {exc}") from exc
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(load_tensor_file(path / "scaler.pt"))
        _load_rng(path, marker, accelerator.process_index, deterministic)
    except CheckpointError as exc:
        error = exc
    if agree_any(accelerator, [error is not None])[0]:
        raise error or CheckpointError(f"checkpoint {path}: another rank could not load its part")
    check_finite(accelerator, parts, f"checkpoint {path} loaded")
    if accelerator.is_main_process:
        atomic_write_json(path.parent / RESUMED_NAME, {"checkpoint": path.name, "time": time.time()})
    return state


def _load_model(accelerator: Accelerator, path: Path, model: torch.nn.Module) -> None:
    weights = load_safetensors(path / "model.safetensors")
    try:
        accelerator.unwrap_model(model).load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: model.safetensors does not fit the model being trained "
                              f"({str(exc).splitlines()[0]})") from exc


def _load_ema(path: Path, marker: dict[str, Any], ema: ModelEMA | None, model: torch.nn.Module) -> None:
    """Restore the EMA from the checkpoint's ``ema`` piece; with or without one on only one side, warn and
    go on: start the EMA from the resumed ``model`` (ramp included), or continue without an EMA."""
    saved = bool(piece_files(marker, "ema"))
    if ema is None:
        if saved:
            info = load_json_piece(path / EMA_STATE_NAME, "EMA state")
            logger.warning("checkpoint %s holds EMA weights (decay %s, update count %s) but --ema-decay is not set: "
                           "training goes on without an EMA, and best/ and model.pt will hold the raw weights; "
                           "resume with --ema-decay %s to keep averaging", path, info.get("decay"),
                           info.get("updates"), info.get("decay"))
        return
    if not saved:
        logger.warning("checkpoint %s holds no EMA weights (saved without --ema-decay): the EMA starts from the "
                       "resumed weights, its ramp from update 0", path)
        ema.restart_from(model)
        return
    info, tensors = load_json_piece(path / EMA_STATE_NAME, "EMA state"), load_safetensors(path / EMA_WEIGHTS_NAME)
    try:
        ema.load(tensors, info)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {EMA_WEIGHTS_NAME}/{EMA_STATE_NAME}: {exc}") from exc
    if (info.get("decay"), info.get("tau")) != (ema.decay, ema.tau):
        logger.warning("checkpoint %s: the EMA (update count %d, saved with decay %s, tau %s) continues with "
                       "--ema-decay %g --ema-tau %g", path, ema.updates, info.get("decay"), info.get("tau"),
                       ema.decay, ema.tau)


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    saved = load_tensor_file(path / "optimizer.bin")
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path}: optimizer.bin is not a state of this optimizer: {exc}") from exc


def _load_rng(path: Path, marker: dict[str, Any], rank: int, deterministic: bool) -> None:
    """Restore this rank's RNG states. A rank the checkpoint has no state for (another process
    count) warns; an unreadable state breaks exact resume: warn, or refuse under ``--deterministic``
    (Accelerate itself skips such a file without a word)."""
    name = f"random_states_{rank}.pkl"
    if name not in piece_files(marker, "rng"):
        logger.warning("checkpoint %s has no %s (saved with other ranks); this rank's random streams restart "
                       "from the seed", path, name)
        return
    try:
        states = load_tensor_file(path / name)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        message = str(exc) if isinstance(exc, CheckpointError) else f"checkpoint {path}: {name} is not an RNG state ({exc})"
        if deterministic:
            raise CheckpointError(f"{message}; --deterministic cannot resume exactly without it") from exc
        logger.warning("%s; random streams continue from the seed, so this resume is not exact", message)
