"""In-memory annotation records: what one parsed VOC XML file holds."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One image and its annotations, parsed once.

    ``boxes`` are float32 ``[N, 4]`` in ``x1, y1, x2, y2`` pixel coordinates on a continuous
    axis (no "+1" convention), already clamped to the image; ``labels`` are int64 ``[N]`` with
    1-based class ids (0 is background and never appears); ``difficult`` is bool ``[N]``.
    An image without objects has ``boxes.shape == (0, 4)``.
    """

    stem: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def num_objects(self) -> int:
        return int(self.labels.shape[0])
