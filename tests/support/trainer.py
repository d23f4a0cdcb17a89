"""Helpers for the trainer tests: a tiny synthetic dataset, and running train.py for real.

Every run is a real process (or two, under ``accelerate launch``) on real files; the model is
the smallest torchvision detector on 64-96 px images so a step takes well under a second.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "train.py"
CPU_2PROC = REPO / "launch" / "accelerate" / "cpu_2proc.yaml"

#: 11 images: a stratified 0.2 split leaves 9 training images (odd, so 2 ranks need padding).
DATA_IMAGES = 11

FAST = [
    "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "none",
    "--min-size", "64", "--max-size", "96", "--batch-size", "2",
    "--split", "stratified", "--test-fraction", "0.2",
    "--workers", "0", "--no-progress", "--no-tensorboard", "--eval-every", "0", "--no-final-eval",
    "--log-every", "1", "--no-pictures",
]


def make_tiny_dataset(root: Path) -> Path:
    """The tiny synthetic VOC folder under ``root`` (made once, reused)."""
    from distdet.data.synthetic import make_synthetic_dataset

    out = root / "tiny_synth"
    if not (out / "synthetic.json").is_file():
        make_synthetic_dataset(out, num_images=DATA_IMAGES, seed=0, image_size=(96, 72),
                               max_objects_per_image=2, face_size=(16, 36))
    return out


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(args: list[str]) -> list[str]:
    return [sys.executable, str(TRAIN_PY), *args]


def launch_command(args: list[str], port: int | None = None, processes: int = 2) -> list[str]:
    """``processes`` (>= 2) CPU processes over gloo with the documented launch config."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
            "--num_processes", str(processes), "--main_process_port", str(port or free_port()), str(TRAIN_PY), *args]


def run(command: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env(**env))


def check_ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-8000:]}"
    return done


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:5]}"


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes started by an accelerate launcher."""
    import psutil

    found = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if str(TRAIN_PY) in " ".join(child.cmdline()) and "RANK" in child.environ():
                found[int(child.environ()["RANK"])] = child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
