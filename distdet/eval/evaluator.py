"""Distributed evaluation: every rank predicts its shard, one metrics dict for all.

Sharding works on whole *batches* (:func:`distdet.runtime.sharding.shard_batches`), so 1, 2
or N processes give identical predictions (the batch size itself still can change them
slightly, as it does on one process). The shards are padded to give every rank the same
number of batches; the repeated images are dropped by index after gathering. Results are
gathered as CPU numpy arrays with ``accelerate.utils.gather_object``; the main process computes
the metrics (and writes the output files), then broadcasts the dict, so every rank returns the
same one.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distdet.classes import CLASS_NAMES
from distdet.data.dataset import collate_detection
from distdet.eval.inputs import Prediction
from distdet.eval.metrics import compute_metrics
from distdet.eval.outputs import DEFAULT_NUM_RENDERED, write_evaluation_outputs
from distdet.modeling.forward import detect
from distdet.modeling.models import set_eval_thresholds
from distdet.runtime.sharding import shard_batches
from distdet.runtime.signals import ignore_stop_signals_in_worker

logger = logging.getLogger(__name__)

#: Detector settings during evaluation: a low score threshold and up to 100 detections per
#: image, what COCO-style AP expects (AP rewards low-confidence detections that are right).
EVAL_SCORE_THRESH = 0.01
EVAL_DETECTIONS_PER_IMG = 100


def predict_dataset(model: nn.Module, dataset: Dataset, accelerator: Accelerator, *, batch_size: int = 2,
                    num_workers: int = 0) -> list[Prediction]:
    """Run ``model`` over ``dataset`` on all ranks; return every image's prediction, in dataset
    order, on every rank.

    Each prediction holds CPU numpy ``boxes`` float32 ``[K, 4]`` xyxy, ``scores`` float32
    ``[K]`` and ``labels`` int64 ``[K]``, from :func:`distdet.modeling.forward.detect` under the
    accelerator's mixed-precision setting; the model (unwrapped from any
    distributed wrapper) is moved to the accelerator's device and put back into its previous
    train/eval mode afterwards. Dataset items are ``(image, target)`` pairs as
    :class:`distdet.data.DetectionDataset` returns them; only the image is used.
    """
    num_items = len(dataset)
    mine = shard_batches(num_items, batch_size, accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(dataset, batch_sampler=mine, num_workers=num_workers, collate_fn=collate_detection,
                        worker_init_fn=ignore_stop_signals_in_worker)
    net = accelerator.unwrap_model(model).to(accelerator.device)
    was_training = net.training
    net.eval()
    local: list[tuple[int, Prediction]] = []
    try:
        for indices, (images, _) in zip(mine, loader):
            outputs = detect(net, images, accelerator.device, accelerator.mixed_precision)
            local.extend((index, {key: value.numpy() for key, value in out.items()})
                         for index, out in zip(indices, outputs))
    finally:
        net.train(was_training)
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    by_index: dict[int, Prediction] = {}
    for index, prediction in gathered:
        by_index.setdefault(index, prediction)  # padded shards repeat batches: keep one
    missing = sorted(set(range(num_items)) - set(by_index))
    if missing:
        raise RuntimeError(f"no prediction gathered for dataset items {missing[:10]}")
    return [by_index[i] for i in range(num_items)]


def evaluate_model(model: nn.Module, dataset: Dataset, accelerator: Accelerator, *,
                   class_names: Sequence[str] = CLASS_NAMES, batch_size: int = 2, num_workers: int = 0,
                   box_score_thresh: float = EVAL_SCORE_THRESH,
                   box_detections_per_img: int = EVAL_DETECTIONS_PER_IMG,
                   score_threshold: float = 0.5, voc07: bool = False, out_dir: str | Path | None = None,
                   num_rendered: int = DEFAULT_NUM_RENDERED,
                   category_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` across all processes; return the metrics on every rank.

    Must be called on every rank. ``dataset.records`` (as :class:`DetectionDataset` has) is
    the ground truth, item ``i`` being ``records[i]``. ``box_score_thresh`` and
    ``box_detections_per_img`` are set on the detector's ROI heads for the evaluation and restored
    afterwards; ``score_threshold`` is the cut for precision/recall/F1, the confusion matrix and
    the rendered images. With ``out_dir`` the main process writes the files of
    :mod:`distdet.eval.outputs` (``category_ids``: see there). The returned dict is that of :func:`compute_metrics`. An error
    on the main process is re-raised on every rank instead of leaving the others waiting.
    """
    records = getattr(dataset, "records", None)
    if records is None:
        raise TypeError(f"{type(dataset).__name__} has no .records: the evaluator needs the ground truth")
    if len(records) == 0:
        raise ValueError("the evaluation dataset is empty")
    net = accelerator.unwrap_model(model)
    old = set_eval_thresholds(net, box_score_thresh, box_detections_per_img)
    start = time.perf_counter()
    try:
        predictions = predict_dataset(model, dataset, accelerator, batch_size=batch_size, num_workers=num_workers)
    finally:
        set_eval_thresholds(net, *old)
    predicted = time.perf_counter()

    outcome: tuple[str, Any] | None = None
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            metrics = compute_metrics(records, predictions, class_names, score_threshold=score_threshold, voc07=voc07)
            if out_dir is not None:
                write_evaluation_outputs(out_dir, records, predictions, metrics, num_rendered=num_rendered,
                                         category_ids=category_ids)
            outcome = ("ok", metrics)
        except Exception as exc:  # the other ranks learn of it through the broadcast
            failure = exc
            outcome = ("error", f"{type(exc).__name__}: {exc}")
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list([outcome], from_process=0)[0]
    if failure is not None:
        raise failure
    assert outcome is not None
    status, payload = outcome
    if status == "error":
        raise RuntimeError(f"evaluation failed on the main process: {payload}")
    logger.info("evaluated %d images on %d process(es): predictions %.2fs, metrics and outputs %.2fs",
                len(records), accelerator.num_processes, predicted - start, time.perf_counter() - predicted)
    return payload
