"""COCO protocol: ground truth and detections as COCO objects, scored by pycocotools itself.

Conventions (the same everywhere in distdet):

- image ``id`` is the position of the record in the evaluated record list (0-based), which is
  also the ``image_id`` the :class:`~distdet.data.DetectionDataset` returns;
- category ``id`` is the 1-based label (``class_names[i]`` has id ``i + 1``);
- annotation ids start at 1 (pycocotools treats a matched annotation id of 0 as "unmatched");
- boxes are ``[x, y, w, h]`` on a continuous pixel axis (``w = x2 - x1``, no "+1"), and a
  ground-truth ``area`` is ``w * h`` (there are no segmentation masks);
- the VOC ``difficult`` flag has no COCO counterpart: difficult objects are kept as ordinary
  objects (``iscrowd = 0``) so that ``ground_truth.json`` is the full annotation; the flag is
  kept in each annotation under ``"difficult"`` for reference (pycocotools ignores it). The
  VOC metrics in :mod:`distdet.eval.voc` do ignore difficult objects;
- COCO crowd regions of a COCO dataset keep ``iscrowd = 1``, so pycocotools handles them its
  own way (a detection matched to one is ignored; it is never a missed object).

For files meant for the user (``ground_truth.json``, ``predictions.json``) a dataset read from
a COCO file can use its ORIGINAL image and category ids instead (:class:`CocoIds`), so its
predictions can be scored against the user's own annotation file.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distdet.data.records import ImageRecord
from distdet.eval.boxes import xyxy_to_xywh
from distdet.eval.inputs import difficult_flags

#: Names of the twelve numbers of ``COCOeval.summarize()``, in its order.
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)


@dataclass(frozen=True)
class CocoIds:
    """Original COCO ids: ``image_ids[i]`` of the record at position ``i``, ``category_ids[l - 1]`` of label ``l``."""

    image_ids: tuple[int, ...]
    category_ids: tuple[int, ...]

    @classmethod
    def of(cls, records: Sequence[ImageRecord], category_ids: Sequence[int] | None) -> "CocoIds | None":
        """The ids of records read from a COCO file (None when any record has no original id)."""
        if category_ids is None or any(r.source_id is None for r in records):
            return None
        return cls(tuple(int(r.source_id) for r in records), tuple(int(c) for c in category_ids))

    def image(self, position: int) -> int:
        return self.image_ids[position]

    def category(self, label: int) -> int:
        return self.category_ids[label - 1]


def coco_categories(class_names: Sequence[str], ids: CocoIds | None = None) -> list[dict[str, Any]]:
    """COCO ``categories`` list: ids 1..K in class order (or the original ids)."""
    return [{"id": i + 1 if ids is None else ids.category(i + 1), "name": name, "supercategory": "object"}
            for i, name in enumerate(class_names)]


def records_to_coco(records: Sequence[ImageRecord], class_names: Sequence[str],
                    ids: CocoIds | None = None) -> dict[str, Any]:
    """Convert ground-truth records to a COCO detection dataset dict (JSON-serialisable);
    image and category ids are positions and labels unless ``ids`` gives the original ones."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for position, rec in enumerate(records):
        image_id = position if ids is None else ids.image(position)
        images.append({"id": image_id, "file_name": rec.image_path.name,
                       "width": int(rec.width), "height": int(rec.height)})
        xywh = xyxy_to_xywh(rec.boxes)
        for box, label, diff, crowd in zip(xywh, rec.labels, difficult_flags(rec), rec.crowd):
            label = int(label)
            if not 1 <= label <= len(class_names):
                raise ValueError(f"{rec.annotation_path}: label {label} outside 1..{len(class_names)}")
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": label if ids is None else ids.category(label),
                "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]),
                "iscrowd": int(bool(crowd)),
                "difficult": int(bool(diff)),
            })
    return {
        "info": {"description": "distdet ground truth (boxes x,y,w,h on continuous pixel coordinates)"},
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(class_names, ids),
    }


def predictions_to_coco_results(predictions: Sequence[dict[str, np.ndarray]],
                                ids: CocoIds | None = None) -> list[dict[str, Any]]:
    """Per-image predictions (position = image id, unless ``ids`` maps it) to a COCO results list.

    Each prediction dict has ``boxes`` ``[K, 4]`` xyxy, ``scores`` ``[K]`` and ``labels``
    ``[K]`` (1-based; written as the original category ids with ``ids``). The order of the
    list is image order, then the order within the image.
    """
    results: list[dict[str, Any]] = []
    for position, pred in enumerate(predictions):
        xywh = xyxy_to_xywh(pred["boxes"])
        image_id = position if ids is None else ids.image(position)
        for box, score, label in zip(xywh, np.asarray(pred["scores"]), np.asarray(pred["labels"])):
            results.append({"image_id": image_id, "category_id": int(label) if ids is None else ids.category(int(label)),
                            "bbox": [float(v) for v in box], "score": float(score)})
    return results


def _quiet_coco(dataset: dict[str, Any]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_detections(gt, results: list[dict[str, Any]]):
    """The detections as a pycocotools COCO object.

    ``COCO.loadRes`` cannot take an empty list (it inspects ``anns[0]``), so for no detections
    an empty results object is built directly; COCOeval then scores every class with ground
    truth as 0 (and reports -1 where there is no ground truth), its own convention.
    """
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            # loadRes writes keys into the dicts: hand it copies.
            return gt.loadRes([{**r, "bbox": list(r["bbox"])} for r in results])
    return _quiet_coco({"images": list(gt.dataset["images"]), "annotations": [],
                        "categories": [dict(c) for c in gt.dataset["categories"]]})


def coco_evaluate(gt_dataset: dict[str, Any], results: list[dict[str, Any]],
                  class_names: Sequence[str]) -> dict[str, Any]:
    """Run pycocotools' bbox evaluation; return the summary and per-class AP.

    Returns ``{"stats": {name: value}, "per_class_AP": {class: value},
    "per_class_AP50": {class: value}}``. Values are pycocotools' own; -1 means undefined (no
    ground truth in that class or area range), as in ``COCOeval.summarize``. Per-class AP is
    the mean of the precision table over IoU thresholds and recall points for that class at
    area "all" and 100 detections, exactly how ``summarize`` forms the overall AP.
    """
    from pycocotools.cocoeval import COCOeval

    # COCOeval writes keys into the annotation dicts: evaluate copies.
    gt = _quiet_coco({**gt_dataset, "annotations": [dict(a) for a in gt_dataset["annotations"]]})
    dt = _coco_detections(gt, results)
    evaluator = COCOeval(gt, dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats)}

    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    cat_ids = list(evaluator.params.catIds)
    iou_50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    per_ap: dict[str, float] = {}
    per_ap50: dict[str, float] = {}
    for k, name in enumerate(class_names):
        kk = cat_ids.index(k + 1)
        table = precision[:, :, kk, 0, -1]
        per_ap[name] = _mean_defined(table)
        per_ap50[name] = _mean_defined(table[iou_50])
    return {"stats": stats, "per_class_AP": per_ap, "per_class_AP50": per_ap50}


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else -1.0
