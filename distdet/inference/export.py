"""Export a trained detector to TorchScript or ONNX, and check the export against PyTorch.

Both exports take ONE image and include torchvision's pre- and post-processing (resize,
normalisation, box decoding, NMS, scaling back to the input size):

- TorchScript (``torch.jit.script``): ``model([image])`` with ``image`` float32 ``[3, H, W]``
  in ``[0, 1]`` returns ``(losses, [{"boxes", "labels", "scores"}])``; load with
  ``torch.jit.load``, no distdet needed.
- ONNX (``torch.onnx.export`` with the TorchScript-based exporter, ``dynamo=False``: the
  dynamo exporter of torch 2.x fails on torchvision's data-dependent NMS): one input
  ``image`` float32 ``[3, H, W]`` in ``[0, 1]`` with dynamic ``H`` and ``W``; outputs
  ``boxes`` ``[N, 4]`` (x1, y1, x2, y2 pixels), ``labels`` int64 ``[N]`` (1-based) and
  ``scores`` ``[N]``. Runs in onnxruntime (the optional extra ``distdet[onnx]``).

The score threshold and the number of detections per image are fixed in the export.
:func:`verify_export` runs the exported file in its own runtime and the PyTorch model on the
same images and compares their detections.

Resizing. torchvision's transform computes the resize scale in double precision in eager
mode but in float32 when scripted or traced, so an exported model often resizes an image
to one pixel less than PyTorch does (on the real dataset at ``min_size=800``: 288 of 853
images scripted, 12 traced; at 512: 314 and 217) and its detections then differ. The
exports therefore use :class:`distdet.inference.export_transform.ExactResizeTransform`, which computes the output size in
double precision on every path, as eager PyTorch does.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distdet.inference.export_transform import ExactResizeTransform

from distdet.io_utils import atomic_write

FORMATS: tuple[str, ...] = ("torchscript", "onnx")
#: ONNX opset of the export (torchvision's detection export needs >= 11).
ONNX_OPSET = 17
#: Largest coordinate difference (pixels) between a PyTorch box and its exported twin.
BOX_ATOL = 0.05
#: Largest score difference between a PyTorch detection and its exported twin.
SCORE_ATOL = 1e-3

Detections = dict[str, np.ndarray]  # boxes float32 [N, 4], labels int64 [N], scores float32 [N]


class ExportError(RuntimeError):
    """The export or the runtime needed to load it failed; the message says what to do."""


def exportable_copy(model: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy of ``model`` whose transform is an :class:`ExactResizeTransform`."""
    if model.transform.fixed_size is not None:
        raise ValueError("models with a fixed input size are not supported by the export")
    exported = copy.deepcopy(model).cpu().eval()
    old = exported.transform
    exported.transform = ExactResizeTransform(old.min_size, old.max_size, old.image_mean, old.image_std,
                                              old.size_divisible).eval()
    return exported


def export_torchscript(model: nn.Module, out: str | Path) -> Path:
    """Script an :func:`exportable_copy` of ``model`` and save it to ``out`` atomically."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices
        scripted = torch.jit.script(exportable_copy(model))
    return atomic_write(out, lambda tmp: scripted.save(str(tmp)))


def export_onnx(model: nn.Module, out: str | Path, image_size: tuple[int, int] = (320, 320),
                opset: int = ONNX_OPSET) -> Path:
    """Trace an :func:`exportable_copy` of ``model`` on a random ``image_size = (H, W)``
    image and write ONNX. Raises :class:`ExportError` when the exporter's packages are missing.
    """
    model = exportable_copy(model)
    height, width = image_size
    example = torch.rand(3, int(height), int(width), generator=torch.Generator().manual_seed(0))

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python values in torchvision
            torch.onnx.export(
                model, ([example],), str(tmp), dynamo=False, opset_version=opset,
                input_names=["image"], output_names=["boxes", "labels", "scores"],
                dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                              "labels": {0: "detections"}, "scores": {0: "detections"}},
            )

    try:
        return atomic_write(out, write)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the onnx package ({exc}); install distdet[onnx]") from exc


def export_model(model: nn.Module, fmt: str, out: str | Path, image_size: tuple[int, int] | None = None) -> Path:
    """Export ``model`` in ``fmt`` (``torchscript`` or ``onnx``) to ``out``."""
    if fmt == "torchscript":
        return export_torchscript(model, out)
    if fmt == "onnx":
        size = image_size or (model.transform.min_size[0],) * 2
        return export_onnx(model, out, size)
    raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")


class ExportedDetector:
    """An exported file loaded in its own runtime; call it on one ``[3, H, W]`` float image."""

    def __init__(self, path: str | Path, fmt: str) -> None:
        self.path, self.fmt = Path(path), fmt
        if not self.path.is_file():
            raise FileNotFoundError(f"no exported model at {self.path}")
        if fmt == "torchscript":
            self._module = torch.jit.load(str(self.path), map_location="cpu")
        elif fmt == "onnx":
            try:
                import onnxruntime
            except ImportError as exc:
                raise ExportError("running an ONNX export needs onnxruntime; install distdet[onnx]") from exc
            self._session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        else:
            raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")

    def __call__(self, image: torch.Tensor) -> Detections:
        if self.fmt == "torchscript":
            with torch.inference_mode():
                _, outputs = self._module([image.cpu()])
            return _numpy(outputs[0])
        boxes, labels, scores = self._session.run(None, {"image": image.cpu().numpy()})
        return {"boxes": boxes.astype(np.float32), "labels": labels.astype(np.int64), "scores": scores.astype(np.float32)}


def _numpy(output: dict[str, torch.Tensor]) -> Detections:
    return {"boxes": output["boxes"].float().numpy(), "labels": output["labels"].numpy().astype(np.int64),
            "scores": output["scores"].float().numpy()}


def pytorch_detections(model: nn.Module, image: torch.Tensor) -> Detections:
    """The eager model's detections on one image (CPU, eval mode)."""
    model = model.cpu().eval()
    with torch.inference_mode():
        return _numpy(model([image.cpu()])[0])


def match_detections(reference: Detections, exported: Detections, score_threshold: float,
                     box_atol: float = BOX_ATOL, score_atol: float = SCORE_ATOL) -> tuple[list[str], float, float]:
    """Pair each reference detection with an exported one of the same label, box within
    ``box_atol`` pixels and score within ``score_atol``; return (problems, max box diff,
    max score diff). Detections whose score lies within ``score_atol`` of the threshold may
    be missing on either side (rounding decides whether they pass it)."""
    problems: list[str] = []
    used = np.zeros(len(exported["labels"]), dtype=bool)
    max_box = max_score = 0.0
    for box, label, score in zip(reference["boxes"], reference["labels"], reference["scores"]):
        candidates = np.flatnonzero(~used & (exported["labels"] == label))
        if len(candidates):
            box_diff = np.abs(exported["boxes"][candidates] - box).max(axis=1)
            best = int(np.argmin(box_diff))
            index, diff = int(candidates[best]), float(box_diff[best])
            score_diff = abs(float(exported["scores"][index]) - float(score))
            if diff <= box_atol and score_diff <= score_atol:
                used[index] = True
                max_box, max_score = max(max_box, diff), max(max_score, score_diff)
                continue
        if float(score) - score_threshold > score_atol:
            problems.append(f"PyTorch detection label {int(label)} score {float(score):.4f} box "
                            f"{np.round(box, 2).tolist()} has no twin in the export")
    for index in np.flatnonzero(~used):
        if float(exported["scores"][index]) - score_threshold > score_atol:
            problems.append(f"exported detection label {int(exported['labels'][index])} score "
                            f"{float(exported['scores'][index]):.4f} box "
                            f"{np.round(exported['boxes'][index], 2).tolist()} is not in the PyTorch output")
    return problems, max_box, max_score


@dataclass
class VerifyResult:
    """Outcome of comparing an export with the PyTorch model on some images."""

    images: int = 0
    detections: int = 0
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        verdict = "match" if self.ok else f"DIFFER ({len(self.problems)} problem(s))"
        return (f"{verdict}: {self.detections} PyTorch detection(s) on {self.images} image(s); largest box "
                f"difference {self.max_box_diff:.2g} px, largest score difference {self.max_score_diff:.2g}")


def verify_export(model: nn.Module, path: str | Path, fmt: str, images: Sequence[tuple[str, torch.Tensor]],
                  box_atol: float = BOX_ATOL, score_atol: float = SCORE_ATOL) -> VerifyResult:
    """Compare the exported file's detections with ``model``'s on ``(name, image)`` pairs."""
    exported = ExportedDetector(path, fmt)
    threshold = float(model.roi_heads.score_thresh)
    result = VerifyResult()
    for name, image in images:
        reference = pytorch_detections(model, image)
        problems, box_diff, score_diff = match_detections(reference, exported(image), threshold, box_atol, score_atol)
        result.images += 1
        result.detections += len(reference["labels"])
        result.max_box_diff = max(result.max_box_diff, box_diff)
        result.max_score_diff = max(result.max_score_diff, score_diff)
        result.problems += [f"{name}: {problem}" for problem in problems]
    return result


def synthetic_verify_images(num_images: int = 3, seed: int = 1234) -> list[tuple[str, torch.Tensor]]:
    """``(name, image)`` pairs of synthetic face-mask images, the default for ``--verify``."""
    from distdet.data.synthetic import make_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="distdet-verify-") as tmp:
        folder = make_synthetic_dataset(Path(tmp) / "synthetic", num_images=num_images, seed=seed)
        return load_verify_images(sorted((folder / "images").iterdir()))


def load_verify_images(paths: Sequence[str | Path]) -> list[tuple[str, torch.Tensor]]:
    """``(path, image)`` pairs read as training reads images; DataError names a bad file."""
    from distdet.data.images import load_rgb
    from distdet.inference.predictor import image_to_tensor

    return [(str(path), image_to_tensor(load_rgb(path))) for path in paths]
