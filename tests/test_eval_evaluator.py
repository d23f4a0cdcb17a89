"""The evaluator on one process: sharding plan, detector settings, mixed precision."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from support.evalm import REPO_ROOT

from distdet.classes import CLASS_NAMES
from distdet.data import DetectionDataset, build_index
from distdet.data.synthetic import make_synthetic_dataset
from distdet.eval import compute_metrics, evaluate_model, predict_dataset
from distdet.runtime.sharding import shard_batches
from distdet.modeling.models import build_model

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.mark.parametrize("num_items", [1, 5, 7, 12])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_batches_are_the_same_for_any_number_of_processes(num_items, batch_size):
    single = shard_batches(num_items, batch_size, 1, 0)
    assert [i for b in single for i in b] == list(range(num_items))
    for world in (2, 3, 4):
        shards = [shard_batches(num_items, batch_size, world, rank) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # equal work per rank (padded)
        every = [b for s in shards for b in s]
        assert all(b in single for b in every)  # never a batch that one process would not form
        assert sorted({tuple(b) for b in every}) == sorted(tuple(b) for b in single)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("evaluator") / "data", num_images=5, seed=7,
                                  image_size=(160, 120), face_size=(20, 50))
    torch.manual_seed(0)
    model = build_model(MODEL, len(CLASS_NAMES), min_size=128, max_size=160)
    return root, DetectionDataset(build_index(root).records), model


def test_evaluate_model_sets_and_restores_detector_settings(small, tmp_path):
    _, dataset, model = small
    accelerator = Accelerator(cpu=True)
    model.train()
    heads = model.roi_heads
    before = (heads.score_thresh, heads.detections_per_img)
    metrics = evaluate_model(model, dataset, accelerator, batch_size=3, box_score_thresh=0.02,
                             box_detections_per_img=7, out_dir=tmp_path / "out", num_rendered=2)
    assert (heads.score_thresh, heads.detections_per_img) == before
    assert model.training  # mode restored
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"metrics.json", "predictions.json", "renders"}

    heads.score_thresh, heads.detections_per_img = 0.02, 7
    predictions = predict_dataset(model, dataset, accelerator, batch_size=3)
    heads.score_thresh, heads.detections_per_img = before
    assert len(predictions) == len(dataset)
    for p in predictions:
        assert 0 < len(p["scores"]) <= 7 and p["scores"].min() >= 0.02
        assert p["boxes"].dtype == np.float32 and p["labels"].dtype == np.int64
    assert metrics == compute_metrics(dataset.records, predictions, CLASS_NAMES)


def test_evaluate_model_needs_ground_truth(small):
    _, dataset, model = small
    with pytest.raises(TypeError, match="no .records"):
        evaluate_model(model, list(dataset), Accelerator(cpu=True))
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(model, DetectionDataset([]), Accelerator(cpu=True))


BF16_CHILD = textwrap.dedent("""
    import sys, numpy as np, torch
    from accelerate import Accelerator
    from distdet.data import DetectionDataset, build_index
    from distdet.eval import predict_dataset
    from distdet.modeling.models import build_model
    torch.manual_seed(0)
    model = build_model("%s", 3, min_size=128, max_size=160)
    dataset = DetectionDataset(build_index(sys.argv[1]).records[:2])
    accelerator = Accelerator(cpu=True, mixed_precision=sys.argv[2])
    preds = predict_dataset(model, dataset, accelerator, batch_size=2)
    np.save(sys.argv[3], np.concatenate([p["scores"] for p in preds]))
    assert all(p["boxes"].dtype == np.float32 for p in preds)
""" % MODEL)


def test_mixed_precision_is_honoured(small, tmp_path):
    root, _, _ = small
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    scores = {}
    for precision in ("no", "bf16"):
        out = tmp_path / f"{precision}.npy"
        result = subprocess.run([sys.executable, "-c", BF16_CHILD, str(root), precision, str(out)], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        scores[precision] = np.load(out)
    # bf16 autocast changes the numbers (so it was applied) but not beyond bf16 precision.
    n = min(len(scores["no"]), len(scores["bf16"]), 20)
    assert n > 0 and not np.array_equal(scores["no"], scores["bf16"])
    assert np.allclose(np.sort(scores["no"])[-n:], np.sort(scores["bf16"])[-n:], atol=0.05)
