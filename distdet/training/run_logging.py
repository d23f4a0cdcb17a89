"""What a run reports, written by the main process only.

- ``metrics.jsonl``: one JSON object per line (``kind`` = ``train`` or ``eval``), appended;
- ``events.jsonl``: start, resume, interruption, bad-step and finish notes;
- the same scalars, and the run config, through Accelerate's experiment trackers
  (``--report-to``, see :func:`resolve_trackers`): TensorBoard (``<run>/tensorboard``),
  Weights & Biases (``<run>/wandb``), MLflow (``<run>/mlruns`` unless ``MLFLOW_TRACKING_URI``
  names another store);
- a tqdm progress bar (epoch, step, loss, lr, images/s, ETA) on stderr.

Other ranks log warnings and errors only, each line prefixed with its rank.
"""
from __future__ import annotations

import importlib.util
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
#: ``--report-to`` values: one tracker, every installed one, or none.
REPORT_TO = ("tensorboard", "wandb", "mlflow", "all", "none")
#: The module each tracker needs, and the pip package that provides it.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "mlflow": ("mlflow", "mlflow-skinny")}


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
        """``trackers``: names from :func:`resolve_trackers` (empty: metrics.jsonl only)."""
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


def resolve_trackers(report_to: str, tensorboard: bool = True) -> list[str]:
    """The trackers a run reports to: ``report_to`` (a :data:`REPORT_TO` value) without
    TensorBoard when ``tensorboard`` is False (the older ``--no-tensorboard`` flag).

    ``all`` means every tracker whose package is installed (as Accelerate's ``log_with="all"``);
    a tracker named on its own whose package is missing is a ValueError naming the flag and the
    package, because Accelerate would drop it silently.
    """
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none":
        return []
    installed = [name for name, (module, _) in TRACKER_MODULES.items() if importlib.util.find_spec(module)]
    if report_to == "all":
        names = installed
    elif report_to in installed:
        names = [report_to]
    else:
        raise ValueError(f"--report-to {report_to} needs the {TRACKER_MODULES[report_to][1]} package: "
                         f"pip install 'distdet[trackers]' (or choose another --report-to)")
    return [name for name in names if tensorboard or name != "tensorboard"]


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
