"""Keep freed memory in the process on CPU (``--malloc``): glibc's malloc told to reuse its blocks.

A CPU training step of Faster R-CNN allocates and frees activation buffers of tens of MiB.
glibc serves blocks above its mmap threshold (at most 32 MiB, whatever it is set to) with a
fresh ``mmap`` and unmaps them on ``free``, and trims its heap top back to the kernel, so every
step faults the same gigabytes in again, page by page, each page zeroed by the kernel. Measured
on the real recipe (``configs/facemask_lite0_cpu.yaml``, 2 cores, ``benchmarks/step_gap.py``,
benchmarks/RESULTS.md): about 740,000 minor page faults and 1.8 s of kernel time per step of
5.3 s; with ``keep`` about 11,000 faults, 0.05 s of kernel time and 3.65 s per step.

``keep`` (the default) sets ``M_MMAP_MAX`` to 0 (every block comes from glibc's heaps, where
freed memory is reused) and ``M_TRIM_THRESHOLD`` to its maximum (the heap is never shrunk).
**The price is memory**: freed blocks do not always fit the next requests, so the heap grows
past what a step needs. Measured on the real recipe (1 torch thread,
two runs side by side, benchmarks/RESULTS.md): 3.4 GB resident after a minute, 8.0-9.3 GB after
150-300 steps, of which ~0.7 GB was in use between steps (glibc's ``malloc_stats``). Handing
the free pages back (``malloc_trim(0)``) does not bound it: measured at step 150, resident
memory fell from 8.0 to 3.4 GB and was back at 6.3 GB two steps later, 8.0 GB within a minute.
It matters in one place, a fork: a DataLoader worker forked from such a process allocates
into the parent's free blocks, so each page it touches is copied; two recipe runs on a
24-GiB machine were killed for memory when the evaluation's worker forked after the second
epoch. :func:`release_free_memory` (``malloc_trim(0)``) is therefore called right before every
evaluation the trainer runs, so the worker forks from a process whose free pages are gone.
Where memory is short (several runs on one machine, little RAM), take ``system``: the C
library's defaults (3.6-4.0 GB peak over 20-step runs of the recipe, against 3.9-5.4 GB with
``keep``; whole runs with ``system`` were not measured). Off glibc (macOS, musl)
or where another allocator was preloaded (``LD_PRELOAD``), ``keep`` changes nothing and says so
in the log. CUDA memory is PyTorch's caching allocator's business and is not affected.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

from distdet.runtime.options import MALLOC_MODES

logger = logging.getLogger(__name__)

# mallopt() parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 means "never trim".
NEVER = -1
_kept_by: ctypes.CDLL | None = None  # the C library, once ``keep`` is in effect in this process


def apply_malloc(mode: str) -> bool:
    """Apply ``mode`` (one of :data:`MALLOC_MODES`) to this process; True if glibc took the settings."""
    if mode not in MALLOC_MODES:
        raise ValueError(f"--malloc must be one of {', '.join(MALLOC_MODES)}, got {mode!r}")
    if mode == "system":
        return False
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD"):
        logger.info("--malloc keep: not applied (%s)", "LD_PRELOAD is set" if sys.platform.startswith("linux")
                    else f"no glibc on {sys.platform}")
        return False
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("--malloc keep: not applied (the C library %s has no mallopt)", libc_name)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER))
    if not applied:
        logger.info("--malloc keep: the C library refused the settings; its defaults stay")
        return False
    global _kept_by
    _kept_by = libc
    return True


def release_free_memory() -> bool:
    """Return the heap's free pages to the kernel when ``keep`` is in effect in this process
    (``malloc_trim(0)``); True if some memory was released. Without ``keep`` this does nothing:
    glibc's defaults trim on their own."""
    if _kept_by is None:
        return False
    trim = _kept_by.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
