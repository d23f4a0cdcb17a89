"""What a run reports, written by the main process only.

- ``metrics.jsonl``: one JSON object per line (``kind`` = ``train`` or ``eval``), appended;
- ``events.jsonl``: start, resume, interruption, bad-step and finish notes;
- the same scalars, and the run config, through Accelerate's experiment trackers
  (``--report-to``, see :mod:`distdet.training.tracker_choice`): TensorBoard (``<run>/tensorboard``),
  Weights & Biases (``<run>/wandb``), MLflow (``<run>/mlruns`` unless ``MLFLOW_TRACKING_URI``
  names another store);
- a tqdm progress bar (epoch, step, loss, lr, images/s, ETA) on stderr.

Other ranks log warnings and errors only, each line prefixed with its rank.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker
from tqdm.auto import tqdm

METRICS_NAME = "metrics.jsonl"
EVENTS_NAME = "events.jsonl"
#: The TensorBoard run's sub-folder of the run folder.
TRACKER_PROJECT = "tensorboard"
#: W&B project and MLflow experiment name, unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise.
EXPERIMENT_NAME = "distdet"


def configure_logging(rank: int, world_size: int, is_main: bool) -> None:
    """INFO on the main process, WARNING elsewhere; every line names its rank."""
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("distdet")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    root.propagate = False


class RunLog:
    """Metrics and events of one run; every method is a no-op off the main process."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, trackers: list[str], config: dict[str, Any]) -> None:
        """``trackers``: names from :func:`~distdet.training.tracker_choice.resolve_trackers`
        (empty: metrics.jsonl only)."""
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.active = accelerator.is_main_process
        self.tracking = bool(trackers) and self.active
        if self.tracking:
            # The run folder is known only after the Accelerator exists (it is decided on the main
            # process and broadcast), so the trackers are attached here, on the main process only.
            accelerator.project_configuration.set_directories(str(self.run_dir))
            accelerator.log_with = [_make_tracker(name, self.run_dir) for name in trackers]
            accelerator.init_trackers(EXPERIMENT_NAME, config=_flat_config(config))

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.run_dir / name, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")

    def metrics(self, kind: str, step: int, values: dict[str, Any], **extra: Any) -> None:
        """Append a metrics record and send its numbers to the trackers under ``kind/``."""
        self._append(METRICS_NAME, {"kind": kind, "step": step, "time": time.time(), **extra, **values})
        if self.tracking:
            scalars = {f"{kind}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))}
            self.accelerator.log(scalars, step=step)

    def event(self, event: str, **details: Any) -> None:
        self._append(EVENTS_NAME, {"event": event, "time": time.time(), **details})


def _make_tracker(name: str, run_dir: Path) -> GeneralTracker:
    """One Accelerate tracker writing under ``run_dir`` (its start() runs in init_trackers)."""
    if name == "tensorboard":
        return TensorBoardTracker(TRACKER_PROJECT, str(run_dir))
    if name == "wandb":  # WANDB_MODE=offline keeps the run on disk only (wandb sync uploads it later)
        return WandBTracker(os.environ.get("WANDB_PROJECT", EXPERIMENT_NAME), name=run_dir.name, dir=str(run_dir))
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # mlflow 3.x refuses its file store unless told (it prefers sqlite, which needs SQLAlchemy
        # and Alembic: not in mlflow-skinny); a file store in the run folder needs no server.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
    return _MLflowTracker(EXPERIMENT_NAME, run_name=run_dir.name)


def mlflow_metric_name(name: str) -> str:
    """``kind/family/metric/class`` -> ``kind/family.metric.class``: MLflow's file store keeps each
    metric as a file at its name's path, so ``test/coco/AP`` (a file) and ``test/coco/AP/with_mask``
    (a file under a folder of the same path) cannot both exist; it fails with NotADirectoryError."""
    kind, _, rest = name.partition("/")
    return f"{kind}/{rest.replace('/', '.')}" if rest else kind


class _MLflowTracker(MLflowTracker):
    """Accelerate's MLflow tracker with metric names every MLflow store accepts."""

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        super().log({mlflow_metric_name(k): v for k, v in values.items()}, step=step, **kwargs)


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as every tracker accepts it: scalars kept, lists written as text, None dropped
    (TensorBoard's hparams take only int, float, str and bool)."""
    flat = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    flat.update({k: ",".join(map(str, v)) for k, v in config.items() if isinstance(v, (list, tuple))})
    return flat


class Progress:
    """A tqdm bar over optimizer steps on the main process; nothing elsewhere."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step", file=sys.stderr) if enabled else None

    def update(self, epoch: int, epochs: int, values: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}, refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
