"""Models by name, weight resolution and model cards, on real files."""
from __future__ import annotations

import json

import pytest
import torch

from distdet.classes import CLASS_NAMES
from distdet.modeling.model_card import ModelCard, load_detector_model, save_detector
from distdet.modeling.models import (
    MODEL_NAMES,
    TORCHVISION_MODELS,
    build_model,
    set_eval_thresholds,
    uses_frozen_batchnorm,
)
from distdet.modeling.weights import WeightsUnavailableError, cached_weights_path

SMALL = dict(min_size=96, max_size=128)


@pytest.mark.parametrize("name", list(TORCHVISION_MODELS))
def test_every_torchvision_model_gets_one_output_per_class_plus_background(name):
    model = build_model(name, len(CLASS_NAMES), **SMALL)
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.out_features == len(CLASS_NAMES) + 1
    assert predictor.bbox_pred.out_features == 4 * (len(CLASS_NAMES) + 1)
    assert model.transform.min_size == (96,)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="fasterrcnn_resnet50_fpn"):
        build_model("yolo", 3)


def test_offline_coco_request_names_the_file_and_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DISTDET_OFFLINE", "1")
    spec = TORCHVISION_MODELS["fasterrcnn_mobilenet_v3_large_320_fpn"]
    expected = cached_weights_path(spec.coco_weights)
    assert str(expected).startswith(str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, weights="coco")
    assert str(expected) in str(info.value)
    assert spec.coco_weights.url in str(info.value)


def test_cached_enum_file_is_used_without_network(monkeypatch, tmp_path):
    """A file placed where the error said makes the same request work offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DISTDET_OFFLINE", "1")
    spec = TORCHVISION_MODELS["fasterrcnn_mobilenet_v3_large_320_fpn"]
    source = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 90, **SMALL)
    path = cached_weights_path(spec.coco_weights)
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, weights="coco", **SMALL)
    conv = "backbone.body.0.0.weight"
    assert torch.equal(model.state_dict()[conv], source.state_dict()[conv])
    assert model.roi_heads.box_predictor.cls_score.out_features == 4


def test_weights_file_loads_matching_tensors_and_resizes_the_head(tmp_path):
    source = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 5, **SMALL)
    path = tmp_path / "detector.pt"
    torch.save({"model": source.state_dict()}, path)
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, weights=str(path), **SMALL)
    for key, value in model.state_dict().items():
        if "box_predictor" not in key and "num_batches_tracked" not in key:
            assert torch.equal(value, source.state_dict()[key]), key
    assert model.roi_heads.box_predictor.cls_score.out_features == 4


@pytest.mark.parametrize("content, message", [(b"not a checkpoint", "cannot read"), (None, "does not exist")])
def test_bad_weights_file_is_named(tmp_path, content, message):
    path = tmp_path / "broken.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, weights=str(path))
    assert str(path) in str(info.value)


def test_model_card_round_trip_gives_identical_detections(tmp_path):
    torch.manual_seed(0)
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, box_score_thresh=0.0, **SMALL).eval()
    card = ModelCard("fasterrcnn_mobilenet_v3_large_320_fpn", list(CLASS_NAMES), dict(SMALL, box_score_thresh=0.0))
    weights = save_detector(model, card, tmp_path)
    assert json.loads((tmp_path / "model_card.json").read_text())["model"] == card.model
    loaded, loaded_card = load_detector_model(tmp_path)
    assert loaded_card == card
    image = [torch.rand(3, 100, 120)]
    with torch.inference_mode():
        expected, got = model(image)[0], loaded(image)[0]
    assert len(expected["boxes"]) > 0
    assert torch.equal(expected["boxes"], got["boxes"])
    assert load_detector_model(weights)[1] == card


def test_missing_card_is_reported(tmp_path):
    weights = tmp_path / "model.pt"
    torch.save({}, weights)
    with pytest.raises(FileNotFoundError, match="model_card.json"):
        load_detector_model(weights)


def test_eval_thresholds_are_set_and_returned():
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, **SMALL)
    old = set_eval_thresholds(model, 0.001, 300)
    assert old == (0.05, 100)
    assert (model.roi_heads.score_thresh, model.roi_heads.detections_per_img) == (0.001, 300)


def test_model_names_include_the_tutorial_model():
    assert "fasterrcnn_resnet50_fpn" in MODEL_NAMES


def test_frozen_batchnorm_rebuild_loads_a_pretrained_structure(tmp_path):
    """A detector fine-tuned from pretrained weights (frozen BN) reloads from its card offline."""
    pretrained_like = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, frozen_batchnorm=True, **SMALL)
    assert uses_frozen_batchnorm(pretrained_like)
    assert not uses_frozen_batchnorm(build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, **SMALL))
    card = ModelCard(
        "fasterrcnn_mobilenet_v3_large_320_fpn", list(CLASS_NAMES), dict(SMALL, frozen_batchnorm=True)
    )
    save_detector(pretrained_like, card, tmp_path)
    loaded, _ = load_detector_model(tmp_path)
    for key, value in pretrained_like.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
