"""``distdet evaluate``: COCO and VOC metrics of a trained model, or of a detections file.

With ``--model-dir`` the model predicts on the chosen split and the work is shared by every
process of an ``accelerate launch`` (one result, identical for any number of processes);
with ``--predictions`` a COCO results file is scored without a model (one process).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distdet.commands.arguments import add_model_dir, add_output, add_runtime_options, build_command_accelerator
from distdet.commands.check_data import class_list_arg
from distdet.data.index import DataIndex
from distdet.data.records import ImageRecord
from distdet.data.splits import SPLIT_NAMES, SPLIT_PARTS
from distdet.runtime.options import (
    add_hidden_alias, non_negative_int, old_spelling, positive_float, positive_int, probability,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="COCO and VOC metrics of a trained model (--model-dir) or a detections file (--predictions)",
        description=(
            "Compute COCO metrics (pycocotools: AP@[.50:.95], AP50, AP75, AP/AR by size, AR@1/10/100), "
            "VOC AP@0.5 per class (all-point interpolation, difficult objects ignored; --voc07 adds the "
            "11-point variant), precision/recall/F1 and a confusion matrix at a score threshold. "
            "Writes metrics.json, metrics.txt, predictions.json (COCO results), ground_truth.json "
            "(COCO), pr_curves.png and renders/ into --output-dir. IoU uses continuous coordinates (no +1). "
            "With --model-dir, run under `accelerate launch` to share the work between processes."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    add_model_dir(source, required=False)
    source.add_argument("--predictions", metavar="FILE.json",
                        help="a COCO results list (image_id, category_id, bbox x,y,w,h, score) with the ids of the "
                             "ground_truth.json this command writes for the same split; [] is valid")
    parser.add_argument("--max-predictions-mb", type=positive_float, default=64.0,
                        help="refuse a --predictions file larger than this many MiB (default: 64)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="dataset folder (COCO JSON + images, or VOC images/ + annotations/); default: with "
                             "--model-dir, the data and split manifest recorded in its model card when both "
                             "still exist, else the synthetic default dataset")
    parser.add_argument("--annotations", type=Path, metavar="FILE", default=None,
                        help="the COCO instances JSON, when it is not DIR/annotations.json or DIR/instances_*.json")
    parser.add_argument("--class-names", type=class_list_arg, default=None, metavar="A,B,C",
                        help="class names in label order; with --model-dir they must be the model card's "
                             "(default: the card's, or for --predictions those of the data)")
    parser.add_argument("--split-part", choices=SPLIT_PARTS, default="test",
                        help=old_spelling("part of the split to evaluate, or all images (default: test)", "--split"))
    add_hidden_alias(parser, "--split", "split_part", choices=SPLIT_PARTS)
    parser.add_argument("--split-scheme", choices=SPLIT_NAMES, default="tutorial",
                        help="how the split is made when no manifest is given (default: tutorial, the last 170 "
                             "file names in lexicographic order are the test set)")
    parser.add_argument("--split-manifest", type=Path, default=None,
                        help="split manifest JSON (as written by training) to take the split from")
    add_output(parser, "--output-dir", "output folder (default: <model folder>/eval-<part> for --model-dir, "
                                       "<file>-eval-<part> next to the file for --predictions)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="images per forward pass (default: 2)")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help=old_spelling("DataLoader worker processes per process (default: 0)", "--num-workers"))
    add_hidden_alias(parser, "--num-workers", "workers", type=non_negative_int)
    add_runtime_options(parser)
    parser.add_argument("--box-score-thresh", type=probability, default=None,
                        help="detector score threshold during evaluation (default: 0.01)")
    parser.add_argument("--box-detections-per-img", type=positive_int, default=None,
                        help="detections kept per image (default: 100)")
    parser.add_argument("--score-threshold", type=probability, default=0.5,
                        help="score cut for precision/recall/F1, the confusion matrix and renders (default: 0.5)")
    parser.add_argument("--voc07", action="store_true", help="also report VOC2007 11-point AP")
    parser.add_argument("--num-rendered", type=non_negative_int, default=6, help="images rendered with boxes (default: 6)")
    parser.set_defaults(func=run)


def _index(args: argparse.Namespace, run_class_names: tuple[str, ...] | None = None) -> DataIndex:
    """The data to evaluate on; with ``run_class_names`` (the model card's) the data's class list must match."""
    from distdet.data.sources import open_index
    from distdet.data.synthetic import resolve_data_dir

    return open_index(resolve_data_dir(args.data_dir), args.class_names, annotations=args.annotations,
                      run_class_names=run_class_names, run_what=f"the model card of {args.model_dir}")


def _records(args: argparse.Namespace, index: DataIndex) -> list[ImageRecord]:
    """The records of ``--split-part``; a ``--split-manifest`` recording another class list is an error."""
    from distdet.data.class_list import check_same_classes
    from distdet.data.splits import load_manifest, select_part

    if args.split_manifest is not None and args.split_part != "all":
        recorded = load_manifest(args.split_manifest).class_names
        if recorded:
            check_same_classes(recorded, f"split manifest {args.split_manifest}", index.class_names,
                               f"the data ({index.class_source})")
    return select_part(index.records, args.split_part, args.split_scheme, args.split_manifest)


def run(args: argparse.Namespace) -> int:
    from distdet.data.problems import DataError
    from distdet.eval.results_file import ResultsFileError

    try:
        if args.predictions is not None:
            return _run_predictions(args)
        return _run_model(args)
    except (DataError, ResultsFileError, FileNotFoundError, ValueError) as error:
        print(f"distdet evaluate: error: {error}", file=sys.stderr)
        return 2


def _run_predictions(args: argparse.Namespace) -> int:
    from distdet.eval import compute_metrics, format_metrics_table, write_evaluation_outputs
    from distdet.eval.coco import CocoIds
    from distdet.eval.results_file import load_coco_results

    index = _index(args)
    class_names, records = index.class_names, _records(args, index)
    path = Path(args.predictions)
    predictions = load_coco_results(path, len(records), len(class_names), CocoIds.of(records, index.category_ids),
                                    max_bytes=int(args.max_predictions_mb * 2**20))
    metrics = compute_metrics(records, predictions, class_names, score_threshold=args.score_threshold,
                              voc07=args.voc07)
    out = args.output_dir or path.with_name(f"{path.stem}-eval-{args.split_part}")
    write_evaluation_outputs(out, records, predictions, metrics, num_rendered=args.num_rendered,
                             category_ids=index.category_ids)
    print(format_metrics_table(metrics))
    print(f"\nevaluated {len(records)} images ({args.split_part}); wrote metrics and outputs to {out}")
    return 0


def _default_to_training_data(args: argparse.Namespace, info: dict) -> None:
    """Without --data-dir and --split-manifest, evaluate on the data and split the model was trained on."""
    if args.data_dir is not None or args.split_manifest is not None:
        return
    data_dir, manifest, annotations = info.get("data_dir"), info.get("split_manifest"), info.get("annotations")
    if data_dir and manifest and Path(data_dir).is_dir() and Path(manifest).is_file():
        args.data_dir, args.split_manifest = Path(data_dir), Path(manifest)
        if args.annotations is None and annotations and Path(annotations).is_file():
            args.annotations = Path(annotations)
        print(f"distdet evaluate: using the training run's data {data_dir} and split {manifest}", file=sys.stderr)


def _run_model(args: argparse.Namespace) -> int:
    from distdet.data.dataset import DetectionDataset
    from distdet.eval import evaluate_model, format_metrics_table
    from distdet.eval.evaluator import EVAL_DETECTIONS_PER_IMG, EVAL_SCORE_THRESH
    from distdet.modeling.model_card import load_detector_model

    accelerator = build_command_accelerator(args, "evaluate")
    if accelerator is None:
        return 2
    model, card = load_detector_model(args.model_dir, device=accelerator.device)
    _default_to_training_data(args, card.info)
    class_names = tuple(card.class_names)
    index = _index(args, class_names)
    records = _records(args, index)
    model_dir = Path(args.model_dir)
    out = args.output_dir or (model_dir if model_dir.is_dir() else model_dir.parent) / f"eval-{args.split_part}"
    metrics = evaluate_model(
        model, DetectionDataset(records), accelerator, class_names=class_names, batch_size=args.batch_size,
        num_workers=args.workers,
        box_score_thresh=EVAL_SCORE_THRESH if args.box_score_thresh is None else args.box_score_thresh,
        box_detections_per_img=args.box_detections_per_img or EVAL_DETECTIONS_PER_IMG,
        score_threshold=args.score_threshold, voc07=args.voc07, out_dir=out, num_rendered=args.num_rendered,
        category_ids=index.category_ids,
    )
    if accelerator.is_main_process:
        print(format_metrics_table(metrics))
        print(f"\nevaluated {len(records)} images ({args.split_part}) on {accelerator.num_processes} process(es); "
              f"wrote metrics and outputs to {out}")
    return 0
