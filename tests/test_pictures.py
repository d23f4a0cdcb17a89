"""The pictures users look at: check-data --plots, the training run's labels.png,
train_batches.png, the evaluation's confusion_matrix.png, and results.csv."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.trainer import FAST, check_ok, make_tiny_dataset, read_jsonl, run, train_command

from distdet.classes import CLASS_COLOURS, CLASS_NAMES
from distdet.cli import main as distdet_main
from distdet.data.synthetic import make_synthetic_dataset
from distdet.eval.confusion_plot import row_normalised, write_confusion_matrix
from distdet.training.pictures import TILE
from distdet.training.results_csv import write_results_csv


def assert_picture(path: Path, size: tuple[int, int] | None = None, min_std: float = 10.0) -> np.ndarray:
    """``path`` is a PNG of ``size`` (when given) whose pixels are not all alike."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as png:
        assert png.format == "PNG"
        if size is not None:
            assert png.size == size
        pixels = np.asarray(png.convert("RGB"), dtype=np.float64)
    assert pixels.std() > min_std, f"{path} looks blank (pixel std {pixels.std():.2f})"
    return pixels


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """2 epochs of 3 steps, evaluated at the end of epoch 2 only."""
    root = tmp_path_factory.mktemp("pictures")
    out = root / "run"
    check_ok(run(train_command(FAST + ["--data-dir", str(make_tiny_dataset(root)), "--output-dir", str(out),
                                       "--epochs", "2", "--eval-every", "2", "--batch-size", "4", "--pictures",
                                       "--augment", "strong"])))
    return out


def test_check_data_plots_draw_the_label_statistics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_synthetic_dataset(tmp_path / "data", num_images=12, seed=3, image_size=(160, 120), face_size=(20, 50))
    assert distdet_main(["check-data", str(data), "--plots", str(tmp_path / "plots")]) == 0
    assert f"Plots: {tmp_path / 'plots' / 'labels.png'}" in capsys.readouterr().out
    assert_picture(tmp_path / "plots" / "labels.png", (1200, 680))


def test_training_draws_its_labels_and_first_batches(trained: Path) -> None:
    assert_picture(trained / "plots" / "labels.png", (1200, 680))
    pixels = assert_picture(trained / "train_batches.png")
    # 9 training images in batches of 4: rows of 4, 4 and 1 tiles (the tiny images are 96x72 -> 240x180)
    assert pixels.shape[1] == 4 * TILE + 3 * 6
    assert pixels.shape[0] > 3 * (TILE * 72 // 96)
    # every class colour appears (boxes, captions and the legend)
    flat = {tuple(p) for p in pixels.reshape(-1, 3).astype(int)}
    assert all(CLASS_COLOURS[name] in flat for name in CLASS_NAMES)


def test_results_csv_has_a_row_per_epoch_from_metrics_jsonl(trained: Path) -> None:
    with open(trained / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    header = list(rows[0])
    losses = ["train/loss", "train/loss_box_reg", "train/loss_classifier", "train/loss_objectness",
              "train/loss_rpn_box_reg"]
    assert header[:8] == ["epoch", "step", *losses, "lr"]
    assert {"test/voc/mAP50", "test/coco/AP", "test/coco/AP50/with_mask"} <= set(header)
    assert [(row["epoch"], row["step"]) for row in rows] == [("1", "3"), ("2", "6")]
    records = read_jsonl(trained / "metrics.jsonl")
    for epoch, row in enumerate(rows):
        train = [r for r in records if r["kind"] == "train" and r["epoch"] == epoch]
        assert float(row["train/loss"]) == pytest.approx(np.mean([r["loss"] for r in train]))
        assert float(row["lr"]) == pytest.approx(train[-1]["lr"])
    assert rows[0]["test/voc/mAP50"] == ""  # --eval-every 2: no evaluation after epoch 1
    [test] = [r for r in records if r["kind"] == "test"]
    assert float(rows[1]["test/voc/mAP50"]) == pytest.approx(test["voc/mAP50"])


def test_results_csv_counts_a_resumed_step_once_and_skips_a_torn_line(tmp_path: Path) -> None:
    lines = [{"kind": "train", "step": 1, "epoch": 0, "loss": 4.0, "lr": 0.1},
             {"kind": "train", "step": 2, "epoch": 0, "loss": 9.0, "lr": 0.2},
             {"kind": "train", "step": 2, "epoch": 0, "loss": 2.0, "lr": 0.2},  # the resumed run's step 2
             {"kind": "val", "step": 2, "epoch": 1, "voc/mAP50": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"kind": "tr')
    with open(write_results_csv(tmp_path), newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["epoch", "step", "train/loss", "lr", "val/voc/mAP50"], ["1", "2", "3.0", "0.2", "0.5"]]


def test_confusion_matrix_picture_and_row_normalisation(tmp_path: Path) -> None:
    counts = np.array([[8, 1, 0, 1], [2, 6, 0, 2], [0, 0, 0, 0], [3, 1, 0, 0]])
    normalised = row_normalised(counts)
    assert np.allclose(normalised[0], [0.8, 0.1, 0.0, 0.1]) and np.isnan(normalised[2]).all()
    confusion = {"rows": [*CLASS_NAMES, "background"], "columns": [*CLASS_NAMES, "missed"],
                 "counts": counts.tolist(), "score_threshold": 0.5, "iou_threshold": 0.5}
    assert_picture(write_confusion_matrix(tmp_path / "cm.png", confusion), (1040, 440))
