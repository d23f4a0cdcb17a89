"""Run a trained detector on images from Python.

>>> detector = load_detector("runs/exp1", score_threshold=0.5)
>>> result = detector("photo.png")
>>> result["detections"][0]
{'box': [12.0, 30.5, 80.2, 99.0], 'label': 'with_mask', 'label_id': 1, 'score': 0.97}

One image's result is a dict ``{"file"?, "width", "height", "detections": [...]}`` with
``file`` present when the image was given as a path; each detection is ``{"box": [x1, y1,
x2, y2], "label": name, "label_id": int, "score": float}`` in pixel coordinates of the
image (rounded to 0.01 px), sorted by falling score (rounded to 4 decimals). This is the
structure of each entry in the ``images`` list of ``predictions.json`` written by
``distdet predict``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from distdet.data.images import load_rgb
from distdet.modeling.forward import check_mixed_precision, detect
from distdet.modeling.model_card import ModelCard, load_detector_model
from distdet.modeling.models import set_eval_thresholds

ImageInput = Union[Image.Image, str, Path]


class Detector:
    """A trained detector in eval mode plus the class table and thresholds to report with.

    Calling it on one image (a ``PIL.Image`` or a path) returns one result dict; on a list
    returns a list of result dicts in the same order. Images are run ``batch_size`` at a time;
    torchvision pads a batch to its largest image, so an image's scores and boxes can differ
    in the last digits with the batch it is in (never with batch size 1).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        card: ModelCard,
        device: str | torch.device = "cpu",
        score_threshold: float = 0.5,
        mixed_precision: str = "no",
        batch_size: int = 4,
    ) -> None:
        check_mixed_precision(mixed_precision)
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be within [0, 1], got {score_threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.card = card
        self.class_names: tuple[str, ...] = tuple(card.class_names)
        self.score_threshold = float(score_threshold)
        self.mixed_precision = mixed_precision
        self.batch_size = batch_size
        set_eval_thresholds(self.model, self.score_threshold, self.model.roi_heads.detections_per_img)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(images, (Image.Image, str, Path)):
            return self.predict([images])[0]
        return self.predict(list(images))

    def predict(self, images: Sequence[ImageInput]) -> list[dict[str, Any]]:
        """Results for a list of images or paths, in order. Paths are read as training reads
        images (:func:`distdet.data.images.load_rgb`: PNG/JPEG, every pixel format to 8-bit
        RGB); an unreadable file raises ``DataError`` (a ValueError) naming it."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            pils = [load_rgb(item) if isinstance(item, (str, Path)) else item for item in chunk]
            for item, result in zip(chunk, self.predict_pil(pils)):
                if isinstance(item, (str, Path)):
                    result = {"file": str(item), **result}
                results.append(result)
        return results

    def predict_pil(self, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
        """Run the model on PIL images in one forward pass; results without ``file``."""
        outputs = detect(self.model, [image_to_tensor(image) for image in images], self.device,
                         self.mixed_precision)
        return [self._result(image, output) for image, output in zip(images, outputs)]

    def _result(self, image: Image.Image, output: dict[str, torch.Tensor]) -> dict[str, Any]:
        boxes, labels, scores = (output[key].tolist() for key in ("boxes", "labels", "scores"))
        detections = [
            {"box": [round(v, 2) for v in box], "label": self.class_names[label - 1], "label_id": int(label),
             "score": round(score, 4)}
            for box, label, score in zip(boxes, labels, scores)
        ]
        return {"width": image.width, "height": image.height, "detections": detections}


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as float32 ``[3, H, W]`` in ``[0, 1]``, as the detector was trained on."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return pil_to_tensor(image).float().div_(255.0)


def load_detector(
    path: str | Path,
    device: str | torch.device = "cpu",
    score_threshold: float = 0.5,
    mixed_precision: str = "no",
    batch_size: int = 4,
) -> Detector:
    """Load the model folder (or ``model.pt`` with its card) at ``path`` as a :class:`Detector`.

    Raises FileNotFoundError naming the missing weights or card, ValueError for a card or
    weights that cannot be used.
    """
    model, card = load_detector_model(path, device=device)
    return Detector(model, card, device=device, score_threshold=score_threshold,
                    mixed_precision=mixed_precision, batch_size=batch_size)
