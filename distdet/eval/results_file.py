"""Read detections from a COCO results file into per-image predictions.

The file is a JSON list of objects ``{"image_id": int, "category_id": int, "bbox": [x, y, w,
h], "score": number}``; ids are those of the ``ground_truth.json`` that ``distdet evaluate``
writes for the same split (image id = position in the split, category id = 1-based class;
for a dataset read from a COCO file, its original image and category ids). Extra keys are
ignored. ``[]`` is valid (no detections).

Untrusted files are bounded: a file over ``max_bytes`` (default 64 MiB, several hundred
thousand detections; ``distdet evaluate --max-predictions-mb``) is refused before it is read, because
parsing costs many times the file size in memory (issue 12 measured 3.6 GB and 94 s for 200 MB), and
nesting deeper than Python's JSON reader allows, or numbers beyond its digit limit, are refused
with the file named instead of a RecursionError.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from distdet.eval.boxes import xywh_to_xyxy
from distdet.eval.coco import CocoIds
from distdet.eval.inputs import Prediction


DEFAULT_MAX_BYTES = 64 * 2**20


class ResultsFileError(ValueError):
    """A results file that cannot be used; the message names the file and the entry."""


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_coco_results(path: str | Path, num_images: int, num_classes: int,
                      ids: CocoIds | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Prediction]:
    """Parse ``path``; return one prediction per image id ``0..num_images-1`` (detections in
    file order). With ``ids`` the file uses those original image and category ids. Raises
    :class:`ResultsFileError` for a file over ``max_bytes``, unreadable or too deeply nested JSON,
    a non-list, or the first malformed entry (its index and what is wrong with it)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ResultsFileError(f"{path}: predictions file is {size / 2**20:.1f} MiB, over the limit of "
                                   f"{max_bytes / 2**20:g} MiB (--max-predictions-mb raises it)")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultsFileError(f"{path}: cannot read predictions file: {exc.strerror or exc}") from None
    except RecursionError:
        raise ResultsFileError(f"{path}: JSON nested too deeply (a results file needs 3 levels: "
                               f"list, object, bbox)") from None
    except ResultsFileError:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers past the digit limit
        raise ResultsFileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ResultsFileError(f"{path}: expected a JSON list of COCO results, got {type(data).__name__}")

    position_of = {i: i for i in range(num_images)} if ids is None else {v: i for i, v in enumerate(ids.image_ids)}
    label_of = {c: c for c in range(1, num_classes + 1)} if ids is None else \
        {v: i + 1 for i, v in enumerate(ids.category_ids)}
    boxes: list[list[list[float]]] = [[] for _ in range(num_images)]
    scores: list[list[float]] = [[] for _ in range(num_images)]
    labels: list[list[int]] = [[] for _ in range(num_images)]
    for index, entry in enumerate(data):
        def bad(problem: str) -> ResultsFileError:
            return ResultsFileError(f"{path}: entry {index}: {problem}")

        if not isinstance(entry, dict):
            raise bad(f"expected an object, got {type(entry).__name__}")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in entry]
        if missing:
            raise bad(f"missing {', '.join(repr(k) for k in missing)}")
        image_id, category_id, bbox, score = (entry[k] for k in ("image_id", "category_id", "bbox", "score"))
        if not _integer(image_id) or image_id not in position_of:
            raise bad(f"image_id {image_id!r} is not an image of this split (the ids of its ground_truth.json)")
        if not _integer(category_id) or category_id not in label_of:
            raise bad(f"category_id {category_id!r} is not a class id ({', '.join(map(str, sorted(label_of)))})")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise bad(f"bbox must be a list of 4 finite numbers [x, y, w, h], got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise bad(f"bbox width and height must be >= 0, got {bbox!r}")
        if not _number(score):
            raise bad(f"score must be a finite number, got {score!r}")
        position = position_of[image_id]
        boxes[position].append([float(v) for v in bbox])
        scores[position].append(float(score))
        labels[position].append(label_of[category_id])
    return [{"boxes": xywh_to_xyxy(np.asarray(b, dtype=np.float64).reshape(-1, 4)),
             "scores": np.asarray(s, dtype=np.float64), "labels": np.asarray(l, dtype=np.int64)}
            for b, s, l in zip(boxes, scores, labels)]
