"""Evaluation output files, the results-file reader, rendering, and the evaluate command
without a model (``--predictions``)."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from support.evalm import REPO_ROOT, random_detections
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distdet.classes import CLASS_COLOURS, CLASS_NAMES
from distdet.commands import evaluate as evaluate_command
from distdet.data import build_index
from distdet.data.synthetic import make_synthetic_dataset
from distdet.eval import compute_metrics, write_evaluation_outputs
from distdet.eval.coco import predictions_to_coco_results
from distdet.eval.results_file import ResultsFileError, load_coco_results
from distdet.render import draw_detections, side_by_side


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("outputs") / "data", num_images=9, seed=4,
                                  image_size=(160, 120), face_size=(20, 50))
    return root, build_index(root).records


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distdet")
    evaluate_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_output_files_are_complete_and_reload_in_pycocotools(dataset, tmp_path):
    _, records = dataset
    preds = random_detections(records, seed=5)
    metrics = compute_metrics(records, preds, CLASS_NAMES, voc07=True)
    paths = write_evaluation_outputs(tmp_path, records, preds, metrics, num_rendered=4)
    assert set(paths) == {"metrics", "table", "predictions", "ground_truth", "pr_curves", "confusion_matrix",
                          "renders"}

    assert json.loads(paths["metrics"].read_text()) == json.loads(json.dumps(metrics))
    assert "COCO AP" in paths["table"].read_text()
    ground_truth = json.loads(paths["ground_truth"].read_text())
    assert [img["file_name"] for img in ground_truth["images"]] == [r.image_path.name for r in records]
    assert len(ground_truth["annotations"]) == sum(r.num_objects for r in records)

    # Anyone can re-run pycocotools on the two files and get the reported numbers.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(paths["ground_truth"]))
        ev = COCOeval(gt, gt.loadRes(str(paths["predictions"])), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert metrics["coco/AP"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert metrics["coco/AP50"] == pytest.approx(ev.stats[1], abs=1e-12)

    with Image.open(paths["pr_curves"]) as png:
        assert png.format == "PNG" and png.size == (600, 500)
    with Image.open(paths["confusion_matrix"]) as png:  # counts and row-normalised panels
        assert png.format == "PNG" and png.size == (1040, 440)
        assert np.asarray(png.convert("L"), dtype=np.float64).std() > 10  # not blank
    renders = sorted(paths["renders"].glob("*.png"))
    assert [p.stem for p in renders] == [records[i].stem for i in (0, 3, 5, 8)]
    with Image.open(renders[0]) as png:
        assert png.width > 2 * records[0].width and png.height > records[0].height


def test_draw_detections_uses_class_colours():
    image = Image.new("RGB", (400, 300), (128, 128, 128))
    boxes = np.array([[20, 100, 120, 250], [200, 100, 380, 250]], dtype=np.float32)
    drawn = draw_detections(image, boxes, [1, 3], scores=[0.91, 0.5], line_width=2)
    assert drawn is not image and image.getpixel((20, 150)) == (128, 128, 128)
    assert drawn.getpixel((20, 150)) == CLASS_COLOURS["with_mask"]  # left edge of box 1
    assert drawn.getpixel((380, 150)) == CLASS_COLOURS["mask_weared_incorrect"]  # right edge of box 2
    # each caption sits above its box on a tag of the class colour, with white (anti-aliased) text
    for x, name in ((20, "with_mask"), (200, "mask_weared_incorrect")):
        tag = np.asarray(drawn)[80:100, x:x + 60].reshape(-1, 3)
        assert (tag == CLASS_COLOURS[name]).all(axis=1).any() and (tag.min(axis=1) >= 240).any()
    # a caption that would leave the image is moved left to stay inside
    edge = draw_detections(image, np.array([[390, 100, 399, 120]]), [2], scores=[0.7])
    assert (np.asarray(edge)[80:100, 300:390] == CLASS_COLOURS["without_mask"]).all(axis=2).any()
    both = side_by_side(drawn, drawn)
    assert both.width == 2 * 400 + 8 and both.height > 300


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


GOOD = {"image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}


@pytest.mark.parametrize("entry, problem", [
    ("not an object", "expected an object"),
    ({"image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4]}, "missing 'score'"),
    ({**GOOD, "image_id": 9}, "image_id 9 is not an image of this split"),
    ({**GOOD, "image_id": True}, "image_id True"),
    ({**GOOD, "category_id": 0}, "category_id 0 is not a class id"),
    ({**GOOD, "bbox": [1, 2, 3]}, "bbox must be a list of 4"),
    ({**GOOD, "bbox": [1, 2, -3, 4]}, "width and height must be >= 0"),
    ({**GOOD, "score": "high"}, "score must be a finite number"),
    ({**GOOD, "score": float("nan")}, "score must be a finite number"),
])
def test_malformed_results_entries_are_named(tmp_path, entry, problem):
    path = write_json(tmp_path / "p.json", [GOOD, GOOD, entry])
    with pytest.raises(ResultsFileError) as info:
        load_coco_results(path, num_images=3, num_classes=3)
    assert str(info.value).startswith(f"{path}: entry 2: ") and problem in str(info.value)


def test_results_file_level_errors(tmp_path):
    with pytest.raises(ResultsFileError, match="expected a JSON list"):
        load_coco_results(write_json(tmp_path / "a.json", {"x": 1}), 3, 3)
    (tmp_path / "b.json").write_text("[{")
    with pytest.raises(ResultsFileError, match="not valid JSON"):
        load_coco_results(tmp_path / "b.json", 3, 3)
    with pytest.raises(ResultsFileError, match="cannot read"):
        load_coco_results(tmp_path / "missing.json", 3, 3)


def test_results_file_round_trip_is_exact(dataset, tmp_path):
    _, records = dataset
    preds = random_detections(records, seed=6)
    path = write_json(tmp_path / "p.json", predictions_to_coco_results(preds))
    loaded = load_coco_results(path, len(records), len(CLASS_NAMES))
    for original, back in zip(preds, loaded):
        assert np.array_equal(back["boxes"], original["boxes"].astype(np.float64))
        assert np.array_equal(back["scores"], original["scores"].astype(np.float64))
        assert np.array_equal(back["labels"], original["labels"])


def test_evaluate_empty_predictions_gives_zero_metrics(dataset, tmp_path, capsys):
    root, records = dataset
    out = tmp_path / "out"
    status = run_command(["evaluate", "--predictions", write_json(tmp_path / "empty.json", []), "--data-dir",
                          str(root), "--split", "all", "--out", str(out), "--voc07"])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["coco/AP"] == 0.0 and metrics["voc/mAP50"] == 0.0 and metrics["voc07/mAP50"] == 0.0
    assert json.loads((out / "predictions.json").read_text()) == []
    assert len(json.loads((out / "ground_truth.json").read_text())["images"]) == len(records)
    assert "mean" in capsys.readouterr().out


def test_evaluate_split_selection_matches_ground_truth_ids(dataset, tmp_path):
    root, records = dataset
    out = tmp_path / "out"
    assert run_command(["evaluate", "--predictions", write_json(tmp_path / "e.json", []), "--data-dir", str(root),
                        "--split-scheme", "stratified", "--split", "test", "--out", str(out)]) == 0
    from distdet.data import make_split

    test_stems = make_split(records, "stratified").test
    images = json.loads((out / "ground_truth.json").read_text())["images"]
    assert [img["id"] for img in images] == list(range(len(test_stems)))
    assert [img["file_name"].rsplit(".", 1)[0] for img in images] == test_stems


def test_evaluate_reports_malformed_file_and_empty_split(dataset, tmp_path, capsys):
    root, _ = dataset
    bad = write_json(tmp_path / "bad.json", [GOOD, {**GOOD, "category_id": 7}])
    assert run_command(["evaluate", "--predictions", bad, "--data-dir", str(root), "--split", "all"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: entry 1: category_id 7" in err
    assert run_command(["evaluate", "--predictions", bad, "--data-dir", str(root), "--split", "val",
                        "--split-scheme", "stratified"]) == 2
    assert "'val' part of the stratified split is empty" in capsys.readouterr().err


def test_cli_lists_evaluate(tmp_path):
    result = subprocess.run([sys.executable, "-m", "distdet", "evaluate", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert result.returncode == 0 and "--predictions" in result.stdout and "--checkpoint" in result.stdout


def test_evaluate_reports_missing_checkpoint(dataset, tmp_path, capsys):
    root, _ = dataset
    assert run_command(["evaluate", "--checkpoint", str(tmp_path / "nothing"), "--data-dir", str(root)]) == 2
    assert f"no model weights at {tmp_path / 'nothing'}" in capsys.readouterr().err


def test_checkpoint_defaults_to_the_data_and_split_it_was_trained_on(dataset, tmp_path, capsys):
    """A run folder evaluated without --data-dir uses the data and split recorded in its card."""
    from distdet.data import save_manifest, stratified_split
    from distdet.modeling.model_card import ModelCard, save_detector
    from distdet.modeling.models import build_model

    root, records = dataset
    split = stratified_split(records, test_fraction=0.3, seed=3)
    manifest = save_manifest(tmp_path / "split.json", split)
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, min_size=96, max_size=128)
    info = {"data_dir": str(root), "split_manifest": str(manifest)}
    card = ModelCard("fasterrcnn_mobilenet_v3_large_320_fpn", list(CLASS_NAMES), {"min_size": 96, "max_size": 128}, info)
    save_detector(model, card, tmp_path / "run")
    assert run_command(["evaluate", "--checkpoint", str(tmp_path / "run"), "--num-rendered", "0"]) == 0
    assert f"using the training run's data {root}" in capsys.readouterr().err
    ground_truth = json.loads((tmp_path / "run" / "eval-test" / "ground_truth.json").read_text())
    assert [image["file_name"] for image in ground_truth["images"]] == [
        record.image_path.name for record in split.select(records)["test"]
    ]
