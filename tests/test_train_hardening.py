"""train.py under faults and hostile run folders: corrupt and planted checkpoint files, weights
that blow up, two runs in one folder, disk full, changed flags on resume, bad numeric flags.

The multi-run tests are marked slow (``pytest -m slow``); the same checkpoint logic is tested
in-process, in the default run, by tests/test_checkpoint_safety.py."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from distdet.training.checkpoints import resolve_resume
from distdet.training.config import parse_config
from support.trainer import FAST, check_ok, child_env, make_tiny_dataset, read_jsonl, run, train_command, wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def _train(data_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), *args]))


def _reseal(folder: Path) -> None:
    """Recompute the checksums a marker lists, as anyone who can write the folder can."""
    marker = json.loads((folder / "COMPLETE").read_text())
    for name in marker.get("files", {}):
        data = (folder / name).read_bytes()
        marker["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "COMPLETE").write_text(json.dumps(marker))


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow  # two or three training runs: 40-65 s on the shared 2-core machine
def test_corrupt_latest_checkpoint_falls_back_and_rolled_back_steps_are_dropped(data_dir, tmp_path):
    out = tmp_path / "run"
    check_ok(_train(data_dir, out, "--epochs", "2", "--max-steps", "5", "--checkpoint-every", "2"))
    latest = out / "checkpoints" / "step_000005"
    weights = latest / "model.safetensors"
    with open(weights, "r+b") as handle:  # 64 KiB of garbage in the middle, size unchanged
        handle.seek(weights.stat().st_size // 2)
        handle.write(os.urandom(1 << 16))
    done = check_ok(_train(data_dir, out, "--epochs", "2", "--max-steps", "7", "--resume", "auto"))
    assert f"{latest}: model.safetensors fails its SHA-256 check" in done.stderr and "falling back" in done.stderr
    resumed = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "resumed"]
    assert resumed[-1]["checkpoint"].endswith("step_000004") and resumed[-1]["metrics_dropped"] == 1
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # step 5 of the abandoned line appears once, not twice
    assert not latest.exists() or (out / "checkpoints" / "step_000007").is_dir()


@pytest.mark.slow  # two or three training runs: 40-65 s on the shared 2-core machine
def test_planted_pickles_in_a_checkpoint_never_run(data_dir, tmp_path):
    out, pwned = tmp_path / "run", tmp_path / "pwned"
    check_ok(_train(data_dir, out, "--max-steps", "1"))
    folder = out / "checkpoints" / "step_000001"
    torch.save(Payload(pwned), folder / "custom_checkpoint_0.pkl")  # where Accelerate pickles a scheduler
    _reseal(folder)
    check_ok(_train(data_dir, out, "--max-steps", "2", "--resume", "auto"))
    assert not pwned.exists(), "resuming unpickled custom_checkpoint_0.pkl"
    folder = out / "checkpoints" / "step_000002"
    torch.save({"state": Payload(pwned)}, folder / "optimizer.bin")
    _reseal(folder)
    done = _train(data_dir, out, "--max-steps", "3", "--resume", "auto")
    assert not pwned.exists(), "resuming unpickled optimizer.bin"
    assert done.returncode == 1 and f"{folder}: cannot read optimizer.bin safely" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # two or three training runs: 40-65 s on the shared 2-core machine
def test_weights_that_blow_up_never_end_in_exit_0_or_model_pt_nor_prune_the_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    check_ok(_train(data_dir, out, "--max-steps", "2", "--keep-checkpoints", "1"))
    good_weights = (out / "model.pt").read_bytes()
    # lr 1e38 (5e37 at the resumed step of the warmup) takes float32 weights past their range with the
    # first update after the resume; every later loss is NaN and skipped, and fewer than --max-bad-steps remain
    done = _train(data_dir, out, "--resume", "auto", "--lr", "1e38", "--max-steps", "5", "--max-bad-steps", "10",
                  "--keep-checkpoints", "1", "--checkpoint-every", "1")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "non-finite weights or optimizer state" in done.stderr and "Traceback" not in done.stderr
    assert (out / "model.pt").read_bytes() == good_weights  # not overwritten with the NaN weights
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept[0] == "step_000002", kept  # the checkpoint resumed from survives --keep-checkpoints 1
    assert resolve_resume(str(out / "checkpoints" / "step_000002"), None)[0] == out / "checkpoints" / "step_000002"


@pytest.mark.slow  # two or three training runs: 40-65 s on the shared 2-core machine
def test_second_run_in_a_folder_is_refused_naming_the_holder_and_a_dead_one_does_not_block(data_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out),
                                            "--epochs", "50"]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    try:
        wait_for(lambda: (out / "events.jsonl").is_file(), timeout=300, what="the first run to start")
        second = _train(data_dir, out, "--max-steps", "1")
        assert second.returncode == 1 and "is in use by another run" in second.stderr
        assert f'"pid": {first.pid}' in second.stderr
        first.send_signal(signal.SIGKILL)  # its lock file stays behind, stale
        first.wait(timeout=60)
    finally:
        first.kill()
        first.wait()
    assert (out / "run.lock").is_file()
    check_ok(_train(data_dir, out, "--epochs", "50", "--max-steps", "1", "--resume", "auto"))


@pytest.mark.slow  # two or three training runs: 40-65 s on the shared 2-core machine
def test_resume_with_changed_flags_applies_records_or_refuses(data_dir, tmp_path):
    out = tmp_path / "run"
    check_ok(_train(data_dir, out, "--max-steps", "2", "--lr", "0.01"))
    other = _train(data_dir, out, "--max-steps", "3", "--resume", "auto", "--model", "fasterrcnn_mobilenet_v3_large_fpn")
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert "holds a 'fasterrcnn_mobilenet_v3_large_320_fpn' model, but --model is 'fasterrcnn_mobilenet_v3_large_fpn'" \
        in other.stderr
    done = check_ok(_train(data_dir, out, "--max-steps", "3", "--resume", "auto", "--lr", "0.02", "--min-size", "72"))
    assert "resuming" in done.stderr and "--min-size 72 (the checkpoint was trained with 64)" in done.stderr
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["resume_changes"] == {"initial_lr": [0.01, 0.02]} and resolved["effective_lr"] == 0.02
    assert len(resolved["data_fingerprint"]) == 64


def test_run_shorter_than_log_every_writes_no_plot_traceback(data_dir, tmp_path):
    done = check_ok(_train(data_dir, tmp_path / "run", "--max-steps", "1", "--log-every", "100"))
    assert "Traceback" not in done.stderr and "no training plots" in done.stderr


def test_pretrained_weights_offline_print_only_the_message(data_dir, tmp_path):
    args = [a for a in FAST if a not in ("--weights", "none")]
    done = run(train_command([*args, "--weights", "coco", "--data-dir", str(data_dir), "--output-dir",
                              str(tmp_path / "run")]), TORCH_HOME=str(tmp_path / "torch"), DISTDET_OFFLINE="1")
    assert done.returncode == 1 and "cannot be reached" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "1e39"), ("--momentum", "nan"),
                                         ("--weight-decay", "nan"), ("--clip-grad-norm", "nan"),
                                         ("--dist-timeout", "nan"), ("--min-size", "0"), ("--min-size", "-5"),
                                         ("--max-size", "0")])
def test_numeric_flags_that_would_poison_a_run_exit_2_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config([flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_nan_in_a_config_file_is_refused_naming_the_option(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("lr: .nan\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--config", str(path)])
    assert exit_info.value.code == 2 and "--lr must be a finite number" in capsys.readouterr().err


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow  # two or three training runs: 40-65 s on the shared 2-core machine
def test_disk_full_during_a_save_is_reported_cleaned_up_and_resumable(data_dir, tmp_path):
    """A real small filesystem (tmpfs): the first checkpoint (145 MB) fits, the second does not."""
    mount = tmp_path / "small"
    if os.geteuid() != 0 or not _tmpfs(mount, "220m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = mount / "run"
        done = _train(data_dir, out, "--max-steps", "3", "--checkpoint-every", "1")
        assert done.returncode == 1, done.stderr[-3000:]
        assert "No space left on device" in done.stderr and "bytes free in" in done.stderr
        assert "Traceback" not in done.stderr
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == ["step_000001"], names  # no partial .tmp_step_* left, the previous one kept
        subprocess.run(["mount", "-o", "remount,size=420m", str(mount)], check=True)  # space freed
        check_ok(_train(data_dir, out, "--max-steps", "2", "--checkpoint-every", "1", "--resume", "auto"))
        resumed = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "resumed"]
        assert resumed[-1]["checkpoint"].endswith("step_000001")
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)
