"""In-memory annotation records: what one image's annotations (a VOC XML file, or a COCO entry) hold."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One image and its annotations, parsed once.

    ``boxes`` are float32 ``[N, 4]`` in ``x1, y1, x2, y2`` pixel coordinates on a continuous
    axis (no "+1" convention), already clamped to the image; ``labels`` are int64 ``[N]`` with
    1-based class ids (0 is background and never appears); ``difficult`` is bool ``[N]``;
    ``iscrowd`` is bool ``[N]`` (COCO crowd regions: never trained on, ignored in evaluation
    as pycocotools does; empty means none). An image without objects has
    ``boxes.shape == (0, 4)``. ``source_id`` is the image's id in its COCO file (None for VOC).
    """

    stem: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    source_id: int | None = None

    @property
    def num_objects(self) -> int:
        return int(self.labels.shape[0])

    @property
    def crowd(self) -> np.ndarray:
        """The ``iscrowd`` flags as bool ``[N]`` (all False when the record has none)."""
        flags = np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        return flags if flags.shape[0] == self.num_objects else np.zeros(self.num_objects, dtype=bool)
