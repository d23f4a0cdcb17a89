"""What a run reports, written by the main process only.

- ``metrics.jsonl``: one JSON object per line (``kind`` = ``train`` or ``eval``), appended;
- ``events.jsonl``: start, resume, interruption, bad-step and finish notes;
- TensorBoard scalars through Accelerate's tracker (``<run>/tensorboard``);
- a tqdm progress bar (epoch, step, loss, lr, images/s, ETA) on stderr.

Other ranks log warnings and errors only, each line prefixed with its rank.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import filter_trackers
from tqdm.auto import tqdm

from distdet.io_utils import append_line, atomic_write

METRICS_NAME = "metrics.jsonl"
EVENTS_NAME = "events.jsonl"
TRACKER_PROJECT = "tensorboard"


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

    def __init__(self, accelerator: Accelerator, run_dir: Path, use_tensorboard: bool, config: dict[str, Any]) -> None:
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.active = accelerator.is_main_process
        self.tensorboard = use_tensorboard
        if use_tensorboard:
            # The run folder is known only after the Accelerator exists (it is decided on the main
            # process and broadcast), so the tracker is attached here; it lives on the main process.
            accelerator.project_configuration.set_directories(str(self.run_dir))
            accelerator.log_with = filter_trackers("tensorboard", str(self.run_dir))
            accelerator.init_trackers(TRACKER_PROJECT, config=_tb_hparams(config))

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if not self.active:
            return
        append_line(self.run_dir / name, json.dumps(record, default=str))

    def metrics(self, kind: str, step: int, values: dict[str, Any], **extra: Any) -> None:
        """Append a metrics record and send its numbers to TensorBoard under ``kind/``."""
        self._append(METRICS_NAME, {"kind": kind, "step": step, "time": time.time(), **extra, **values})
        if self.tensorboard and self.active:
            scalars = {f"{kind}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))}
            self.accelerator.log(scalars, step=step)

    def drop_metrics_after(self, step: int) -> int:
        """Remove the records of steps after ``step`` from ``metrics.jsonl`` (a resume rolled them back,
        so plots and ``results.csv`` show each step once); return how many were removed."""
        path = self.run_dir / METRICS_NAME
        if not self.active or not path.is_file():
            return 0
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) < len(lines):
            atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))
        return len(lines) - len(kept)

    def event(self, event: str, **details: Any) -> None:
        self._append(EVENTS_NAME, {"event": event, "time": time.time(), **details})


def _record_step(line: str) -> float:
    """The step of a metrics line; a line that is not a record with a step is kept (-inf)."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return float("-inf")
    return step if isinstance(step, (int, float)) else float("-inf")


def _tb_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The flat scalar part of the config, as TensorBoard's hparams accept."""
    return {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}


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
