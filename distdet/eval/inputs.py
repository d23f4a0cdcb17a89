"""Validation and normalisation of what the metrics consume: records and per-image predictions.

A *prediction* for one image is a mapping with ``boxes`` ``[K, 4]`` (x1, y1, x2, y2,
continuous pixel coordinates), ``scores`` ``[K]`` and ``labels`` ``[K]`` (1-based class ids);
a prediction list has one entry per record, in record order.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from distdet.data.records import ImageRecord

Prediction = dict[str, np.ndarray]


def difficult_flags(record: ImageRecord) -> np.ndarray:
    """The record's ``difficult`` flags as bool ``[N]`` (all False when the record has none)."""
    flags = np.asarray(record.difficult, dtype=bool).reshape(-1)
    if flags.shape[0] == record.num_objects:
        return flags
    if flags.shape[0] == 0:
        return np.zeros(record.num_objects, dtype=bool)
    raise ValueError(f"{record.annotation_path}: {flags.shape[0]} difficult flags for "
                     f"{record.num_objects} objects")


def ignored_flags(record: ImageRecord) -> np.ndarray:
    """Objects that VOC matching and the confusion matrix ignore: ``difficult`` ones and COCO
    crowd regions (a detection on one is neither right nor wrong, and missing it costs nothing)."""
    return difficult_flags(record) | record.crowd


def normalize_predictions(records: Sequence[ImageRecord], predictions: Sequence[Mapping[str, Any]],
                          num_classes: int) -> list[Prediction]:
    """Check ``predictions`` against ``records``; return float64 boxes/scores, int64 labels.

    Raises ``ValueError`` naming the image (position and stem) and the problem for: a length
    mismatch with ``records``, missing keys, wrong shapes, labels outside ``1..num_classes``,
    non-finite numbers.
    """
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} images; "
                         "need one prediction per image, in record order")
    out: list[Prediction] = []
    for i, (rec, pred) in enumerate(zip(records, predictions)):
        where = f"prediction {i} (image {rec.stem!r})"
        missing = [k for k in ("boxes", "scores", "labels") if k not in pred]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        boxes = np.asarray(pred["boxes"], dtype=np.float64)
        scores = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
        labels_raw = np.asarray(pred["labels"]).reshape(-1)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{where}: boxes must be [K, 4], got shape {tuple(boxes.shape)}")
        if not boxes.shape[0] == scores.shape[0] == labels_raw.shape[0]:
            raise ValueError(f"{where}: {boxes.shape[0]} boxes, {scores.shape[0]} scores and "
                             f"{labels_raw.shape[0]} labels; they must match")
        if labels_raw.size and not np.all(np.equal(np.mod(labels_raw, 1), 0)):
            raise ValueError(f"{where}: labels must be integers")
        labels = labels_raw.astype(np.int64)
        if labels.size and (labels.min() < 1 or labels.max() > num_classes):
            raise ValueError(f"{where}: labels must be class ids 1..{num_classes}, got "
                             f"{sorted(set(labels.tolist()) - set(range(1, num_classes + 1)))}")
        if not (np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores))):
            raise ValueError(f"{where}: boxes and scores must be finite")
        out.append({"boxes": boxes, "scores": scores, "labels": labels})
    return out
