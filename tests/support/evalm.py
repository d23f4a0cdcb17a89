"""Shared helpers of the evaluation tests: records by hand, real annotations, random detections."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from distdet.classes import CLASS_NAMES
from distdet.data.records import ImageRecord
from support.data import facemask_dir  # noqa: F401  (re-exported for the metric tests)

REPO_ROOT = Path(__file__).resolve().parents[2]


def record(stem: str, boxes, labels, difficult=None, width: int = 100, height: int = 100) -> ImageRecord:
    """A ground-truth record built by hand (no files behind it)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    difficult = np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool)
    return ImageRecord(stem, Path(f"/nonexistent/{stem}.png"), Path(f"/nonexistent/{stem}.xml"),
                       width, height, boxes, labels, difficult)


def pred(boxes=(), scores=(), labels=()) -> dict[str, np.ndarray]:
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "scores": np.asarray(scores, dtype=np.float32).reshape(-1),
            "labels": np.asarray(labels, dtype=np.int64).reshape(-1)}


def synthetic_records(n: int, seed: int) -> list[ImageRecord]:
    """Random ground truth resembling the real data (some images empty, some difficult boxes)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(0, 7))
        xy = rng.uniform(0, 320, (k, 2))
        wh = rng.uniform(6, 90, (k, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, 400)], axis=1)
        labels = rng.choice([1, 2, 3], size=k, p=[0.75, 0.2, 0.05])
        out.append(record(f"img{i:03d}", boxes, labels, rng.random(k) < 0.08, 400, 400))
    return out


def random_detections(records: list[ImageRecord], seed: int, max_extra: int = 12) -> list[dict]:
    """Jittered copies of ground truth (sometimes the wrong class, sometimes twice) plus random
    boxes; scores on a 0.01 grid so that ties occur."""
    rng = np.random.default_rng(seed)
    preds = []
    for rec in records:
        boxes, scores, labels = [], [], []
        for box, label in zip(rec.boxes, rec.labels):
            for _ in range(int(rng.choice([0, 1, 1, 2]))):
                size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
                boxes.append(box + rng.normal(0, 0.12, 4) * size)
                labels.append(label if rng.random() < 0.8 else rng.integers(1, len(CLASS_NAMES) + 1))
                scores.append(round(float(rng.uniform(0.2, 1.0)), 2))
        for _ in range(int(rng.integers(0, max_extra + 1))):
            xy = rng.uniform(0, rec.width * 0.8, 2)
            boxes.append(np.concatenate([xy, xy + rng.uniform(5, 80, 2)]))
            labels.append(rng.integers(1, len(CLASS_NAMES) + 1))
            scores.append(round(float(rng.uniform(0.0, 0.7)), 2))
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        preds.append(pred(b, scores, labels))
    return preds
