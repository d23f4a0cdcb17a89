"""Detection metrics (COCO and VOC protocols) and the distributed evaluator."""
from __future__ import annotations

from distdet.eval.metrics import compute_metrics, format_metrics_table, scalar_metrics

__all__ = ["compute_metrics", "format_metrics_table", "scalar_metrics"]
