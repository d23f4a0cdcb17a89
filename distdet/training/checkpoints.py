"""Complete, atomic training checkpoints: ``checkpoints/step_000123`` in the run folder.

A checkpoint is written by every rank with ``accelerator.save_state`` (model, optimizer,
registered scheduler, gradient scaler, each rank's RNG states) into a temporary folder
``checkpoints/.tmp_step_000123``; the main process then adds ``trainer_state.json`` (where in
training it was taken) and the completion marker ``COMPLETE``, and renames the folder into
place. A crash at any point leaves either the previous checkpoints alone or a temporary folder
that is never picked up: "latest" is the highest-step folder named ``step_<digits>`` that
holds the marker.
"""
from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distdet.io_utils import atomic_write_json, fsync_dir, read_json

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"
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
        data = read_json(path, "trainer state")
        known = {f.name for f in fields(cls)}
        missing = known - set(data) - _ADDED_LATER
        if missing:
            raise ValueError(f"trainer state {path} lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in known if k in data})


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


def resolve_resume(resume: str, output_dir: Path | None) -> tuple[Path | None, Path | None]:
    """Turn ``--resume`` into (checkpoint to load or None, run folder it implies or None).

    ``none``: nothing. ``auto``: the latest complete checkpoint of ``output_dir`` if any.
    A path: a complete checkpoint folder, or a run folder (its latest checkpoint).
    """
    if resume == "none":
        return None, None
    if resume == "auto":
        if output_dir is None:
            return None, None
        return latest_checkpoint(output_dir), None
    path = Path(resume)
    if is_complete(path):
        return path, path.parent.parent
    if (path / CHECKPOINTS_DIR).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"--resume {path}: the run folder holds no complete checkpoint")
        return latest, path
    if path.is_dir() and checkpoint_step(path) is not None:
        raise FileNotFoundError(f"--resume {path}: the checkpoint is incomplete (no {COMPLETE_MARKER} marker)")
    raise FileNotFoundError(f"--resume {path}: not a checkpoint folder or a run folder with checkpoints")


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep: int) -> Path:
    """Save a complete checkpoint of the current training state; every rank must call this.

    Returns the final folder. Keeps the newest ``keep`` checkpoints and removes leftover
    temporary folders and checkpoints newer than this one (an abandoned line of training).
    """
    folder = Path(run_dir) / CHECKPOINTS_DIR
    name = checkpoint_name(state.global_step)
    final, tmp = folder / name, folder / f".tmp_{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_NAME, state.to_json())
        atomic_write_json(tmp / COMPLETE_MARKER, {"complete": True, "time": time.time()})
        fsync_dir(tmp)
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


def _prune(folder: Path, current: Path, keep: int) -> None:
    current_step = checkpoint_step(current)
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith((".tmp_", ".old_")):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and (checkpoint_step(path) if checkpoint_step(path) is not None else -1) > current_step:
            logger.warning("removing checkpoint %s: newer than the run's current step %d", path, current_step)
            shutil.rmtree(path, ignore_errors=True)
    for path in complete_checkpoints(folder.parent)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    """Restore model, optimizer, scheduler, scaler and RNG states from ``path``; every rank calls this."""
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint {path} is incomplete or not a checkpoint")
    state = TrainerState.from_file(path / STATE_NAME)
    accelerator.load_state(str(path))
    return state
