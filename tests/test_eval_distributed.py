"""Distributed evaluation: 1, 2 and 3 real gloo processes give byte-identical outputs.

A small detector (random weights, seeded, saved as a model folder) is evaluated on 7 images
of two different sizes (7 is not divisible by 2 or 3, and mixed sizes make batch padding
matter) with ``accelerate launch`` running the ``evaluate`` command; the test checks the
process group size inside every child.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.evalm import REPO_ROOT

from distdet.classes import CLASS_NAMES
from distdet.commands import evaluate as evaluate_command
from distdet.data.synthetic import make_synthetic_dataset
from distdet.modeling.model_card import ModelCard, save_detector
from distdet.modeling.models import build_model

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
BUILD = {"min_size": 128, "max_size": 176}
CHILD = REPO_ROOT / "tests" / "support" / "evaluate_child.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
OUTPUT_FILES = ("metrics.json", "predictions.json", "ground_truth.json")


def _mixed_size_dataset(root: Path) -> Path:
    """4 images of 160x120 and 3 of 120x150 in one VOC folder."""
    data = root / "data"
    for sub in ("images", "annotations"):
        (data / sub).mkdir(parents=True)
    for tag, count, size, seed in (("a", 4, (160, 120), 1), ("b", 3, (120, 150), 2)):
        part = make_synthetic_dataset(root / f"part_{tag}", num_images=count, seed=seed, image_size=size,
                                      face_size=(20, 50))
        for image in sorted((part / "images").iterdir()):
            shutil.copy(image, data / "images" / f"{tag}_{image.name}")
            xml = part / "annotations" / f"{image.stem}.xml"
            shutil.copy(xml, data / "annotations" / f"{tag}_{xml.name}")
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, args: list[str], tmp: Path, reports: Path) -> subprocess.CompletedProcess:
    reports.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "CHILD_REPORT_DIR": str(reports),
           "EXPECTED_WORLD_SIZE": str(num_processes), "HF_HOME": str(tmp / "hf")}
    mode = ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else \
        ["--cpu", "--num_processes", "1"]
    command = [str(ACCELERATE), "launch", *mode, "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(CHILD), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Evaluate the same model folder with 1, 2 and 3 processes; return (root, outputs)."""
    root = tmp_path_factory.mktemp("dist_eval")
    data = _mixed_size_dataset(root)
    torch.manual_seed(0)
    model = build_model(MODEL, len(CLASS_NAMES), **BUILD)
    save_detector(model, ModelCard(MODEL, list(CLASS_NAMES), dict(BUILD)), root / "run")
    outs = {}
    for n in (1, 2, 3):
        out = root / f"out_{n}"
        reports = root / f"reports_{n}"
        result = _launch(n, ["evaluate", "--checkpoint", str(root / "run"), "--data-dir", str(data),
                             "--split", "all", "--batch-size", "2", "--out", str(out)], root, reports)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        seen = sorted((json.loads(p.read_text()) for p in reports.glob("rank*.json")), key=lambda r: r["rank"])
        backend = "gloo" if n > 1 else "none"
        assert seen == [{"rank": r, "world_size": n, "backend": backend, "status": 0} for r in range(n)]
        assert f"on {n} process(es)" in result.stdout
        outs[n] = out
    return root, data, outs


def test_one_two_three_processes_give_identical_files(evaluated):
    _, _, outs = evaluated
    for name in OUTPUT_FILES:
        reference = (outs[1] / name).read_bytes()
        for n in (2, 3):
            assert (outs[n] / name).read_bytes() == reference, f"{name} differs between 1 and {n} processes"
    predictions = json.loads((outs[1] / "predictions.json").read_text())
    metrics = json.loads((outs[1] / "metrics.json").read_text())
    # Every image was predicted exactly once (padding duplicates dropped), with real output.
    assert metrics["counts"]["images"] == 7
    assert {p["image_id"] for p in predictions} == set(range(7))
    assert sum(metrics["counts"]["detections"].values()) == len(predictions) > 50
    assert len(list((outs[1] / "renders").glob("*.png"))) == 6


def _run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distdet")
    evaluate_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_predictions_file_round_trip_gives_identical_metrics(evaluated, tmp_path, capsys):
    _, data, outs = evaluated
    out = tmp_path / "again"
    status = _run_command(["evaluate", "--predictions", str(outs[1] / "predictions.json"), "--data-dir", str(data),
                           "--split", "all", "--out", str(out)])
    assert status == 0
    for name in OUTPUT_FILES:
        assert (out / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert "voc/mAP50" not in capsys.readouterr().out  # the table, not the raw dict, is printed
