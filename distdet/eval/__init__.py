"""Detection metrics (COCO and VOC protocols), their output files, and the distributed evaluator."""
from __future__ import annotations

from distdet.eval.evaluator import evaluate_model, predict_dataset
from distdet.eval.metrics import compute_metrics, format_metrics_table, scalar_metrics
from distdet.eval.outputs import write_evaluation_outputs

__all__ = ["compute_metrics", "evaluate_model", "format_metrics_table", "predict_dataset", "scalar_metrics",
           "write_evaluation_outputs"]
