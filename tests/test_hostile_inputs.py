"""Degenerate images and hostile results files: each is a clear, per-file error, never a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from distdet.classes import CLASS_NAMES
from distdet.data import DataError, ProblemKind, build_index
from distdet.data.synthetic import make_synthetic_dataset
from distdet.eval.results_file import ResultsFileError, load_coco_results
from distdet.inference.batch_predict import expand_inputs, predict_files
from distdet.inference.predictor import load_detector
from distdet.modeling.model_card import ModelCard, save_detector
from distdet.modeling.models import build_model
from support.predict import child_env

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    make_synthetic_dataset(root, num_images=3, seed=0, image_size=(96, 72), max_objects_per_image=1,
                           face_size=(16, 30))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build_model(MODEL, len(CLASS_NAMES), weights="none", backbone_weights="none", min_size=64, max_size=96)
    save_detector(model.eval(), ModelCard(MODEL, list(CLASS_NAMES), build={"min_size": 64, "max_size": 96}), out)
    return out


def _thin_png(path: Path) -> Path:
    Image.new("RGB", (20000, 2), (120, 90, 60)).save(path)
    return path


def test_thin_image_is_a_listed_predict_failure_and_every_other_result_is_written(model_dir, data_dir, tmp_path):
    good = sorted((data_dir / "images").iterdir())[:2]
    thin = _thin_png(tmp_path / "thin.png")
    detector = load_detector(model_dir, score_threshold=0.0, batch_size=4)
    summary = predict_files(detector, [good[0], thin, good[1]], tmp_path / "out", Accelerator(cpu=True),
                            write=lambda line: None)
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(e["file"]) for e in data["images"]] == good
    assert [f["file"] for f in data["failures"]] == [str(thin)] and summary.failures == data["failures"]
    assert "image is 20000x2" in data["failures"][0]["error"] and "x0 pixels" in data["failures"][0]["error"]


def test_thin_image_in_a_dataset_is_a_data_problem(data_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    thin = _thin_png(root / "images" / "thin.png")
    (root / "annotations" / "thin.xml").write_text(
        "<annotation><filename>thin.png</filename><size><width>20000</width><height>2</height><depth>3</depth></size>"
        "<object><name>with_mask</name><difficult>0</difficult><bndbox><xmin>10</xmin><ymin>0</ymin><xmax>50</xmax>"
        "<ymax>2</ymax></bndbox></object></annotation>")
    with pytest.raises(DataError) as info:
        build_index(root)
    assert [(p.kind, p.path) for p in info.value.problems] == [(ProblemKind.EXTREME_ASPECT_RATIO, thin)]
    done = subprocess.run([sys.executable, "-m", "distdet", "check-data", str(root)], capture_output=True, text=True,
                          env=child_env(), timeout=300)
    assert done.returncode == 1 and "thin.png" in done.stdout + done.stderr and "extreme_aspect_ratio" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_deeply_nested_results_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ResultsFileError, match=rf"{path}: JSON nested too deeply"):
        load_coco_results(path, 3, 3)


def test_oversized_results_file_is_refused_unless_the_limit_is_raised(tmp_path):
    path = tmp_path / "big.json"
    entry = {"image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}
    path.write_text(json.dumps([entry] * 20_000))  # about 1.3 MB
    with pytest.raises(ResultsFileError, match=r"big.json: predictions file is 1.\d MiB, over the limit of 1 MiB"):
        load_coco_results(path, 3, 3, max_bytes=2**20)
    assert len(load_coco_results(path, 3, 3, max_bytes=2 * 2**20)[0]["scores"]) == 20_000


def test_5000_digit_image_id_names_the_file(tmp_path):
    path = tmp_path / "ids.json"
    path.write_text('[{"image_id": ' + "9" * 5000 + ', "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]')
    with pytest.raises(ResultsFileError, match=rf"{path}: not valid JSON"):
        load_coco_results(path, 3, 3)


def _card_with(model_dir: Path, tmp_path: Path, change: dict) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    card_path = folder / "model_card.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), **change}))
    return card_path


@pytest.mark.parametrize("change, message", [
    ({"build": {"min_size": 64, "max_size": 96, "colour": "red"}}, "unknown build key 'colour'"),
    ({"build": {"min_size": "64", "max_size": 96}}, "build 'min_size' must be an integer >= 1, got '64'"),
    ({"build": {"min_size": 0, "max_size": 96}}, "build 'min_size' must be an integer >= 1, got 0"),
    ({"build": {"box_score_thresh": float("nan")}}, "build 'box_score_thresh' must be a number in [0.0, 1.0], got nan"),
    ({"class_names": "xyz"}, "'class_names' must be a list of distinct non-empty names, got 'xyz'"),
])
def test_bad_model_card_values_are_refused_naming_card_and_key(model_dir, tmp_path, change, message):
    card_path = _card_with(model_dir, tmp_path, change)
    with pytest.raises(ValueError) as info:
        ModelCard.from_file(card_path)
    assert str(card_path) in str(info.value) and message in str(info.value)


def test_predict_with_a_bad_card_exits_2_without_a_traceback(model_dir, tmp_path):
    card_path = _card_with(model_dir, tmp_path, {"class_names": "xyz"})
    done = subprocess.run([sys.executable, "-m", "distdet", "predict", "--checkpoint", str(card_path.parent),
                           str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=child_env(), timeout=300)
    assert done.returncode == 2 and "'class_names' must be a list" in done.stderr and "Traceback" not in done.stderr


def test_predict_lists_folder_entries_that_are_not_files_as_skipped(model_dir, data_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted((data_dir / "images").iterdir())[:2]
    for path in good:
        shutil.copy(path, folder)
    (folder / "sub.png").mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "dirlink").symlink_to(folder / "sub.png")
    (folder / "linked.png").symlink_to(good[0])  # a link to an image is followed
    paths, failures, skipped = expand_inputs([folder])
    assert [p.name for p in paths] == sorted([good[0].name, good[1].name, "linked.png"]) and failures == []
    assert {Path(s["file"]).name: s["reason"] for s in skipped} == {
        "sub.png": "skipped: a directory", "pipe.png": "skipped: a FIFO", "gone.png": "skipped: a dangling link",
        "dirlink": "skipped: a link to a directory"}
    done = subprocess.run([sys.executable, "-m", "distdet", "predict", "--checkpoint", str(model_dir), str(folder),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=child_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 folder entr(y/ies) skipped" in done.stderr and "pipe.png: skipped: a FIFO" in done.stderr
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(data["images"]) == 3 and len(data["skipped"]) == 4
