"""Training plots from metrics.jsonl: parsing, PNG files, the report command, a real trainer run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support.predict import child_env, synthetic_data

from distdet.data import build_index, make_split, save_manifest
from distdet.training.report import metric_panels, parse_metrics_lines, write_training_plots

LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


def _train_line(step: int, epoch: int, scale: float = 1.0) -> dict:
    parts = {name: scale * (1.0 + i) / (1 + step) for i, name in enumerate(LOSSES)}
    return {"kind": "train", "step": step, "time": 1700000000.0 + step, "epoch": epoch, **parts,
            "loss": sum(parts.values()), "lr": 0.005 * min(1.0, (step + 1) / 5), "images_per_s": 3.5,
            "data_wait_frac": 0.1}


def _eval_line(kind: str, step: int, epoch: int) -> dict:
    return {"kind": kind, "step": step, "time": 1700000100.0 + step, "epoch": epoch,
            "voc/mAP50": 0.1 * epoch, "coco/AP": 0.05 * epoch, "coco/AP50": 0.09 * epoch,
            "voc/AP50/with_mask": 0.2 * epoch, "voc/AP50/without_mask": 0.1 * epoch}


def _write_log(run_dir, resumed: bool = True) -> None:
    lines = [json.dumps(_train_line(step, step // 10)) for step in range(1, 31)]
    lines.insert(10, json.dumps(_eval_line("val", 10, 1)))
    lines.insert(21, json.dumps(_eval_line("val", 20, 2)))
    if resumed:  # the run was resumed from step 25: steps 26.. logged again, with other values
        lines += [json.dumps(_train_line(step, 2, scale=0.5)) for step in range(26, 31)]
    lines += [json.dumps(_eval_line("val", 30, 3)), json.dumps(_eval_line("test", 30, 3)),
              "", '{"kind": "train", "step": 31, "loss": 0.']  # a line cut short by a crash
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_parser_reads_series_keeps_the_last_line_per_step_and_counts_broken_lines(tmp_path):
    _write_log(tmp_path)
    log = parse_metrics_lines((tmp_path / "metrics.jsonl").read_text().splitlines())
    assert set(log.losses) == {"loss", *LOSSES}
    assert sorted(log.losses["loss"]) == list(range(1, 31))
    assert log.losses["loss_classifier"][28] == pytest.approx(_train_line(28, 2, scale=0.5)["loss_classifier"])
    assert log.losses["loss_classifier"][20] == pytest.approx(_train_line(20, 2)["loss_classifier"])
    assert log.lr[3] == pytest.approx(0.005 * 4 / 5)
    assert log.skipped_lines == 1
    assert set(log.metrics) == {"val", "test"}
    assert log.eval_axis == {"val": "epoch", "test": "epoch"}
    assert log.metrics["val"]["voc/mAP50"] == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    assert "images_per_s" not in log.metrics["val"] and "lr" not in log.metrics["val"]
    panels = metric_panels(log)
    assert set(panels) == {"coco", "voc", "voc/AP50"}
    assert ("val", "voc/AP50/with_mask", "with_mask (val)") in panels["voc/AP50"]


def test_lines_without_kind_are_sorted_by_their_keys():
    lines = [json.dumps({"step": 1, "loss": 2.0, "lr": 0.1}), json.dumps({"epoch": 1, "coco/AP": 0.3}),
             json.dumps([1, 2]), json.dumps({"note": "no position"})]
    log = parse_metrics_lines(lines)
    assert log.losses["loss"] == {1: 2.0} and log.lr == {1: 0.1}
    assert log.metrics["eval"]["coco/AP"] == {1: 0.3}
    assert log.skipped_lines == 1


def _assert_png_with_content(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 5  # not a blank canvas


def test_write_training_plots_writes_losses_lr_and_metrics(tmp_path):
    _write_log(tmp_path)
    paths = write_training_plots(tmp_path)
    assert [p.name for p in paths] == ["losses.png", "lr.png", "eval_metrics.png"]
    assert all(p.parent == tmp_path / "plots" for p in paths)
    for path in paths:
        _assert_png_with_content(path)


def test_only_the_plots_that_have_data_are_written(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    paths = write_training_plots(tmp_path, tmp_path / "elsewhere")
    assert [p.name for p in paths] == ["losses.png"] and paths[0].parent == tmp_path / "elsewhere"


def test_missing_or_useless_log_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.jsonl")):
        write_training_plots(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("garbage\n")
    with pytest.raises(ValueError, match="metrics.jsonl holds no"):
        write_training_plots(tmp_path)


def test_report_command(tmp_path):
    _write_log(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "distdet", "report", str(tmp_path)], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "plots" / n) for n in ("losses.png", "lr.png", "eval_metrics.png")]

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "distdet", "report", str(empty)], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and str(empty / "metrics.jsonl") in proc.stderr


@pytest.mark.slow
def test_plots_from_a_real_training_run(tmp_path_factory, tmp_path):
    """The trainer's own metrics.jsonl (2 short epochs on synthetic data) gives all three plots."""
    data = synthetic_data(tmp_path_factory.getbasetemp() / "predict-shared")
    run_dir = tmp_path / "run"
    manifest = save_manifest(tmp_path / "split.json",
                             make_split(build_index(data).records, "stratified", test_fraction=0.25, seed=0))
    train = [sys.executable, "-m", "distdet", "train", "--data-dir", str(data), "--split-manifest", str(manifest), "--model",
             "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "none", "--min-size", "96", "--max-size", "128",
             "--epochs", "2", "--batch-size", "2", "--workers", "0", "--log-every", "1", "--no-tensorboard",
             "--no-progress", "--cpu", "--output-dir", str(run_dir)]
    proc = subprocess.run(train, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = write_training_plots(run_dir)
    assert [p.name for p in paths] == ["losses.png", "lr.png", "eval_metrics.png"]
    log = parse_metrics_lines((run_dir / "metrics.jsonl").read_text().splitlines())
    assert {"loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(log.losses)
    assert log.lr and any(log.metrics.values())
