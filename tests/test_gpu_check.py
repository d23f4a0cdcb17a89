"""benchmarks/gpu_check.py on CPU (--dry-run), the --tf32 switch, and train_throughput.py's --recipe mode.

Every run is the real script in a child process on the tiny synthetic VOC folder; trainer rows
are real train.py runs. Nothing here is a measurement: the numbers only have to exist.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.trainer import REPO, child_env, make_tiny_dataset
from distdet.runtime.tf32 import apply_tf32

sys.path.insert(0, str(REPO / "benchmarks"))
from train_loops import trainer_throughput  # noqa: E402 - a benchmark module, not part of the package

GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"
TRAIN_THROUGHPUT = REPO / "benchmarks" / "train_throughput.py"
DRY_MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def run_script(script: Path, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(), cwd=REPO)
    return done


def dry_run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    done = run_script(GPU_CHECK, ["--dry-run", "--data-dir", str(make_tiny_dataset(tmp_path)), "--json", str(out),
                                  *extra])
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done, json.loads(out.read_text())


def rows_by(report: dict) -> dict[tuple[str, str, str], dict]:
    return {(r["precision"], r["batch"], r["loop"]): r for r in report["rows"]}


def test_dry_run_measures_both_loops_reports_cuda_rows_not_applicable_and_checks_nan(tmp_path):
    done, report = dry_run(tmp_path, "--precisions", "fp32,fp16", "--max-batch-cap", "0")
    rows = rows_by(report)
    assert set(rows) == {("fp32", "base", "bare"), ("fp32", "base", "trainer"), ("fp32", "base", "nan-check"),
                         ("fp16", "base", "bare"), ("fp16", "base", "trainer")}
    for loop in ("bare", "trainer"):
        row = rows[("fp32", "base", loop)]
        assert row["status"] == "ok" and row["images_per_s"] > 0 and 0 <= row["data_wait_frac"] < 1
        assert row["batch_size"] == 2 and row["wall_s"] > 0 and row["model"] == DRY_MODEL
        assert rows[("fp16", "base", loop)]["status"] == "not applicable on CPU"
    # the bare loop trained on the trainer's own batches
    assert rows[("fp32", "base", "trainer")]["detail"]["same_batches_as_bare"] is True
    nan = rows[("fp32", "base", "nan-check")]
    assert nan["status"].startswith("ok: step 2 reported skipped"), nan
    assert nan["detail"]["reported_skipped_steps"] == [2] and nan["detail"]["updates"] == 4
    [ratio] = report["ratios"]
    assert ratio["ratio"] == "trainer / bare" and ratio["value"] == pytest.approx(
        rows[("fp32", "base", "trainer")]["images_per_s"] / rows[("fp32", "base", "bare")]["images_per_s"])
    assert report["device"]["name"] == "CPU" and report["skipped"] == []
    table = done.stdout
    assert "not applicable on CPU" in table and "ratio trainer / bare" in table and "(identical batches: True)" in table
    assert "skipped for the budget (0): none" in table


def test_rows_that_would_overrun_the_budget_are_skipped_and_listed(tmp_path):
    done, report = dry_run(tmp_path, "--budget-s", "0")
    ran = [r for r in report["rows"] if r["images_per_s"] is not None]
    assert ran == []
    budget = [r for r in report["rows"] if r["status"].startswith("skipped: needs")]
    assert {(r["precision"], r["loop"]) for r in budget} == {
        ("fp32", "bare"), ("fp32", "trainer"), ("bf16", "bare"), ("bf16", "trainer"), ("fp32", "nan-check")}
    assert len(report["skipped"]) == len(budget)
    assert f"skipped for the budget ({len(budget)}):" in done.stdout
    for r in report["rows"]:
        if r["precision"] in ("tf32", "fp16"):
            assert r["status"] == "not applicable on CPU"
        elif r["batch"] == "max":  # the batch search did not fit in the budget either
            assert r["status"].startswith("not run:") and "not tried: budget" in r["status"]


@pytest.mark.slow
def test_full_dry_run_has_every_precision_ratio_and_largest_batch_rows(tmp_path):
    _, report = dry_run(tmp_path)
    rows = rows_by(report)
    for precision in ("fp32", "bf16"):
        for batch in ("base", "max"):
            for loop in ("bare", "trainer"):
                assert rows[(precision, batch, loop)]["status"] == "ok", rows[(precision, batch, loop)]
        assert rows[(precision, "max", "bare")]["batch_size"] == 4  # the dry run's cap
    names = {(r["ratio"], r["batch"], r["of"]) for r in report["ratios"]}
    assert {("bf16 / fp32", 2, "bare"), ("bf16 / fp32", 4, "trainer"), ("trainer / bare", 4, "bf16")} <= names


def test_trainer_throughput_counts_only_windows_after_warmup(tmp_path):
    # windows as --log-every 3 writes them, with a short one at an epoch's end (step 8)
    windows = [(3, 10.0, 0.5), (6, 4.0, 0.1), (8, 2.0, 0.0), (11, 1.0, 0.2)]
    lines = [{"kind": "train", "step": step, "images_per_s": ips, "data_wait_frac": wait}
             for step, ips, wait in windows] + [{"kind": "eval", "step": 11, "images_per_s": 99.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    # warmup 4: the window ending at step 6 started at step 3 and is warmup; steps 7-11 are measured
    result = trainer_throughput(tmp_path, warmup=4, images_per_step=2)
    seconds = 2 * 2 / 2.0 + 3 * 2 / 1.0
    assert result["images_per_s"] == pytest.approx(5 * 2 / seconds)
    assert result["data_wait_frac"] == pytest.approx(0.2 * 6.0 / seconds)
    with pytest.raises(ValueError, match="no logged window after step 11"):
        trainer_throughput(tmp_path, warmup=11, images_per_step=2)


def test_tf32_modes_set_torch_switches():
    def current() -> tuple[str, str]:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision

    before = current()
    try:
        apply_tf32("on")
        assert current() == ("tf32", "tf32")
        apply_tf32("off")
        assert current() == ("ieee", "ieee")
        apply_tf32("torch")  # leaves whatever is set
        assert current() == ("ieee", "ieee")
        with pytest.raises(ValueError, match="--tf32 must be one of torch, on, off"):
            apply_tf32("yes")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def recipe_args(tmp_path: Path, warmup: int) -> list[str]:
    return ["--recipe", "configs/facemask_lite0_cpu.yaml", "--data-dir", str(make_tiny_dataset(tmp_path)),
            "--steps", "2", "--warmup", str(warmup), "--repeats", "3", "--threads", "1",
            "--json", str(tmp_path / "l4l.json"), "--", "--model", DRY_MODEL, "--backbone-weights", "none",
            "--min-size", "64", "--max-size", "96", "--log-every", "2", "--split-scheme", "stratified",
            "--test-fraction", "0.2", "--workers", "0"]


def test_gpu_check_passes_a_size_list_to_both_loops(tmp_path):
    import gpu_check
    from distdet.training.config import parse_config

    args = gpu_check.parse_args(["--dry-run", "--min-size", "64,80", "--max-size", "120"])
    assert args.min_size == [64, 80]
    flags = gpu_check.GpuCheck(args, tmp_path).train_flags(DRY_MODEL, "fp32", 2)
    assert flags[flags.index("--min-size") + 1] == "64,80"
    assert parse_config(flags).min_size == [64, 80]


def test_recipe_mode_refuses_warmup_that_splits_a_log_window(tmp_path):
    done = run_script(TRAIN_THROUGHPUT, recipe_args(tmp_path, warmup=3))
    assert done.returncode == 2
    assert "--warmup 3 must be a multiple of the recipe's --log-every 2" in done.stderr


@pytest.mark.slow
def test_recipe_mode_runs_interleaved_pairs_on_identical_batches(tmp_path):
    done = run_script(TRAIN_THROUGHPUT, recipe_args(tmp_path, warmup=2))
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    result = json.loads((tmp_path / "l4l.json").read_text())
    assert len(result["pairs"]) == 3 and result["same_batches"] is True
    for pair in result["pairs"]:
        assert pair["same_batches"] is True
        for row in ("bare", "distdet"):
            assert pair[row]["images_per_s"] > 0 and len(pair[row]["load_average"]) == 2
    lines = [line for line in done.stdout.splitlines() if line.startswith("[pair")]
    assert len(lines) == 6 and all("load average" in line for line in lines)
    assert [line.split()[2] for line in lines[:4]] == ["bare", "distdet", "distdet", "bare"]  # alternating order
    assert "identical batches in every pair: yes" in done.stdout


STEP_GAP = REPO / "benchmarks" / "step_gap.py"


@pytest.mark.slow
def test_step_gap_runs_bare_and_trainer_rows_with_each_allocator(tmp_path):
    args = recipe_args(tmp_path, warmup=2)
    flags = args[args.index("--") + 1:]
    done = run_script(STEP_GAP, ["--rows", "bare-system,bare,trainer", "--rounds", "1", "--warmup", "2", "--steps", "2",
                                 "--threads", "1", "--json", str(tmp_path / "gap.json"), "--",
                                 "--data-dir", str(make_tiny_dataset(tmp_path)), *flags])
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    results = json.loads((tmp_path / "gap.json").read_text())["results"]
    assert set(results) == {"bare-system", "bare", "trainer"}
    for rows in results.values():
        assert rows[0]["s_per_step"] > 0 and rows[0]["minor_faults_per_step"] > 0
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["bare-system", "bare", "trainer"]
    bad = run_script(STEP_GAP, ["--rows", "bare-tcmalloc"])
    assert bad.returncode != 0 and "unknown row 'bare-tcmalloc'" in bad.stderr
