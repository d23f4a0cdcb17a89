"""Export: the exported model, loaded by its own runtime, detects what the PyTorch model does."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.predict import child_env, original_sample_dir, synthetic_data

from distdet.data.images import load_rgb
from distdet.inference.export import export_model, exportable_copy, load_verify_images, verify_export
from distdet.modeling.model_card import load_detector_model
from distdet.inference.predictor import image_to_tensor

#: Largest coordinate difference accepted between PyTorch and exported boxes (pixels).
BOX_TOL = 0.05
#: (width, height) of images that torchvision's own scripted / traced transform resizes to one
#: pixel less than eager PyTorch does at min_size 96, max_size 128 (the test model's).
FLOAT32_TROUBLE_SIZES = [(141, 96), (400, 156)]

FORMATS = [
    "torchscript",
    pytest.param("onnx", marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("onnxruntime") is None,
        reason="onnxruntime is not installed (optional extra distdet[onnx])")),
]


@pytest.fixture(scope="session")
def images(shared) -> list[tuple[str, torch.Tensor]]:
    """Synthetic images, two of them resized to sizes where torchvision's float32 resize
    scale loses a pixel (96x141 when traced, 156x400 when scripted), plus the original
    dataset samples when present (other sizes, RGBA and 16-bit files)."""
    paths = sorted((synthetic_data(shared) / "images").iterdir())[:4]
    sample = original_sample_dir()
    if sample is not None:
        paths += sorted((sample / "images").iterdir())
    first = load_rgb(paths[0])
    resized = [(f"{paths[0].name} resized to {w}x{h}", image_to_tensor(first.resize((w, h), Image.BILINEAR)))
               for w, h in FLOAT32_TROUBLE_SIZES]
    return load_verify_images(paths) + resized


@pytest.fixture(scope="module", params=FORMATS)
def exported(request, model_dir, tmp_path_factory) -> tuple[str, Path]:
    fmt = request.param
    out = tmp_path_factory.mktemp(f"export-{fmt}") / f"model.{'pt' if fmt == 'torchscript' else 'onnx'}"
    proc = subprocess.run([sys.executable, "-m", "distdet", "export", "--checkpoint", str(model_dir),
                           "--format", fmt, "--out", str(out)], env=child_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and f"wrote {fmt} model {out}" in proc.stdout
    return fmt, out


def _run_export(fmt: str, path: Path, image: torch.Tensor) -> dict[str, np.ndarray]:
    """The exported file run by its own runtime, without distdet code."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
        with torch.inference_mode():
            _, outputs = module([image])
        return {k: v.numpy() for k, v in outputs[0].items()}
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, labels, scores = session.run(["boxes", "labels", "scores"], {"image": image.numpy()})
    return {"boxes": boxes, "labels": labels, "scores": scores}


def test_exported_model_detects_what_pytorch_detects(exported, model_dir, images):
    fmt, path = exported
    model, _ = load_detector_model(model_dir)
    total = 0
    for name, image in images:
        with torch.inference_mode():
            ref = {k: v.numpy() for k, v in model([image])[0].items()}
        got = _run_export(fmt, path, image)
        assert len(got["labels"]) == len(ref["labels"]), name
        total += len(ref["labels"])
        unused = list(range(len(got["labels"])))
        for box, label, score in zip(ref["boxes"], ref["labels"], ref["scores"]):
            twins = [i for i in unused if got["labels"][i] == label
                     and np.abs(got["boxes"][i] - box).max() <= BOX_TOL and abs(got["scores"][i] - score) <= 1e-3]
            assert twins, f"{name}: {fmt} export lacks the detection {label} {score:.4f} {box}"
            unused.remove(twins[0])
    assert total > 0, "the test model should detect something"


def test_export_transform_resizes_exactly_as_eager_pytorch(model_dir):
    model, _ = load_detector_model(model_dir)
    assert (model.transform.min_size, model.transform.max_size) == ((96,), 128)
    exact = exportable_copy(model).transform
    scripted = torch.jit.script(exportable_copy(model)).transform
    for width, height in FLOAT32_TROUBLE_SIZES + [(128, 96), (301, 400), (600, 399)]:
        image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(width))
        eager_batch, _ = model.transform([image])
        for transform in (exact, scripted):
            batch, _ = transform([image])
            assert batch.image_sizes == eager_batch.image_sizes, (width, height)
            assert torch.equal(batch.tensors, eager_batch.tensors)


def test_exported_model_accepts_other_image_sizes(exported, model_dir):
    fmt, path = exported
    for height, width in [(60, 200), (333, 101)]:
        image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height))
        out = _run_export(fmt, path, image)
        assert out["boxes"].shape[1:] == (4,)
        if len(out["boxes"]):
            assert out["boxes"][:, 2].max() <= width + 1e-3 and out["boxes"][:, 3].max() <= height + 1e-3


def test_verify_passes_for_the_export_and_catches_a_different_model(exported, model_dir, images):
    fmt, path = exported
    model, _ = load_detector_model(model_dir)
    result = verify_export(model, path, fmt, images)
    assert result.ok, result.problems
    assert result.images == len(images) and result.detections > 0
    assert result.max_box_diff <= BOX_TOL

    with torch.no_grad():  # a model whose box regression differs: the export must not match it
        model.roi_heads.box_predictor.bbox_pred.bias.add_(0.5)
    result = verify_export(model, path, fmt, images)
    assert not result.ok and result.problems
    assert "DIFFER" in result.describe()


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_verify_reports_a_match(fmt, model_dir, shared, tmp_path):
    verify_on = sorted((synthetic_data(shared) / "images").iterdir())[:2]
    proc = subprocess.run([sys.executable, "-m", "distdet", "export", "--checkpoint", str(model_dir),
                           "--format", fmt, "--out", str(tmp_path / "m"), "--image-size", "120", "160",
                           "--score-threshold", "0.05", "--verify-images", *map(str, verify_on)],
                          env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "score threshold 0.05" in proc.stdout
    assert "verify: match:" in proc.stdout and "on 2 image(s)" in proc.stdout


def test_export_names_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distdet", "export", "--checkpoint", str(tmp_path / "gone"),
                           "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and str(tmp_path / "gone") in proc.stderr
    assert not (tmp_path / "m.pt").exists()


def test_export_model_rejects_an_unknown_format(model_dir, tmp_path):
    model, _ = load_detector_model(model_dir)
    with pytest.raises(ValueError, match="torchscript, onnx"):
        export_model(model, "tflite", tmp_path / "m")
