"""Training with --ema-decay on 2 real gloo processes: the ranks' EMA weights agree bit for bit,
and the EMA weights (not the raw ones) are validated, kept as best/, scored on the test split and
saved as model.pt, whose card says so and which evaluate and predict load.

One run (module fixture), several assertions on its files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from distdet.cli import main as distdet_main
from distdet.data import DetectionDataset
from distdet.data.sources import open_index
from distdet.data.splits import select_part
from distdet.data.synthetic import make_synthetic_dataset
from distdet.data.transforms import get_transforms
from distdet.eval import evaluate_model, scalar_metrics
from distdet.inference.predictor import load_detector
from distdet.modeling.model_card import load_detector_model
from distdet.training.checkpoints import CHECKPOINTS_DIR, complete_checkpoints, latest_checkpoint
from distdet.training.ema import parameters_digest
from support.trainer import FAST, check_ok, launch_command, load_weights, read_jsonl, run

pytestmark = pytest.mark.timeout(600)

#: 2 epochs of 2 optimizer steps (6 training images after the validation cut, 2 ranks, batch 2), the
#: second one skipped for a NaN loss on rank 1 (no EMA update either); the rate is high enough for the
#: raw and the EMA weights to score differently after 3 updates; evaluation batches of 1 image, so
#: that rank 1 predicts some images itself (with rank 0's BatchNorm buffers)
EMA_FLAGS = ["--ema-decay", "0.9", "--ema-tau", "2", "--epochs", "2", "--eval-every", "1", "--val-fraction", "0.3",
             "--final-eval", "--lr", "0.03", "--eval-batch-size", "1", "--debug-nan-at-step", "1",
             "--debug-nan-rank", "1"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ema")
    # one large face per image: the barely trained detector then scores above 0 (AR, AP) on them
    data_dir = make_synthetic_dataset(base / "large_faces", num_images=11, image_size=(96, 72),
                                      max_objects_per_image=1, face_size=(44, 64))
    out = base / "run"
    check_ok(run(launch_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), *EMA_FLAGS])))
    assert json.loads((out / "config.json").read_text())["resolved"]["world_size"] == 2
    assert (latest_checkpoint(out) / "random_states_1.pkl").is_file()
    return out


def test_the_two_ranks_hold_bit_identical_ema_weights(ema_run):
    checkpoints = complete_checkpoints(ema_run)
    assert [c.name for c in checkpoints] == ["step_000002", "step_000004"]
    for checkpoint in checkpoints:
        info = json.loads((checkpoint / "ema.json").read_text())
        saved = parameters_digest(load_file(checkpoint / "ema.safetensors").items())
        assert info["rank_digests"] == [saved, saved], checkpoint.name


def test_model_pt_and_best_hold_the_ema_weights_not_the_raw_ones(ema_run):
    report = json.loads((ema_run / "report.json").read_text())
    last = latest_checkpoint(ema_run)
    ema, raw = load_file(last / "ema.safetensors"), load_file(last / "model.safetensors")
    final = load_weights(ema_run)
    assert all(torch.equal(final[name], value) for name, value in ema.items())
    buffers = set(final) - set(ema)
    assert buffers and all(torch.equal(final[name], raw[name]) for name in buffers)  # BN buffers: copied
    differing = [name for name in ema if not torch.equal(ema[name], raw[name])]
    assert len(differing) > len(ema) // 2, "the EMA should differ from the raw weights"

    best_step = report["best_step"]
    best_ema = load_file(ema_run / CHECKPOINTS_DIR / f"step_{best_step:06d}" / "ema.safetensors")
    best = load_weights(ema_run / "best")
    assert all(torch.equal(best[name], value) for name, value in best_ema.items())
    for folder in (ema_run, ema_run / "best"):
        info = json.loads((folder / "model_card.json").read_text())["info"]
        assert (info["weights_kind"], info["ema_decay"], info["ema_tau"]) == ("ema", 0.9, 2.0)
    final_info = json.loads((ema_run / "model_card.json").read_text())["info"]
    assert (report["global_step"], report["updates"], final_info["ema_updates"]) == (4, 3, 3)
    assert json.loads((last / "ema.json").read_text())["updates"] == 3


def _evaluation(run_dir: Path, part: str) -> DetectionDataset:
    """The run's ``part`` as the trainer builds it (its evaluation transform included)."""
    data_dir = json.loads((run_dir / "config.json").read_text())["resolved"]["data_dir"]
    records = select_part(open_index(data_dir).records, part, manifest=run_dir / "split.json")
    return DetectionDataset(records, transforms=get_transforms("hflip", train=False))


def _raw_model(run_dir: Path) -> torch.nn.Module:
    """model.pt's detector with the raw weights of the last checkpoint instead of the EMA's."""
    model, _ = load_detector_model(run_dir)
    model.load_state_dict(load_file(latest_checkpoint(run_dir) / "model.safetensors"))
    return model


def test_validation_and_test_scores_are_those_of_the_ema_weights(ema_run, tmp_path):
    """model.pt (the EMA's weights), evaluated on one process, reproduces the last validation's
    metrics and the final test evaluation's detections, which the 2 ranks computed (up to float
    rounding: the ranks ran 1 torch thread each, this process runs the suite's count); the raw
    weights give other numbers."""
    ema_model, card = load_detector_model(ema_run)
    models, accelerator = {"ema": ema_model, "raw": _raw_model(ema_run)}, Accelerator(cpu=True)
    scores = {name: scalar_metrics(evaluate_model(model, _evaluation(ema_run, "val"), accelerator,
                                                  class_names=card.class_names, batch_size=1))
              for name, model in models.items()}
    last_val = [r for r in read_jsonl(ema_run / "metrics.jsonl") if r["kind"] == "val"][-1]
    assert last_val["step"] == 4 and last_val["coco/AR100"] > 0
    # the ranks ran 1 torch thread each, this process may run more: equal up to float rounding
    assert {k: last_val[k] for k in scores["ema"]} == pytest.approx(scores["ema"], abs=1e-6)
    assert {k: last_val[k] for k in scores["raw"]} != pytest.approx(scores["raw"], abs=1e-6)

    for name, model in models.items():
        evaluate_model(model, _evaluation(ema_run, "test"), accelerator, class_names=card.class_names, batch_size=1,
                       out_dir=tmp_path / name, num_rendered=0)
    during_training = json.loads((ema_run / "test_eval" / "predictions.json").read_text())
    assert _same_detections(json.loads((tmp_path / "ema" / "predictions.json").read_text()), during_training)
    assert not _same_detections(json.loads((tmp_path / "raw" / "predictions.json").read_text()), during_training)


def _same_detections(a: list[dict], b: list[dict], box_tol: float = 1e-3, score_tol: float = 1e-5) -> bool:
    """The same detections per (image, class) up to float rounding (thread counts change the last
    bits, and with them the order of near-equal scores): counts, sorted scores, and every box of
    one side matched by a box of the other."""
    def groups(detections: list[dict]) -> dict[tuple[int, int], list[dict]]:
        out: dict[tuple[int, int], list[dict]] = {}
        for d in detections:
            out.setdefault((d["image_id"], d["category_id"]), []).append(d)
        return out

    ga, gb = groups(a), groups(b)
    if ga.keys() != gb.keys():
        return False
    for key, da in ga.items():
        db = gb[key]
        scores_a, scores_b = sorted(d["score"] for d in da), sorted(d["score"] for d in db)
        if len(da) != len(db) or any(abs(x - y) > score_tol for x, y in zip(scores_a, scores_b)):
            return False
        if not all(any(max(abs(p - q) for p, q in zip(d["bbox"], e["bbox"])) <= box_tol for e in db) for d in da):
            return False
    return True


def test_evaluate_and_predict_load_the_ema_model(ema_run, tmp_path):
    assert distdet_main(["evaluate", "--model-dir", str(ema_run), "--output-dir", str(tmp_path), "--batch-size", "4",
                         "--num-rendered", "0"]) == 0
    assert json.loads((tmp_path / "predictions.json").read_text())
    detector = load_detector(ema_run, score_threshold=0.01)
    data_dir = Path(json.loads((ema_run / "config.json").read_text())["resolved"]["data_dir"])
    result = detector(sorted((data_dir / "images").iterdir())[0])
    assert detector.card.info["weights_kind"] == "ema" and result["detections"]
