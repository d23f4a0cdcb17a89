"""The checks an untrusted dataset file passes before it is opened.

A FIFO or device named like an image or annotation would make a read block or never end, and
an oversized file would be read into memory whole: every file is ``stat``-ed first and must be
a regular file (of bounded size where the reader asks for it).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from distdet.data.problems import DataError, ProblemKind


def stat_regular_file(path: Path, what: str, stat_error: ProblemKind = ProblemKind.NOT_A_FILE) -> os.stat_result:
    """``os.stat(path)`` of a regular file; :class:`DataError` naming ``path`` and ``what`` it is
    otherwise (``stat_error`` when it cannot be stat-ed, ``NOT_A_FILE`` when it is not regular)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError.single(stat_error, path, f"cannot stat {what}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError.single(ProblemKind.NOT_A_FILE, path, f"{what} is not a regular file")
    return st


def read_untrusted_bytes(path: Path, max_bytes: int, what: str = "file") -> bytes:
    """Read a regular file of at most ``max_bytes``; raise :class:`DataError` otherwise."""
    size = stat_regular_file(path, what).st_size
    if size > max_bytes:
        raise DataError.single(ProblemKind.OVERSIZED_FILE, path, f"{what} is {size} bytes, the limit is {max_bytes}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise DataError.single(ProblemKind.NOT_A_FILE, path, f"cannot read {what}: {exc.strerror}") from None
    if len(data) > max_bytes:  # grew since stat
        raise DataError.single(ProblemKind.OVERSIZED_FILE, path, f"{what} is larger than the limit of {max_bytes} bytes")
    return data
