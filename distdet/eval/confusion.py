"""Confusion matrix and per-class precision / recall / F1 at one score threshold.

Only detections with ``score >= score_threshold`` take part. In each image they are matched
to ground truth *ignoring the class*: in descending score order (stable), each detection
takes the not-yet-taken ground-truth box with the highest IoU, if that IoU is strictly
greater than ``iou_threshold`` (continuous coordinates, see :mod:`distdet.eval.boxes`).
A pair (ground-truth class g, predicted class p) counts in cell ``[g, p]``; an unmatched
detection counts in the ``background`` row (false positive); an unmatched ground-truth box
counts in the ``missed`` column. A detection matched to a ``difficult`` box (or a COCO crowd
region) is dropped, and an unmatched one is not counted as missed.

Per-class numbers are read off the matrix, so they agree with what it shows: true positives
of class c are ``M[c, c]``, precision divides by all kept detections of class c (its
column), recall by all non-difficult ground truth of class c (its row).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distdet.data.records import ImageRecord
from distdet.eval.boxes import pairwise_iou
from distdet.eval.inputs import Prediction, ignored_flags

BACKGROUND_ROW = "background"
MISSED_COLUMN = "missed"


@dataclass(frozen=True)
class ConfusionResult:
    """``matrix[i, j]``: rows are GT classes then ``background``; columns are predicted
    classes then ``missed``. ``matrix[K, K]`` is always 0."""

    class_names: tuple[str, ...]
    matrix: np.ndarray
    score_threshold: float
    iou_threshold: float

    @property
    def row_names(self) -> list[str]:
        return [*self.class_names, BACKGROUND_ROW]

    @property
    def column_names(self) -> list[str]:
        return [*self.class_names, MISSED_COLUMN]

    def per_class(self) -> dict[str, dict[str, float | int | None]]:
        """``{class: {tp, fp, fn, precision, recall, f1}}``; ratios with a zero denominator
        are ``None`` (no detections -> no precision; no ground truth -> no recall)."""
        out: dict[str, dict[str, float | int | None]] = {}
        m = self.matrix
        for c, name in enumerate(self.class_names):
            tp = int(m[c, c])
            predicted = int(m[:, c].sum())
            actual = int(m[c, :].sum())
            precision = tp / predicted if predicted else None
            recall = tp / actual if actual else None
            if precision is None or recall is None:
                f1 = None
            else:
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out[name] = {"tp": tp, "fp": predicted - tp, "fn": actual - tp,
                         "precision": precision, "recall": recall, "f1": f1}
        return out


def confusion_matrix(records: Sequence[ImageRecord], predictions: Sequence[Prediction],
                     class_names: Sequence[str], score_threshold: float = 0.5,
                     iou_threshold: float = 0.5) -> ConfusionResult:
    """Build the matrix described in the module docstring from normalised predictions."""
    k = len(class_names)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    for rec, pred in zip(records, predictions):
        keep = np.flatnonzero(pred["scores"] >= score_threshold)
        keep = keep[np.argsort(-pred["scores"][keep], kind="stable")]
        det_labels = pred["labels"][keep]
        gt_labels = np.asarray(rec.labels, dtype=np.int64).reshape(-1)
        difficult = ignored_flags(rec)
        iou = pairwise_iou(pred["boxes"][keep], rec.boxes)
        taken = np.zeros(gt_labels.shape[0], dtype=bool)
        for d in range(keep.shape[0]):
            candidates = np.where(taken, -1.0, iou[d]) if gt_labels.size else np.zeros(0)
            g = int(np.argmax(candidates)) if candidates.size else -1
            if g >= 0 and candidates[g] > iou_threshold:
                taken[g] = True
                if not difficult[g]:
                    matrix[gt_labels[g] - 1, det_labels[d] - 1] += 1
            else:
                matrix[k, det_labels[d] - 1] += 1
        for g in np.flatnonzero(~taken & ~difficult):
            matrix[gt_labels[g] - 1, k] += 1
    return ConfusionResult(class_names=tuple(class_names), matrix=matrix,
                           score_threshold=float(score_threshold), iou_threshold=float(iou_threshold))
