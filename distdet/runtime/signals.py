"""Stopping cleanly on SIGUSR1/SIGTERM, and asking Slurm to requeue the job.

Slurm sends SIGUSR1 before a job's time limit (``--signal=USR1@SECONDS``) and SIGTERM when it
preempts a job; torchrun/accelerate launch forward SIGTERM to every rank. The handler only sets
a flag: the training loop checks it at each step boundary, all ranks agree (an all-reduce)
to stop at the same step, save a complete checkpoint and exit with :data:`EXIT_INTERRUPTED`.

Schedulers often signal the whole process group (Slurm at the time limit, ``scancel``,
``kill -- -PGID``), DataLoader workers included. PyTorch's workers die on a SIGTERM that does
not come from their parent, and the main process then fails on "DataLoader worker ... killed"
before it can checkpoint; :func:`ignore_stop_signals_in_worker` (a ``worker_init_fn``) leaves
both signals to the main process, which shuts its workers down itself.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

logger = logging.getLogger(__name__)

#: Exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL: try again).
EXIT_INTERRUPTED = 75
HANDLED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records the first stop signal received; install in the main thread."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "StopRequest":
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGUSR1/SIGTERM (see the module docstring).

    A worker still exits when its loader is shut down, and on its own when the main process
    is gone (PyTorch's worker watchdog); SIGKILL still ends it.
    """
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str, timeout_s: float = 60.0) -> tuple[bool, str]:
    """Run ``scontrol requeue JOB_ID``; return (succeeded, what scontrol said or why it failed)."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"scontrol requeue {job_id} failed: {exc}"
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        return False, f"scontrol requeue {job_id} exited with {done.returncode}: {output}"
    return True, output or f"job {job_id} requeued"
