"""Trainer on 2 real CPU processes (gloo) under accelerate launch.

Every test asserts that the run really had 2 ranks (the resolved world size in config.json,
per-rank RNG files in checkpoints), since some launch spellings silently start one process.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from distdet.training.checkpoints import latest_checkpoint
from support.trainer import (
    FAST, assert_same_weights, check_ok, child_env, launch_command, load_weights, make_tiny_dataset, read_jsonl,
    run, wait_for, worker_pids,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def _assert_two_ranks(run_dir: Path) -> None:
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["world_size"] == 2
    checkpoint = latest_checkpoint(run_dir)
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()


def test_two_processes_shard_log_once_skip_nan_and_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    done = check_ok(run(launch_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "2",
                                        "--debug-record-samples", "--tensorboard", "--debug-nan-at-step", "1",
                                        "--debug-nan-rank", "1"])))
    _assert_two_ranks(out)
    train_ids = range(len(json.loads((out / "split.json").read_text())["train"]))  # 9 images
    samples = {r: read_jsonl(out / "debug" / f"samples_rank{r}.jsonl") for r in (0, 1)}
    for epoch in (0, 1):
        seen = {r: [i for rec in samples[r] if rec["epoch"] == epoch for i in rec["image_ids"]] for r in (0, 1)}
        assert len(seen[0]) == len(seen[1]) == 5  # 9 images over 2 ranks: one padded repeat
        counts = Counter(seen[0] + seen[1])
        assert set(counts) == set(train_ids)
        assert sorted(counts.values()) == [1] * 8 + [2]
        assert not set(seen[0]) & set(seen[1]) - {i for i, c in counts.items() if c == 2}
    assert samples[0][0]["image_ids"] != [i for rec in samples[0] if rec["epoch"] == 1 for i in rec["image_ids"]][:2] \
        or samples[1][0]["image_ids"] != [i for rec in samples[1] if rec["epoch"] == 1 for i in rec["image_ids"]][:2]

    # the NaN on rank 1 at step 1 was skipped on both ranks, and reported with rank 1's components
    bad = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "bad_step"]
    assert len(bad) == 1 and bad[0]["global_step"] == 1 and list(bad[0]["components"]) == ["rank1"]
    report = json.loads((out / "report.json").read_text())
    assert report["global_step"] == 6 and report["updates"] == 5 and report["world_size"] == 2

    # logs only from rank 0: one metrics line per step, one start event, no INFO from rank 1
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert "loss" not in train[1]  # the skipped step has no losses to report
    assert all(math.isfinite(r["loss"]) for r in train if r["step"] != 2)
    assert [e["event"] for e in read_jsonl(out / "events.jsonl")].count("started") == 1
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) >= 1
    assert "[rank 0/2] INFO" in done.stderr and "[rank 1/2] INFO" not in done.stderr
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not {p for p in written if "rank1" in p or "rank_1" in p} - {"debug/samples_rank1.jsonl"}

    check_ok(run(launch_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "3",
                                 "--resume", "auto"])))
    resumed = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["global_step"] == 6 and resumed[0]["world_size"] == 2
    assert latest_checkpoint(out).name == "step_000009"


def test_two_process_deterministic_resume_with_accumulation_is_bit_identical(data_dir, tmp_path):
    """2 ranks, 2 batches per step: 4 steps straight == 1 step (mid-epoch), stop, resume to 4."""
    common = [*FAST, "--data-dir", str(data_dir), "--epochs", "3", "--deterministic", "--grad-accum-steps", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    check_ok(run(launch_command([*common, "--output-dir", str(straight), "--max-steps", "4"])))
    check_ok(run(launch_command([*common, "--output-dir", str(split), "--max-steps", "1"])))
    state = json.loads((latest_checkpoint(split) / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["world_size"]) == (0, 1, 2)
    check_ok(run(launch_command([*common, "--output-dir", str(split), "--max-steps", "4", "--resume", "auto"])))
    _assert_two_ranks(straight)
    assert_same_weights(load_weights(straight), load_weights(split))


def _fake_scontrol(folder: Path) -> Path:
    """An ``scontrol`` on PATH that records its arguments (the real one needs a Slurm cluster)."""
    folder.mkdir()
    log = folder / "calls.txt"
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


def _start_long_run(data_dir: Path, out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(launch_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out),
                                            "--epochs", "100"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(**env),
                            start_new_session=True)


def _wait_until_training(proc: subprocess.Popen, out: Path, steps: int = 2) -> dict[int, int]:
    metrics = out / "metrics.jsonl"
    wait_for(lambda: proc.poll() is not None or (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps),
             timeout=300, what=f"{steps} logged steps")
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    pids = worker_pids(proc.pid)
    assert sorted(pids) == [0, 1], pids
    return pids


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_sigusr1_to_one_rank_stops_all_checkpoints_requeues_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    calls = _fake_scontrol(tmp_path / "bin")
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{calls.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = _start_long_run(data_dir, out, **env)
    try:
        pids = _wait_until_training(proc, out)
        os.kill(pids[1], signal.SIGUSR1)  # only rank 1 hears it; the ranks agree to stop together
        output, _ = proc.communicate(timeout=180)
    finally:
        _stop(proc)
    assert proc.returncode != 0  # the launcher reports the workers' exit status 75 as a failure
    notes = json.loads((out / "interruptions.json").read_text())
    assert len(notes) == 1 and notes[0]["signals"] == {"rank1": "SIGUSR1"}
    assert notes[0]["requeued"] is True and notes[0]["slurm_job_id"] == "4242"
    assert calls.read_text().split() == ["requeue", "4242"]
    _assert_two_ranks(out)
    stopped_at = notes[0]["global_step"]
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["global_step"] == stopped_at
    assert [e["event"] for e in read_jsonl(out / "events.jsonl")][-1] == "interrupted"

    check_ok(run(launch_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "100",
                                 "--resume", "auto", "--max-steps", str(stopped_at + 2)])))
    resumed = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "resumed"]
    assert resumed[-1]["global_step"] == stopped_at
    assert latest_checkpoint(out).name == f"step_{stopped_at + 2:06d}"


def test_sigterm_to_launcher_checkpoints_on_every_rank(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = _start_long_run(data_dir, out)
    try:
        _wait_until_training(proc, out)
        proc.send_signal(signal.SIGTERM)  # what a preempting scheduler does; torchrun forwards it
        proc.communicate(timeout=180)
    finally:
        _stop(proc)
    notes = json.loads((out / "interruptions.json").read_text())
    assert notes[-1]["signals"] == {"rank0": "SIGTERM", "rank1": "SIGTERM"}
    assert notes[-1]["requeued"] is False
    _assert_two_ranks(out)
    assert json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["global_step"] == notes[-1]["global_step"]


def _signal_rank1_and_wait(proc: subprocess.Popen, out: Path, signum: int, timeout: float) -> tuple[str, float]:
    """Once training runs, send ``signum`` to rank 1; return the job's output and seconds until it ended."""
    try:
        pids = _wait_until_training(proc, out)
        os.kill(pids[1], signum)
        start = time.monotonic()
        output, _ = proc.communicate(timeout=timeout)
        return output, time.monotonic() - start
    finally:
        _stop(proc)


def test_killed_rank_ends_the_job_quickly_and_is_named(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = _start_long_run(data_dir, out)
    output, elapsed = _signal_rank1_and_wait(proc, out, signal.SIGKILL, timeout=120)
    assert proc.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end after a rank died"
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", output), output[-4000:]
    assert "Signal 9 (SIGKILL)" in output or "exitcode  : -9" in output


@pytest.mark.slow
def test_hung_rank_times_out_within_dist_timeout(data_dir, tmp_path):
    """A rank that stops answering (SIGSTOP) makes the other fail after --dist-timeout, not 30 min."""
    out = tmp_path / "run"
    proc = subprocess.Popen(launch_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out),
                                            "--epochs", "100", "--dist-timeout", "10"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                            start_new_session=True)
    output, elapsed = _signal_rank1_and_wait(proc, out, signal.SIGSTOP, timeout=150)
    assert proc.returncode != 0
    # 10 s collective timeout on rank 0, then the launcher's 30 s grace before it kills the stopped rank
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end after a rank hung"
    assert "rank 0 of 2: a collective operation failed" in output
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", output)
