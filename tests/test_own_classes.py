"""A dataset with five made-up classes, from make-synthetic through training, evaluation,
predict and export: every step uses the run's five names and their colours, never the
face-mask table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.trainer import FAST, REPO, check_ok, child_env, launch_command, run, train_command

from distdet.classes import class_colours
from distdet.data import open_index
from distdet.eval.outputs import rendered_indices
from distdet.training.checkpoints import latest_checkpoint

FIVE = ["cat", "dog", "bird", "fish", "frog"]
COLOURS = class_colours(FIVE)
TRAIN = [*FAST, "--test-fraction", "0.3", "--epochs", "1"]


def distdet(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distdet", *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(), cwd=REPO)


@pytest.fixture(scope="module")
def five_class_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("five") / "data"
    done = distdet("make-synthetic", str(out), "--num-images", "12", "--width", "96", "--height", "72",
                   "--max-objects", "2", "--min-face", "16", "--max-face", "36", "--class-names", ",".join(FIVE))
    assert done.returncode == 0, done.stderr
    assert "cat" in done.stdout and "frog" in done.stdout
    return out


def _recorded_lists(run_dir: Path) -> dict[str, list[str]]:
    config = json.loads((run_dir / "config.json").read_text())
    return {"card": json.loads((run_dir / "model_card.json").read_text())["class_names"],
            "config": config["resolved"]["class_names"],
            "config split": config["split_manifest"]["contents"]["class_names"],
            "split.json": json.loads((run_dir / "split.json").read_text())["class_names"]}


def _has_colour(image: np.ndarray, colour: tuple[int, int, int], at_least: int = 1) -> bool:
    return int(np.all(image == colour, axis=2).sum()) >= at_least


@pytest.fixture(scope="module")
def five_class_coco(five_class_data: Path, tmp_path_factory) -> Path:
    """The five-class data as a COCO file whose annotation 3 has a NaN coordinate."""
    from distdet.data.convert import write_coco

    coco = write_coco(open_index(five_class_data), tmp_path_factory.mktemp("coco") / "data")
    content = json.loads((coco / "annotations.json").read_text())
    content["annotations"][3]["bbox"][1] = float("nan")
    (coco / "annotations.json").write_text(json.dumps(content))
    return coco


def test_training_on_a_bad_coco_file_stops_naming_the_entry(five_class_coco: Path, tmp_path: Path) -> None:
    strict = run(train_command([*TRAIN, "--data-dir", str(five_class_coco), "--max-steps", "1",
                                "--output-dir", str(tmp_path / "strict")]))
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert "annotations[3] (id 4) of images[" in strict.stderr and "bbox must be 4 finite numbers" in strict.stderr


def test_lenient_one_process_run_on_a_coco_file_records_the_five_classes(five_class_coco: Path,
                                                                        tmp_path: Path) -> None:
    """--lenient skips the image of the bad entry and trains on the rest."""
    import torch

    run_dir = tmp_path / "run"
    lenient = check_ok(run(train_command([*TRAIN, "--data-dir", str(five_class_coco), "--max-steps", "1",
                                          "--lenient", "--output-dir", str(run_dir)])))
    assert "1 problem(s); the images concerned are skipped" in lenient.stderr
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) + len(split["test"]) == 11  # one of the 12 images skipped
    assert _recorded_lists(run_dir) == dict.fromkeys(("card", "config", "config split", "split.json"), FIVE)
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["info"]["category_ids"] == [1, 2, 3, 4, 5]
    assert card["info"]["annotations"] == str(five_class_coco / "annotations.json")
    # the box predictor has one output per class plus background
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    assert weights["roi_heads.box_predictor.cls_score.weight"].shape[0] == len(FIVE) + 1


@pytest.mark.slow
def test_two_process_training_evaluate_predict_export_use_the_five_classes(five_class_data: Path,
                                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    check_ok(run(launch_command([*TRAIN, "--data-dir", str(five_class_data), "--output-dir", str(run_dir),
                                 "--max-steps", "2", "--final-eval"]), timeout=600))
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["world_size"] == 2
    checkpoint = latest_checkpoint(run_dir)
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert _recorded_lists(run_dir) == dict.fromkeys(("card", "config", "config split", "split.json"), FIVE)
    assert json.loads((run_dir / "test_eval" / "metrics.json").read_text())["class_names"] == FIVE

    # evaluate: names in the metrics, ground-truth boxes drawn in the five-class colours
    done = distdet("evaluate", "--model-dir", str(run_dir), "--output-dir", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["class_names"] == FIVE and "voc/AP50/frog" in metrics and "coco/AP/cat" in metrics
    assert metrics["confusion_matrix"]["rows"] == [*FIVE, "background"]
    index = open_index(five_class_data)
    split = json.loads((run_dir / "split.json").read_text())
    test_records = [r for r in index.records if r.stem in set(split["test"])]
    for i in rendered_indices(len(test_records), 6):
        record = test_records[i]
        pixels = np.asarray(Image.open(tmp_path / "eval" / "renders" / f"{record.stem}.png").convert("RGB"))
        for label in set(record.labels.tolist()):
            assert _has_colour(pixels, COLOURS[FIVE[label - 1]], 10), (record.stem, FIVE[label - 1])

    # predict: names in predictions.json, a legend swatch in each class colour
    image = sorted((five_class_data / "images").iterdir())[0]
    done = distdet("predict", "--model-dir", str(run_dir), "--output-dir", str(tmp_path / "pred"), str(image))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["class_names"] == FIVE
    rendered = np.asarray(Image.open(next((tmp_path / "pred").glob("*.png"))).convert("RGB"))
    assert all(_has_colour(rendered, COLOURS[name], 20) for name in FIVE)

    # export: the class table beside the exported model
    exported = tmp_path / "export" / "model.pt"
    done = distdet("export", "--model-dir", str(run_dir), "--format", "torchscript", "--output-file", str(exported),
                   timeout=600)
    assert done.returncode == 0, done.stderr
    table = json.loads(exported.with_name("model.pt.classes.json").read_text())
    assert [(c["label"], c["name"], tuple(c["colour"])) for c in table["classes"]] == \
        [(i + 1, n, COLOURS[n]) for i, n in enumerate(FIVE)]

    # another class list is refused, naming both lists: resuming, and evaluating
    reordered = ",".join(FIVE[::-1])
    resumed = run(train_command([*TRAIN, "--data-dir", str(five_class_data), "--output-dir", str(run_dir),
                                 "--resume", "auto", "--epochs", "2", "--class-names", reordered]))
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
    assert "class list mismatch: the resumed run" in resumed.stderr
    assert "[cat, dog, bird, fish, frog]" in resumed.stderr and "[frog, fish, bird, dog, cat]" in resumed.stderr
    refused = distdet("evaluate", "--model-dir", str(run_dir), "--class-names", reordered)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "[cat, dog, bird, fish, frog]" in refused.stderr and "[frog, fish, bird, dog, cat]" in refused.stderr
