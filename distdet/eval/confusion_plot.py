"""The confusion matrix as a picture: ``confusion_matrix.png`` beside ``metrics.txt``.

Two panels from the ``confusion_matrix`` entry of the metrics (see :mod:`distdet.eval.confusion`):
the counts, and the same rows normalised to sum to 1 (what fraction of each ground-truth class,
and of the unmatched detections in the ``background`` row, ended up in each column). A row
without any count stays empty rather than dividing by zero.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from distdet.io_utils import atomic_write

CONFUSION_NAME = "confusion_matrix.png"


def row_normalised(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum; rows summing to 0 become NaN (drawn empty)."""
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def write_confusion_matrix(path: str | Path, confusion: Mapping[str, Any]) -> Path:
    """Draw ``confusion`` (``rows``, ``columns``, ``counts``, ``score_threshold``,
    ``iou_threshold``) as counts and row-normalised panels into the PNG ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion["counts"], dtype=np.int64)
    rows, columns = list(confusion["rows"]), list(confusion["columns"])
    fig = Figure(figsize=(13, 5.5), dpi=80)
    FigureCanvasAgg(fig)
    panels = ((counts.astype(np.float64), "counts", "d"), (row_normalised(counts), "row-normalised", ".2f"))
    for ax, (values, title, fmt) in zip(fig.subplots(1, 2), panels):
        finite_max = np.nanmax(values) if np.isfinite(values).any() else 0.0
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=max(finite_max, 1e-9))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                text = format(int(value), fmt) if fmt == "d" else format(value, fmt)
                ax.text(j, i, text, ha="center", va="center",
                        color="white" if value > 0.6 * finite_max else "black", fontsize=10)
        ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set(xlabel="predicted", ylabel="ground truth", title=title)
    fig.suptitle(f"confusion matrix (score >= {confusion['score_threshold']:g}, "
                 f"IoU > {confusion['iou_threshold']:g})")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
