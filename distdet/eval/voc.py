"""PASCAL VOC protocol: per-class AP at IoU 0.5, matched the way the VOC devkit matches.

Matching, for each class separately:

1. the detections of the class, from all images, are ordered by descending score; ties keep
   image order, then the order within the image (a stable sort, so the result is
   deterministic; the devkit leaves ties to an unstable sort);
2. each detection is compared with the ground-truth box *of its class in its image* with the
   highest IoU (the first such box on an exact tie), whether or not that box is already taken;
3. if that IoU is strictly greater than the threshold (``ovmax > 0.5`` as in the devkit;
   pycocotools matches at ``>=``, which differs only at exactly 0.5): a box flagged
   ``difficult`` makes the detection neither true nor false positive (it is dropped); an
   untaken box makes it a true positive and takes the box; a taken box makes it a false
   positive (duplicate). Otherwise it is a false positive.

IoU uses continuous coordinates (no "+1"), see :mod:`distdet.eval.boxes`. Difficult objects
are not counted as positives; COCO crowd regions (``iscrowd``) are treated exactly like
difficult objects. AP is the area under the precision-recall curve made
monotone (all-point interpolation, VOC 2010 onwards) or, on request, the mean of the
interpolated precision at recall 0, 0.1, ..., 1 (VOC 2007 11-point). A class without
non-difficult ground truth has an undefined AP (``None``) and is left out of the mean.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distdet.data.records import ImageRecord
from distdet.eval.boxes import pairwise_iou
from distdet.eval.inputs import Prediction, ignored_flags

VOC_IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class ClassCurve:
    """Matching outcome of one class: precision/recall after each ranked detection."""

    name: str
    num_positives: int  # non-difficult ground-truth objects
    scores: np.ndarray  # scores of the counted detections, descending
    true_positive: np.ndarray  # bool, aligned with ``scores``
    precision: np.ndarray
    recall: np.ndarray

    @property
    def num_detections(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class _Flat:
    """All ground truth and all detections of an evaluation, flattened over images."""

    gt_labels: np.ndarray
    gt_difficult: np.ndarray
    det_labels: np.ndarray
    det_scores: np.ndarray
    det_best_iou: np.ndarray  # IoU with the best same-class GT box of its image, -1 if none
    det_best_gt: np.ndarray  # global index of that box, -1 if none


def _flatten(records: Sequence[ImageRecord], predictions: Sequence[Prediction]) -> _Flat:
    gt_labels, gt_difficult, det_labels, det_scores, best_iou, best_gt = [], [], [], [], [], []
    offset = 0
    for rec, pred in zip(records, predictions):
        labels = np.asarray(rec.labels, dtype=np.int64).reshape(-1)
        plabels = pred["labels"]
        k = plabels.shape[0]
        if labels.shape[0] and k:
            iou = pairwise_iou(pred["boxes"], rec.boxes)
            iou = np.where(plabels[:, None] == labels[None, :], iou, -1.0)
            arg = np.argmax(iou, axis=1)
            top = iou[np.arange(k), arg]
            best_iou.append(top)
            best_gt.append(np.where(top >= 0, arg + offset, -1))
        else:
            best_iou.append(np.full(k, -1.0))
            best_gt.append(np.full(k, -1, dtype=np.int64))
        det_labels.append(plabels)
        det_scores.append(pred["scores"])
        gt_labels.append(labels)
        gt_difficult.append(ignored_flags(rec))
        offset += labels.shape[0]
    cat = np.concatenate
    return _Flat(
        gt_labels=cat(gt_labels) if gt_labels else np.zeros(0, np.int64),
        gt_difficult=cat(gt_difficult) if gt_difficult else np.zeros(0, bool),
        det_labels=cat(det_labels).astype(np.int64) if det_labels else np.zeros(0, np.int64),
        det_scores=cat(det_scores).astype(np.float64) if det_scores else np.zeros(0),
        det_best_iou=cat(best_iou).astype(np.float64) if best_iou else np.zeros(0),
        det_best_gt=cat(best_gt).astype(np.int64) if best_gt else np.zeros(0, np.int64),
    )


def voc_curves(records: Sequence[ImageRecord], predictions: Sequence[Prediction],
               class_names: Sequence[str], iou_threshold: float = VOC_IOU_THRESHOLD
               ) -> list[ClassCurve]:
    """Match detections to ground truth per class (module docstring); one curve per class.

    ``predictions`` must be normalised (:func:`distdet.eval.inputs.normalize_predictions`).
    """
    flat = _flatten(records, predictions)
    curves = []
    for k, name in enumerate(class_names):
        label = k + 1
        num_pos = int(np.sum((flat.gt_labels == label) & ~flat.gt_difficult))
        idx = np.flatnonzero(flat.det_labels == label)
        idx = idx[np.argsort(-flat.det_scores[idx], kind="stable")]
        hit = flat.det_best_iou[idx] > iou_threshold
        gt = flat.det_best_gt[idx]
        on_difficult = np.zeros_like(hit)
        on_difficult[hit] = flat.gt_difficult[gt[hit]]
        keep = ~on_difficult
        idx, hit, gt = idx[keep], hit[keep], gt[keep]
        # Among detections that hit a box, the first one (in ranked order) takes it.
        tp = np.zeros(idx.shape[0], dtype=bool)
        hit_pos = np.flatnonzero(hit)
        _, first = np.unique(gt[hit_pos], return_index=True)
        tp[hit_pos[first]] = True
        ctp = np.cumsum(tp)
        cfp = np.cumsum(~tp)
        precision = ctp / np.maximum(ctp + cfp, 1)
        recall = ctp / num_pos if num_pos else np.zeros(idx.shape[0])
        curves.append(ClassCurve(name=name, num_positives=num_pos, scores=flat.det_scores[idx],
                                 true_positive=tp, precision=precision.astype(np.float64),
                                 recall=np.asarray(recall, dtype=np.float64)))
    return curves


def average_precision(recall: np.ndarray, precision: np.ndarray, eleven_point: bool = False) -> float:
    """AP from a ranked precision/recall sequence.

    All-point: area under the curve whose precision at recall r is the best precision at any
    recall >= r. Eleven-point: mean over t in {0, 0.1, ..., 1} (exact tenths) of the best
    precision at recall >= t (0 if recall t is never reached).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if eleven_point:
        total = 0.0
        for i in range(11):
            reached = precision[recall >= i / 10]
            total += float(reached.max()) if reached.size else 0.0
        return total / 11
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def class_ap(curve: ClassCurve, eleven_point: bool = False) -> float | None:
    """AP of one class, or ``None`` when it has no non-difficult ground truth."""
    if curve.num_positives == 0:
        return None
    return average_precision(curve.recall, curve.precision, eleven_point)


def mean_ap(aps: Sequence[float | None]) -> float | None:
    """Mean over the defined APs; ``None`` if no class has ground truth."""
    defined = [a for a in aps if a is not None]
    return float(np.mean(defined)) if defined else None
