"""``--malloc keep``: freed large blocks are reused instead of being faulted in again (issue 17), and
``release_free_memory`` hands the freed pages back when asked (the trainer asks before it evaluates)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support.trainer import FAST, check_ok, make_tiny_dataset, run, train_command

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")

# Allocate, touch and free a 64 MiB block ten times, after five warm-up rounds (in which glibc's
# heap grows until the aligned request fits a freed block); print the minor page faults of the ten
# rounds. glibc maps such a block fresh each time unless told to keep it.
FAULTS = """
import resource, sys
import torch
from distdet.runtime.malloc import apply_malloc
applied = apply_malloc(sys.argv[1])
def touch():
    block = torch.empty(64 * 2**20, dtype=torch.uint8)  # torch's CPU allocator: glibc's posix_memalign
    block[::4096] = 1
    del block
for _ in range(5):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}).stdout.split()
    return out[0], int(out[1])


def test_keep_reuses_freed_blocks_and_system_faults_them_in_again():
    applied, kept = _faults("keep")
    not_applied, system = _faults("system")
    assert (applied, not_applied) == ("True", "False")
    pages = 10 * 64 * 2**20 // 4096
    assert system > pages * 0.9, system  # every round faulted its 16,384 pages in again
    assert kept < pages * 0.25, kept  # at most 2 of the 10 rounds (the heap may still grow once)


# Touch 64 blocks of 8 MiB, free all but the last one (so the heap cannot simply shrink from its
# top), then release; print the resident MiB before and after.
RELEASE = """
import sys
import torch
from distdet.runtime.malloc import apply_malloc, release_free_memory
def resident_mib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) // 1024
applied = apply_malloc(sys.argv[1])
blocks = [torch.ones(2 * 2**20) for _ in range(64)]
last = blocks[-1]
del blocks
before = resident_mib()
released = release_free_memory()
print(applied, released, before, resident_mib())
"""


def _release(mode: str) -> tuple[str, str, int, int]:
    out = subprocess.run([sys.executable, "-c", RELEASE, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}).stdout.split()
    return out[0], out[1], int(out[2]), int(out[3])


def test_release_hands_the_kept_free_memory_back():
    applied, released, before, after = _release("keep")
    assert (applied, released) == ("True", "True")
    assert before - after > 400, (before, after)  # the 63 freed blocks (504 MiB) were held, then returned
    applied, released, before, after = _release("system")
    assert (applied, released) == ("False", "False")  # glibc returned them on free already
    assert abs(before - after) < 50, (before, after)


def test_bad_mode_is_refused():
    from distdet.runtime.malloc import apply_malloc

    with pytest.raises(ValueError, match="--malloc must be one of keep, system"):
        apply_malloc("jemalloc")


def test_train_records_the_setting_and_rejects_a_bad_value(tmp_path):
    data = str(make_tiny_dataset(tmp_path))
    bad = run(train_command([*FAST, "--data-dir", data, "--output-dir", str(tmp_path / "bad"), "--malloc", "tcmalloc"]))
    assert bad.returncode == 2 and "--malloc" in bad.stderr and "tcmalloc" in bad.stderr
    check_ok(run(train_command([*FAST, "--data-dir", data, "--output-dir", str(tmp_path / "run"), "--malloc", "system",
                                "--max-steps", "1"])))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["malloc"] == "system"
