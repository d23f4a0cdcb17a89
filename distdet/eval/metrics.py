"""Every detection metric of distdet in one dict, named by protocol, and its text table.

:func:`compute_metrics` returns a JSON-serialisable dict:

- scalar entries, each named ``<family>/<metric>[/<class>]``:
  ``coco/AP``, ``coco/AP50``, ``coco/AP75``, ``coco/AP_small|medium|large``,
  ``coco/AR1|AR10|AR100``, ``coco/AR_small|medium|large`` (pycocotools ``COCOeval`` bbox),
  ``coco/AP/<class>`` and ``coco/AP50/<class>``;
  ``voc/mAP50`` and ``voc/AP50/<class>`` (all-point interpolation, difficult ignored);
  with ``voc07=True`` also ``voc07/mAP50`` and ``voc07/AP50/<class>`` (11-point);
  ``thresholded/precision|recall|f1/<class>`` at ``score_threshold``.
  ``None`` means undefined (no ground truth for the class or size range; no detections
  for a precision); pycocotools prints these as -1.
- ``class_names``; ``counts`` (images, ground truth, difficult and detections per class);
  ``confusion_matrix`` (rows, columns, counts, thresholds); ``protocol`` (how each family
  was computed, in words, including that IoU uses continuous coordinates).

:func:`scalar_metrics` keeps the numeric scalar entries (for loggers such as TensorBoard).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from distdet.data.records import ImageRecord
from distdet.eval.coco import coco_evaluate, predictions_to_coco_results, records_to_coco
from distdet.eval.confusion import confusion_matrix
from distdet.eval.inputs import difficult_flags, ignored_flags, normalize_predictions
from distdet.eval.voc import VOC_IOU_THRESHOLD, class_ap, mean_ap, voc_curves

IOU_NOTE = ("IoU on continuous coordinates: a box x1,y1,x2,y2 has width x2-x1 (no '+1' pixel "
            "convention), the same geometry as pycocotools")


def _defined(value: float) -> float | None:
    return None if value < 0 else float(value)


def compute_metrics(records: Sequence[ImageRecord], predictions: Sequence[Mapping[str, Any]],
                    class_names: Sequence[str], score_threshold: float = 0.5,
                    voc07: bool = False) -> dict[str, Any]:
    """Score ``predictions`` (one per record, record order; see :mod:`distdet.eval.inputs`)
    against ``records``; return the dict described in the module docstring."""
    class_names = tuple(class_names)
    preds = normalize_predictions(records, predictions, len(class_names))
    metrics: dict[str, Any] = {}

    coco = coco_evaluate(records_to_coco(records, class_names), predictions_to_coco_results(preds),
                         class_names)
    for name, value in coco["stats"].items():
        metrics[f"coco/{name}"] = _defined(value)
    for name in class_names:
        metrics[f"coco/AP/{name}"] = _defined(coco["per_class_AP"][name])
    for name in class_names:
        metrics[f"coco/AP50/{name}"] = _defined(coco["per_class_AP50"][name])

    curves = voc_curves(records, preds, class_names, VOC_IOU_THRESHOLD)
    families = [("voc", False)] + ([("voc07", True)] if voc07 else [])
    for family, eleven in families:
        aps = [class_ap(c, eleven_point=eleven) for c in curves]
        metrics[f"{family}/mAP50"] = mean_ap(aps)
        for name, ap in zip(class_names, aps):
            metrics[f"{family}/AP50/{name}"] = ap

    confusion = confusion_matrix(records, preds, class_names, score_threshold, VOC_IOU_THRESHOLD)
    per_class = confusion.per_class()
    for stat in ("precision", "recall", "f1"):
        for name in class_names:
            metrics[f"thresholded/{stat}/{name}"] = per_class[name][stat]

    metrics["class_names"] = list(class_names)
    metrics["counts"] = _counts(records, preds, class_names)
    metrics["confusion_matrix"] = {
        "rows": confusion.row_names,
        "columns": confusion.column_names,
        "counts": confusion.matrix.tolist(),
        "score_threshold": confusion.score_threshold,
        "iou_threshold": confusion.iou_threshold,
    }
    metrics["protocol"] = {
        "iou": IOU_NOTE,
        "coco": "pycocotools COCOeval, iouType bbox, IoU .50:.05:.95, 101-point interpolation, "
                "maxDets 1/10/100 per image; difficult objects count as ordinary objects",
        "voc": "VOC devkit matching per class (highest-IoU ground truth, IoU > 0.5, duplicates "
               "are false positives, difficult ignored), all-point interpolation (VOC2010+); "
               "mAP over classes with ground truth",
        "voc07": "as voc with 11-point interpolation (VOC2007)" if voc07 else "not computed",
        "thresholded": f"detections with score >= {float(score_threshold)}, class-agnostic "
                       "greedy matching at IoU > 0.5; precision/recall/F1 from the confusion "
                       "matrix",
        "score_threshold": float(score_threshold),
    }
    return metrics


def _counts(records: Sequence[ImageRecord], preds: Sequence[Mapping[str, np.ndarray]],
            class_names: Sequence[str]) -> dict[str, Any]:
    k = len(class_names)
    gt = np.zeros(k + 1, dtype=np.int64)
    diff = np.zeros(k + 1, dtype=np.int64)
    crowd = np.zeros(k + 1, dtype=np.int64)
    det = np.zeros(k + 1, dtype=np.int64)
    for rec, pred in zip(records, preds):
        labels = np.asarray(rec.labels, dtype=np.int64)
        np.add.at(gt, labels[~ignored_flags(rec)], 1)
        np.add.at(diff, labels[difficult_flags(rec)], 1)
        np.add.at(crowd, labels[rec.crowd], 1)
        np.add.at(det, pred["labels"], 1)
    return {
        "images": len(records),
        "ground_truth": {n: int(gt[i + 1]) for i, n in enumerate(class_names)},
        "difficult": {n: int(diff[i + 1]) for i, n in enumerate(class_names)},
        "crowd": {n: int(crowd[i + 1]) for i, n in enumerate(class_names)},
        "detections": {n: int(det[i + 1]) for i, n in enumerate(class_names)},
    }


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The defined numeric scalar entries of a metrics dict (for TensorBoard and the like)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Human-readable summary: per-class table (VOC AP50, COCO AP/AP50, P/R/F1, counts),
    the COCO summary line and the confusion matrix."""
    names = list(metrics["class_names"])
    counts = metrics["counts"]
    thr = metrics["protocol"]["score_threshold"]
    has07 = "voc07/mAP50" in metrics
    header = ["class", "GT", "dets", "VOC AP50"] + (["VOC07 AP50"] if has07 else []) + \
        ["COCO AP", "COCO AP50", f"P@{thr:g}", f"R@{thr:g}", f"F1@{thr:g}"]
    rows = []
    for n in names:
        rows.append([n, str(counts["ground_truth"][n]), str(counts["detections"][n]),
                     _fmt(metrics[f"voc/AP50/{n}"])]
                    + ([_fmt(metrics[f"voc07/AP50/{n}"])] if has07 else [])
                    + [_fmt(metrics[f"coco/AP/{n}"]), _fmt(metrics[f"coco/AP50/{n}"]),
                       _fmt(metrics[f"thresholded/precision/{n}"]),
                       _fmt(metrics[f"thresholded/recall/{n}"]),
                       _fmt(metrics[f"thresholded/f1/{n}"])])
    rows.append(["mean", str(sum(counts["ground_truth"].values())),
                 str(sum(counts["detections"].values())), _fmt(metrics["voc/mAP50"])]
                + ([_fmt(metrics["voc07/mAP50"])] if has07 else [])
                + [_fmt(metrics["coco/AP"]), _fmt(metrics["coco/AP50"]), "", "", ""])
    lines = [_table(header, rows), ""]
    lines.append("COCO: " + "  ".join(
        f"{k}={_fmt(metrics['coco/' + k])}" for k in
        ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")))
    cm = metrics["confusion_matrix"]
    lines += ["", f"confusion matrix (rows: ground truth, columns: predicted; score >= "
                  f"{cm['score_threshold']:g}, IoU > {cm['iou_threshold']:g})"]
    lines.append(_table(["gt \\ pred"] + cm["columns"],
                        [[r] + [str(v) for v in row] for r, row in zip(cm["rows"], cm["counts"])]))
    lines += ["", "Note: " + metrics["protocol"]["iou"] + "."]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
