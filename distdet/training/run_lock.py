"""One run per run folder: an exclusive ``flock`` on ``<run>/run.lock``, held by the main process.

The lock belongs to the open file, so the kernel drops it when the process ends however it
ends (exit, crash, SIGKILL, node reboot): a stale lock file from a dead process never blocks
a requeued Slurm job; only a live holder does. The file names its holder (host, pid, Slurm
job, start time) so the run that is refused can say who has the folder. (On NFS, where Linux
maps ``flock`` to a server-side lock, a lock held by a node that crashed lasts until the
server's lease for that node expires, typically 90 s.) DataLoader workers forked while the
lock is held share it and end with their parent.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "run.lock"

_held: dict[Path, int] = {}  # run folder -> open descriptor, kept for the life of the process


class RunFolderLocked(RuntimeError):
    """Another live process holds the run folder."""


def lock_run_folder(run_dir: Path) -> None:
    """Take the run folder's lock for the rest of this process's life (a no-op if already held).

    Raises RunFolderLocked naming the holder when another live process has it.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderLocked(f"run folder {run_dir} is in use by another run ({holder}); wait for it to end "
                              f"or choose another --output-dir") from None
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _held[run_dir] = fd

