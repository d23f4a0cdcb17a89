"""Files an evaluation leaves behind in its output folder.

- ``metrics.json``: the dict of :func:`distdet.eval.compute_metrics`;
- ``metrics.txt``: the same as the human-readable table;
- ``predictions.json``: the detections as a COCO results list (``image_id``, ``category_id``,
  ``bbox`` x,y,w,h, ``score``) whose ids refer to ``ground_truth.json``;
- ``ground_truth.json``: the evaluated images and objects as a COCO dataset (image id =
  position in the evaluated list; ``file_name`` is the image's name), so that anyone can
  re-run pycocotools on the two files. For a dataset read from a COCO file both files carry
  its ORIGINAL image and category ids instead, so the predictions also score against the
  user's own annotation file;
- ``pr_curves.png``: precision-recall curve per class (VOC matching at IoU 0.5);
- ``confusion_matrix.png``: the table's confusion matrix as counts and row-normalised
  (:mod:`distdet.eval.confusion_plot`);
- ``renders/<stem>.png``: a few images, ground truth left and predictions at or above the
  score threshold right, boxes in class colours with label and score.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distdet.classes import class_colours
from distdet.data.images import load_rgb
from distdet.data.records import ImageRecord
from distdet.eval.coco import CocoIds, predictions_to_coco_results, records_to_coco
from distdet.eval.confusion_plot import CONFUSION_NAME, write_confusion_matrix
from distdet.eval.inputs import Prediction, normalize_predictions
from distdet.eval.metrics import format_metrics_table
from distdet.eval.voc import VOC_IOU_THRESHOLD, class_ap, voc_curves
from distdet.io_utils import atomic_write, atomic_write_json
from distdet.render import draw_detections, side_by_side

DEFAULT_NUM_RENDERED = 6


def write_evaluation_outputs(out_dir: str | Path, records: Sequence[ImageRecord],
                             predictions: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any],
                             num_rendered: int = DEFAULT_NUM_RENDERED,
                             category_ids: Sequence[int] | None = None) -> dict[str, Path]:
    """Write every file listed in the module docstring into ``out_dir``; return their paths
    by name (``renders`` is the folder). Each file is written atomically. ``category_ids``
    (the original COCO id of each label, from ``DataIndex.category_ids``) makes the JSON
    files use the records' original image ids and those category ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    class_names = tuple(metrics["class_names"])
    preds = normalize_predictions(records, predictions, len(class_names))
    ids = CocoIds.of(records, category_ids)
    paths = {
        "metrics": atomic_write_json(out / "metrics.json", dict(metrics)),
        "table": atomic_write(out / "metrics.txt",
                              lambda tmp: tmp.write_text(format_metrics_table(metrics) + "\n")),
        "predictions": _write_compact_json(out / "predictions.json", predictions_to_coco_results(preds, ids)),
        "ground_truth": _write_compact_json(out / "ground_truth.json", records_to_coco(records, class_names, ids)),
        "pr_curves": write_pr_curves(out / "pr_curves.png", records, preds, class_names),
        "confusion_matrix": write_confusion_matrix(out / CONFUSION_NAME, metrics["confusion_matrix"]),
    }
    threshold = float(metrics["protocol"]["score_threshold"])
    paths["renders"] = write_renders(out / "renders", records, preds, class_names, threshold, num_rendered)
    return paths


def _write_compact_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n"))


def write_pr_curves(path: Path, records: Sequence[ImageRecord], preds: Sequence[Prediction],
                    class_names: Sequence[str]) -> Path:
    """Plot each class's precision against recall (VOC matching) into one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = class_colours(class_names)
    for curve in voc_curves(records, preds, class_names, VOC_IOU_THRESHOLD):
        ap = class_ap(curve)
        colour = np.array(colours[curve.name]) / 255
        label = f"{curve.name} (AP50 {ap:.3f}, {curve.num_positives} objects)" if ap is not None \
            else f"{curve.name} (no ground truth)"
        recall = np.concatenate([[0.0], curve.recall])
        precision = np.concatenate([[1.0 if curve.num_detections else 0.0], curve.precision])
        ax.plot(recall, precision, color=colour, label=label, drawstyle="steps-post")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall per class (VOC matching, IoU > {VOC_IOU_THRESHOLD})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def rendered_indices(num_records: int, count: int) -> list[int]:
    """``count`` positions spread evenly over the records, first and last included."""
    if num_records == 0 or count <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, num_records - 1, min(count, num_records))})


def write_renders(folder: Path, records: Sequence[ImageRecord], preds: Sequence[Prediction],
                  class_names: Sequence[str], score_threshold: float, count: int) -> Path:
    """Write ground truth | predictions (score >= ``score_threshold``) images for a few records."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in rendered_indices(len(records), count):
        rec, pred = records[i], preds[i]
        image = load_rgb(rec.image_path)
        keep = pred["scores"] >= score_threshold
        left = draw_detections(image, rec.boxes, rec.labels, class_names=class_names)
        right = draw_detections(image, pred["boxes"][keep], pred["labels"][keep], pred["scores"][keep],
                                class_names=class_names)
        panel = side_by_side(left, right, ("ground truth", f"predictions (score >= {score_threshold:g})"))
        atomic_write(folder / f"{rec.stem}.png", lambda tmp: panel.save(tmp, format="PNG"))
    return folder
