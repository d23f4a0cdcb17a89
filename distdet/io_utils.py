"""Writing files so that a crash mid-write never leaves a half-written file behind."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class WriteFailed(OSError):
    """A file could not be written; the message names it and the cause (disk full: the bytes free)."""


def write_failure_cause(error: BaseException | None, free_during: int) -> str:
    """What made a write fail. torch's disk-full error ("enforce fail at inline_container ...")
    names neither the cause nor the file, so a disk left with under 1 MiB is taken as full."""
    text = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else type(error).__name__
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or free_during < (1 << 20):
        return f"No space left on device [{text}]"
    return text


def write_failed(path: Path, error: BaseException, free_during: int) -> WriteFailed:
    """The error for a failed write of ``path``: the cause and the bytes now free."""
    return WriteFailed(f"cannot write {path}: {write_failure_cause(error, free_during)} "
                       f"({shutil.disk_usage(path.parent).free} bytes free in {path.parent})")


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path``; raise :class:`WriteFailed` naming it if that fails."""
    try:
        with open(path, "a") as handle:
            handle.write(line + "\n")
    except OSError as exc:
        raise write_failed(path, exc, shutil.disk_usage(path.parent).free) from exc


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then rename.

    Readers see either the old file or the complete new one, never a partial file. A failed
    write raises :class:`WriteFailed` naming ``path``, the cause and the bytes free.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        free_during = shutil.disk_usage(path.parent).free
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc, free_during) from exc
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def read_json(path: str | Path, what: str) -> Any:
    """Parse the JSON file ``path``; raise ValueError naming ``what`` and the file if it cannot."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc


def fsync_dir(directory: str | Path) -> None:
    """Flush a folder's entries (a rename) to disk where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
