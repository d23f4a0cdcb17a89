"""End to end on a real one-node Slurm: the single-node sbatch script trains with 2 CPU
processes on synthetic data; a job warned with SIGUSR1 mid-training checkpoints, requeues,
resumes and ends with the same weights as an uninterrupted run; a job requeued with another
process count resumes mid-epoch on it; a rank killed mid-training fails the job quickly, naming
the rank."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

from collections import Counter

import pytest
import torch

from support.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
SINGLE_NODE = REPO / "launch" / "slurm" / "single_node.sbatch"
TRAIN_SCRIPT = REPO / "train.py"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
if not TRAIN_SCRIPT.is_file():
    pytest.skip(f"{TRAIN_SCRIPT} is not in this checkout (the trainer is not merged)", allow_module_level=True)

# A small model on tiny images, deterministic: ~2 s per step with 2 processes on 2 cores.
TRAIN_ARGS = [
    "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "none",
    "--min-size", "96", "--max-size", "128", "--batch-size", "2", "--workers", "0",
    "--split", "stratified", "--eval-every", "0", "--no-final-eval", "--no-tensorboard", "--no-progress",
    "--log-every", "1", "--deterministic", "--seed", "3",
]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    from distdet.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", num_images=20, seed=5,
                                  image_size=(128, 96), face_size=(20, 60))


def _submit(cluster: SlurmCluster, run_dir: Path, *train_args: str, script: Path = SINGLE_NODE,
            sbatch_options: tuple[str, ...] = ()) -> str:
    env = {
        "DISTDET_PYTHON": sys.executable,
        "DISTDET_CPU_PROCS": "2",
        "DISTDET_OUTPUT_DIR": str(run_dir),
        "PYTHONPATH": str(REPO),
    }
    result = cluster.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15", *sbatch_options,
         "-o", str(run_dir.parent / f"{run_dir.name}.slurm.out"), str(script), *train_args],
        env=env, cwd=REPO,
    )
    return result.stdout.strip().split(";")[0]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _node_log(run_dir: Path) -> str:
    path = run_dir / "logs" / "node0.log"
    return path.read_text()[-4000:] if path.exists() else "(no node log)"


def _wait_for_step(cluster: SlurmCluster, job_id: str, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("kind") == "train" and r["step"] >= step for r in _jsonl(run_dir / "metrics.jsonl")):
        state = cluster.job_field(job_id, "JobState")
        assert state in ("PENDING", "RUNNING"), f"job {job_id} {state} before step {step}\n{_node_log(run_dir)}"
        assert time.monotonic() < deadline, f"no training step {step} after {timeout}s\n{_node_log(run_dir)}"
        time.sleep(0.3)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def test_single_node_script_trains_two_cpu_processes_and_writes_metrics(slurm_cluster: SlurmCluster,
                                                                         synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    job_id = _submit(slurm_cluster, run_dir, "--data-dir", str(synthetic_dir), "--epochs", "2", *TRAIN_ARGS)
    state, exit_code = slurm_cluster.wait_for_job(job_id, timeout=400)
    assert (state, exit_code) == ("COMPLETED", "0:0"), _node_log(run_dir)
    train = [r for r in _jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    events = _jsonl(run_dir / "events.jsonl")
    assert events[0]["event"] == "started" and events[0]["world_size"] == 2
    assert events[0]["slurm_job_id"] == job_id
    assert events[-1]["event"] == "finished"
    assert (run_dir / "model.pt").is_file() and (run_dir / "model_card.json").is_file()
    assert (run_dir / "logs" / "node0.log").is_file() and (run_dir / "logs" / "batch.log").is_file()


def test_usr1_mid_training_requeues_resumes_and_matches_an_uninterrupted_run(slurm_cluster: SlurmCluster,
                                                                            synthetic_dir, tmp_path):
    args = ["--data-dir", str(synthetic_dir), "--epochs", "3", *TRAIN_ARGS]
    straight_dir, warned_dir = tmp_path / "straight", tmp_path / "warned"
    straight = _submit(slurm_cluster, straight_dir, *args)
    assert slurm_cluster.wait_for_job(straight, timeout=400) == ("COMPLETED", "0:0"), _node_log(straight_dir)

    warned = _submit(slurm_cluster, warned_dir, *args)
    _wait_for_step(slurm_cluster, warned, warned_dir, step=2)  # mid-epoch: 4 steps per epoch here
    # What --signal=USR1@120 does before the time limit: SIGUSR1 to every process of the step.
    slurm_cluster.run(["scancel", "--signal=USR1", warned])
    state, exit_code = slurm_cluster.wait_for_job(warned, timeout=400)
    assert (state, exit_code) == ("COMPLETED", "0:0"), _node_log(warned_dir)
    assert slurm_cluster.job_field(warned, "Restarts") == "1"

    events = _jsonl(warned_dir / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds.index("started") < kinds.index("interrupted") < kinds.index("resumed") < kinds.index("finished"), kinds
    interrupted = next(e for e in events if e["event"] == "interrupted")
    assert set(interrupted["signals"].values()) == {"SIGUSR1"} and interrupted["requeued"] is True
    assert 0 < interrupted["global_step"] < 12
    resumed_event = next(e for e in events if e["event"] == "resumed")
    assert resumed_event["checkpoint"] and resumed_event["global_step"] == interrupted["global_step"]
    assert (warned_dir / "interruptions.json").is_file()
    batch_log = (warned_dir / "logs" / "batch.log").read_text()
    assert f"job {warned} restart 0" in batch_log and f"job {warned} restart 1" in batch_log

    reference, resumed = _final_weights(straight_dir), _final_weights(warned_dir)
    assert reference.keys() == resumed.keys()
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ after the requeue, e.g. {different[:3]}"


def test_requeue_with_another_process_count_resumes_mid_epoch(slurm_cluster: SlurmCluster, synthetic_dir, tmp_path):
    """The requeued job comes back with 3 CPU processes instead of 2. The job script here reads
    DISTDET_CPU_PROCS from a file at each start, as a site's script deriving it from the
    allocation would; the test changes the file between the warning and the restart."""
    run_dir, procs = tmp_path / "run", tmp_path / "procs"
    procs.write_text("2")
    script = tmp_path / "changing_procs.sbatch"
    script.write_text(f'#!/bin/bash\nexport DISTDET_CPU_PROCS="$(cat {procs})"\nexec bash {SINGLE_NODE} "$@"\n')
    job = _submit(slurm_cluster, run_dir, "--data-dir", str(synthetic_dir), "--epochs", "2", *TRAIN_ARGS,
                  "--debug-record-samples", script=script, sbatch_options=("--requeue", "--open-mode=append"))
    _wait_for_step(slurm_cluster, job, run_dir, step=2)  # 16 images, 2 x 2 per step: 4 steps per epoch
    procs.write_text("3")
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    assert slurm_cluster.wait_for_job(job, timeout=600) == ("COMPLETED", "0:0"), _node_log(run_dir)
    assert slurm_cluster.job_field(job, "Restarts") == "1"

    events = _jsonl(run_dir / "events.jsonl")
    interrupted = next(e for e in events if e["event"] == "interrupted")
    assert interrupted["requeued"] is True
    epoch, steps = interrupted["epoch"], interrupted["step_in_epoch"]
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["world_size"] == 3 and resumed["global_step"] == interrupted["global_step"]
    assert next(e for e in events if e["event"] == "layout_changed")["old_layout"]["world_size"] == 2
    node_log = (run_dir / "logs" / "node0.log").read_text()
    assert (f"resuming 3 processes from a 2-process checkpoint at epoch {epoch}, step {steps}: "
            f"{16 - 4 * steps} samples left in this epoch") in node_log
    records = [r for path in (run_dir / "debug").glob("samples_rank*.jsonl") for r in _jsonl(path)]
    assert {int(p.stem[-1]) for p in (run_dir / "debug").glob("samples_rank*.jsonl")} == {0, 1, 2}
    counts = Counter(i for r in records if r["epoch"] == epoch for i in r["image_ids"])
    assert set(counts) == set(range(16))
    assert sum(counts.values()) - 16 <= 2  # only the 3-process split's padding repeats a sample


def _rank_pids(run_dir: Path) -> dict[int, int]:
    """Training processes of this run (found through /proc), by their RANK."""
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(
                item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item
            )
        except OSError:
            continue
        if str(TRAIN_SCRIPT).encode() in cmdline and str(run_dir).encode() in cmdline and b"RANK" in environ:
            pids[int(environ[b"RANK"])] = int(proc.name)
    return pids


def test_killing_one_rank_mid_training_fails_the_job_quickly_naming_the_rank(slurm_cluster: SlurmCluster,
                                                                            synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    job_id = _submit(slurm_cluster, run_dir, "--data-dir", str(synthetic_dir), "--epochs", "3", *TRAIN_ARGS)
    _wait_for_step(slurm_cluster, job_id, run_dir, step=1)
    pids = _rank_pids(run_dir)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    state, exit_code = slurm_cluster.wait_for_job(job_id, timeout=120)
    assert time.monotonic() - killed_at < 60
    assert state == "FAILED" and exit_code != "0:0"
    node_log = (run_dir / "logs" / "node0.log").read_text()
    root_cause = node_log.split("Root Cause (first observed failure)")[-1]
    assert "Root Cause" in node_log and re.search(r"rank\s*:\s*1\b", root_cause), node_log[-3000:]
    assert "SIGKILL" in root_cause
