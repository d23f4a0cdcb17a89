"""Prediction: the Python API, ``distdet predict`` (renders, JSON, summary lines, ground truth,
two real gloo processes) and bad input, on a small detector trained within the session."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.predict import child_env, original_sample_dir, synthetic_data

from distdet.classes import CLASS_COLOURS, CLASS_NAMES
from distdet.data.images import load_rgb
from distdet.data.voc import parse_voc_annotation

#: Low enough that the briefly trained model reports detections.
THRESHOLD = 0.05
IMAGE_KEYS = {"file", "width", "height", "detections", "rendered"}


@pytest.fixture(scope="session")
def data_dir(shared) -> Path:
    return synthetic_data(shared)


def _images(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "images").iterdir())


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distdet", *args], env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def check_result(result: dict, threshold: float, with_file: bool) -> None:
    """The per-image structure shared by the API and predictions.json."""
    assert ("file" in result) == with_file
    assert isinstance(result["width"], int) and isinstance(result["height"], int)
    scores = [d["score"] for d in result["detections"]]
    assert scores == sorted(scores, reverse=True)
    for det in result["detections"]:
        assert set(det) == {"box", "label", "label_id", "score"}
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= result["width"] and 0 <= y1 <= y2 <= result["height"]
        assert det["label"] == CLASS_NAMES[det["label_id"] - 1]
        assert isinstance(det["score"], float) and threshold <= det["score"] <= 1


# --- Python API ----------------------------------------------------------------------------

def test_api_accepts_pil_images_paths_and_lists(model_dir, data_dir):
    import distdet

    detector = distdet.load_detector(model_dir, score_threshold=THRESHOLD, batch_size=1)
    paths = _images(data_dir)[:4]
    by_path = detector(paths[0])
    check_result(by_path, THRESHOLD, with_file=True)
    assert by_path["file"] == str(paths[0])
    assert (by_path["width"], by_path["height"]) == Image.open(paths[0]).size

    pil = detector(load_rgb(paths[0]))
    check_result(pil, THRESHOLD, with_file=False)
    assert pil == {k: v for k, v in by_path.items() if k != "file"}

    as_list = detector([str(p) for p in paths])
    assert [r["file"] for r in as_list] == [str(p) for p in paths]
    assert as_list == [detector(p) for p in paths]
    assert sum(len(r["detections"]) for r in as_list) > 0, "the test model should detect something"


def test_a_higher_threshold_keeps_exactly_the_detections_above_it(model_dir, data_dir):
    from distdet import load_detector

    paths = _images(data_dir)
    low = load_detector(model_dir, score_threshold=THRESHOLD)(paths)
    scores = sorted({d["score"] for r in low for d in r["detections"]})
    # about half survive; halfway between two reported (rounded) scores, so rounding cannot
    # move a score across the threshold
    high_threshold = (scores[len(scores) // 2] + scores[len(scores) // 2 + 1]) / 2
    high = load_detector(model_dir, score_threshold=high_threshold)(paths)
    for lo, hi in zip(low, high):
        assert hi["detections"] == [d for d in lo["detections"] if d["score"] > high_threshold]


def test_import_distdet_does_not_import_torch():
    code = "import sys, distdet; assert 'torch' not in sys.modules; assert callable(distdet.load_detector)"
    subprocess.run([sys.executable, "-c", code], env=child_env(), check=True, timeout=300)


def test_the_api_and_the_evaluator_run_the_same_forward_pass(model_dir, data_dir):
    """Same batches, same device and precision: the Detector and predict_dataset agree exactly."""
    from accelerate import Accelerator

    from distdet import load_detector
    from distdet.data import DetectionDataset, build_index
    from distdet.eval import predict_dataset

    records = build_index(data_dir).records[:5]
    detector = load_detector(model_dir, score_threshold=0.0, batch_size=2)
    api = detector.predict([record.image_path for record in records])
    evaluated = predict_dataset(detector.model, DetectionDataset(records), Accelerator(cpu=True), batch_size=2)
    assert sum(len(result["detections"]) for result in api) > 0
    for result, prediction in zip(api, evaluated, strict=True):
        assert [d["box"] for d in result["detections"]] == [[round(v, 2) for v in box]
                                                            for box in prediction["boxes"].tolist()]
        assert [d["score"] for d in result["detections"]] == [round(v, 4) for v in prediction["scores"].tolist()]
        assert [d["label_id"] for d in result["detections"]] == prediction["labels"].tolist()


def test_api_names_a_missing_checkpoint_and_an_unreadable_image(model_dir, tmp_path):
    from distdet import load_detector
    from distdet.data import DataError

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_detector(tmp_path / "nowhere")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=str(bad)):
        load_detector(model_dir)(bad)


# --- distdet predict -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(model_dir, data_dir, tmp_path_factory):
    """One CLI run on a folder, a glob and (when present) the original sample images."""
    out = tmp_path_factory.mktemp("predict-cli")
    inputs = [str(data_dir / "images"), str(data_dir / "images" / "synth_000[0-2].png")]  # glob repeats 3 files
    sample = original_sample_dir()
    if sample is not None:
        inputs += [str(sample / "images" / "maksssksksss1.png"), str(sample / "images" / "maksssksksss0.png")]
    proc = run_cli("predict", "--checkpoint", str(model_dir), *inputs, "--out", str(out),
                   "--score-threshold", str(THRESHOLD), "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    return out, proc, json.loads((out / "predictions.json").read_text())


def test_cli_writes_predictions_json_in_input_order(cli_run, model_dir, data_dir):
    out, _, data = cli_run
    assert data["class_names"] == list(CLASS_NAMES)
    assert data["score_threshold"] == THRESHOLD and data["failures"] == []
    assert data["checkpoint"] == str(model_dir)
    files = [entry["file"] for entry in data["images"]]
    expected = [str(p) for p in _images(data_dir)]  # the glob's files are not repeated
    sample = original_sample_dir()
    if sample is not None:
        expected += [str(sample / "images" / "maksssksksss1.png"), str(sample / "images" / "maksssksksss0.png")]
    assert files == expected
    for entry in data["images"]:
        assert set(entry) == IMAGE_KEYS
        check_result({k: v for k, v in entry.items() if k != "rendered"}, THRESHOLD, with_file=True)
        assert entry["rendered"] == Path(entry["file"]).stem + ".png"
    assert sum(len(entry["detections"]) for entry in data["images"]) > 0


def test_cli_agrees_with_the_api(cli_run, model_dir):
    from distdet import load_detector

    _, _, data = cli_run
    detector = load_detector(model_dir, score_threshold=THRESHOLD, batch_size=2)
    api = detector([entry["file"] for entry in data["images"]])
    assert api == [{k: v for k, v in entry.items() if k != "rendered"} for entry in data["images"]]


def test_cli_prints_one_summary_line_per_image(cli_run):
    _, proc, data = cli_run
    for entry in data["images"]:
        counts = {name: sum(d["label"] == name for d in entry["detections"]) for name in CLASS_NAMES}
        line = f"{entry['file']}: " + ", ".join(f"{counts[n]} {n}" for n in CLASS_NAMES)
        assert proc.stdout.count(line + "\n") == 1, line


def test_renders_show_the_boxes_in_class_colours_and_a_legend(cli_run):
    out, _, data = cli_run
    drew_boxes = drew_none = 0
    for entry in data["images"]:
        original = np.asarray(load_rgb(entry["file"]), dtype=np.int16)
        with Image.open(out / entry["rendered"]) as image:
            assert image.format == "PNG"
            rendered = np.asarray(image.convert("RGB"), dtype=np.int16)
        height, width = original.shape[:2]
        assert rendered.shape[0] > height and rendered.shape[1] >= width  # legend strip below
        top = rendered[:height, :width]
        changed = np.any(top != original, axis=2)
        if not entry["detections"]:
            assert not changed.any()
            drew_none += 1
            continue
        drew_boxes += 1
        assert changed.any()
        # the best box is drawn last: its left edge shows its class colour
        best = entry["detections"][0]
        x1, y1, x2, y2 = (int(v) for v in best["box"])
        edge = top[y1 + 1:min(y2, height) - 1, min(x1, width - 1)]
        assert np.all(edge == CLASS_COLOURS[best["label"]], axis=1).mean() > 0.5
        # every changed pixel lies within the boxes' area grown by their caption (above the
        # box, at most 200 px wide, shifted left when it would leave the image)
        inside = np.zeros_like(changed)
        for det in entry["detections"]:
            bx1, by1, bx2, by2 = det["box"]
            left = max(0, min(int(bx1), width - 200) - 4)
            inside[max(0, int(by1) - 40):int(by2) + 4, left:int(bx2) + 200] = True
        assert not (changed & ~inside).any()
        legend = rendered[height:]
        for name in CLASS_NAMES:
            assert np.all(legend == CLASS_COLOURS[name], axis=2).sum() > 20, f"no legend swatch for {name}"
    assert drew_boxes > 0


def test_ground_truth_is_drawn_beside_the_prediction(model_dir, data_dir, tmp_path):
    images = _images(data_dir)[:2]
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    shutil.copy(data_dir / "annotations" / f"{images[0].stem}.xml", annotations)  # none for images[1]
    proc = run_cli("predict", "--checkpoint", str(model_dir), *map(str, images), "--out", str(tmp_path / "out"),
                   "--score-threshold", "0.99", "--annotations", str(annotations))
    assert proc.returncode == 0, proc.stderr
    truth = parse_voc_annotation(annotations / f"{images[0].stem}.xml")
    assert len(truth.labels) > 0
    for image_path in images:
        original = np.asarray(load_rgb(image_path), dtype=np.int16)
        h, w = original.shape[:2]
        rendered = np.asarray(Image.open(tmp_path / "out" / f"{image_path.stem}.png").convert("RGB"), dtype=np.int16)
        assert rendered.shape[1] >= 2 * w  # two panels side by side
        left_changed = _panel_difference(rendered[:, :w], original)
        right_changed = _panel_difference(rendered[:, rendered.shape[1] - w:], original)
        assert right_changed == 0  # score threshold 0.99: no predicted boxes
        if image_path == images[0]:
            assert left_changed > 0  # ground truth boxes drawn
        else:
            assert left_changed == 0  # no annotation: the plain image


def _panel_difference(column: np.ndarray, original: np.ndarray) -> int:
    """Pixels that differ between ``original`` and the panel found in ``column`` below a title."""
    h = original.shape[0]
    best = min(range(0, column.shape[0] - h + 1), key=lambda o: np.abs(column[o:o + h] - original).sum())
    return int(np.any(column[best:best + h] != original, axis=2).sum())


def test_two_processes_write_the_same_merged_file_as_one(model_dir, data_dir, tmp_path):
    inputs = [str(data_dir / "images")]
    sample = original_sample_dir()
    if sample is not None:  # images of other sizes: batches are padded
        inputs.append(str(sample / "images"))
    common = ["--checkpoint", str(model_dir), *inputs, "--score-threshold", str(THRESHOLD), "--batch-size", "2"]
    one = run_cli("predict", *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "distdet", "predict", *common, "--out", str(tmp_path / "two")]
    two = subprocess.run(launch, env=child_env(), capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "with 2 process(es)" in two.stdout
    assert "[rank 0/2]" in two.stdout and "[rank 1/2]" in two.stdout
    merged = (tmp_path / "two" / "predictions.json").read_text()
    assert merged == (tmp_path / "one" / "predictions.json").read_text()
    for entry in json.loads(merged)["images"]:
        assert (tmp_path / "two" / entry["rendered"]).read_bytes() == (tmp_path / "one" / entry["rendered"]).read_bytes()


def test_bad_files_are_listed_and_the_rest_predicted(model_dir, data_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = _images(data_dir)[:2]
    for path in good:
        shutil.copy(path, folder)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (folder / "text.jpg").write_text("not an image")
    truncated = folder / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:300])
    missing = tmp_path / "missing.png"
    proc = run_cli("predict", "--checkpoint", str(model_dir), str(folder), str(missing),
                   "--out", str(tmp_path / "out"), "--score-threshold", str(THRESHOLD))
    assert proc.returncode == 1
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(e["file"]).name for e in data["images"]] == [p.name for p in good]
    failed = {Path(f["file"]).name: f["error"] for f in data["failures"]}
    assert set(failed) == {"missing.png", "corrupt.png", "text.jpg", "truncated.png"}
    assert "no such file" in failed["missing.png"]
    tail = proc.stderr[proc.stderr.index("4 problem(s) with the inputs:"):]
    for name in failed:
        assert name in tail
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(p.name for p in good)


def test_missing_checkpoint_is_a_clear_error(data_dir, tmp_path):
    nowhere = tmp_path / "no-such-run"
    proc = run_cli("predict", "--checkpoint", str(nowhere), str(data_dir / "images"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert f"cannot load checkpoint {nowhere}" in proc.stderr and "Traceback" not in proc.stderr
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "model.pt").write_bytes(b"")
    proc = run_cli("predict", "--checkpoint", str(weights_only), str(data_dir / "images"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "model_card.json" in proc.stderr
    assert not (tmp_path / "o").exists()
