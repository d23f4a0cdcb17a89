"""``distdet evaluate``: COCO and VOC metrics of a trained model, or of a detections file.

With ``--checkpoint`` the model predicts on the chosen split and the work is shared by every
process of an ``accelerate launch`` (one result, identical for any number of processes);
with ``--predictions`` a COCO results file is scored without a model (one process).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distdet.commands.check_data import class_list_arg
from distdet.data.index import DataIndex
from distdet.data.records import ImageRecord

SPLIT_PARTS = ("test", "train", "val", "all")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="COCO and VOC metrics of a trained model (--checkpoint) or a detections file (--predictions)",
        description=(
            "Compute COCO metrics (pycocotools: AP@[.50:.95], AP50, AP75, AP/AR by size, AR@1/10/100), "
            "VOC AP@0.5 per class (all-point interpolation, difficult objects ignored; --voc07 adds the "
            "11-point variant), precision/recall/F1 and a confusion matrix at a score threshold. "
            "Writes metrics.json, metrics.txt, predictions.json (COCO results), ground_truth.json "
            "(COCO), pr_curves.png and renders/ into --out. IoU uses continuous coordinates (no +1). "
            "With --checkpoint, run under `accelerate launch` to share the work between processes."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN_OR_WEIGHTS",
                        help="a model folder (model.pt + model_card.json) or a weights file with a sibling model_card.json")
    source.add_argument("--predictions", metavar="FILE.json",
                        help="a COCO results list (image_id, category_id, bbox x,y,w,h, score) with the ids of the "
                             "ground_truth.json this command writes for the same split; [] is valid")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="dataset folder (COCO JSON + images, or VOC images/ + annotations/); default: with "
                             "--checkpoint, the data and split manifest recorded in its model card when both "
                             "still exist, else the synthetic default dataset")
    parser.add_argument("--annotations", type=Path, metavar="FILE", default=None,
                        help="the COCO instances JSON, when it is not DIR/annotations.json or DIR/instances_*.json")
    parser.add_argument("--class-names", type=class_list_arg, default=None, metavar="A,B,C",
                        help="class names in label order; with --checkpoint they must be the model card's "
                             "(default: the card's, or for --predictions those of the data)")
    parser.add_argument("--split", choices=SPLIT_PARTS, default="test", help="part to evaluate (default: test)")
    parser.add_argument("--split-scheme", choices=("tutorial", "stratified"), default="tutorial",
                        help="how the split is made when no manifest is given (default: tutorial, the last 170 "
                             "file names in lexicographic order are the test set)")
    parser.add_argument("--split-manifest", type=Path, default=None,
                        help="split manifest JSON (as written by training) to take the split from")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <run folder>/eval-<split> for --checkpoint, "
                             "<file>-eval-<split> next to the file for --predictions)")
    parser.add_argument("--batch-size", type=_positive_int, default=2, help="images per forward pass (default: 2)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                        help="autocast precision for inference (default: no)")
    parser.add_argument("--box-score-thresh", type=_unit_float, default=None,
                        help="detector score threshold during evaluation (default: 0.01)")
    parser.add_argument("--box-detections-per-img", type=_positive_int, default=None,
                        help="detections kept per image (default: 100)")
    parser.add_argument("--score-threshold", type=_unit_float, default=0.5,
                        help="score cut for precision/recall/F1, the confusion matrix and renders (default: 0.5)")
    parser.add_argument("--voc07", action="store_true", help="also report VOC2007 11-point AP")
    parser.add_argument("--num-rendered", type=int, default=6, help="images rendered with boxes (default: 6)")
    parser.set_defaults(func=run)


def select_split(records: list[ImageRecord], part: str, scheme: str, manifest: Path | None) -> list[ImageRecord]:
    """The records of ``part`` ("all" = every record, in index order)."""
    from distdet.data import load_manifest, make_split

    if part == "all":
        return list(records)
    split = load_manifest(manifest) if manifest is not None else make_split(records, scheme)
    selected = split.select(records)[part]
    if not selected:
        origin = f"manifest {manifest}" if manifest is not None else f"the {scheme} split"
        raise ValueError(f"the {part!r} part of {origin} is empty; choose another --split")
    return selected


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return args.data_dir
    from distdet.data.synthetic import default_data_dir

    return default_data_dir()


def _index(args: argparse.Namespace, run_class_names: tuple[str, ...] | None = None) -> DataIndex:
    """The data to evaluate on; with ``run_class_names`` (the model card's) the data's class list must match."""
    from distdet.data import open_index

    return open_index(_data_dir(args), args.class_names, annotations=args.annotations,
                      run_class_names=run_class_names, run_what=f"the model card of {args.checkpoint}")


def _records(args: argparse.Namespace, index: DataIndex) -> list[ImageRecord]:
    """The records of ``--split``; a ``--split-manifest`` recording another class list is an error."""
    from distdet.data import load_manifest
    from distdet.data.class_list import check_same_classes

    if args.split_manifest is not None and args.split != "all":
        recorded = load_manifest(args.split_manifest).class_names
        if recorded:
            check_same_classes(recorded, f"split manifest {args.split_manifest}", index.class_names,
                               f"the data ({index.class_source})")
    return select_split(index.records, args.split, args.split_scheme, args.split_manifest)


def run(args: argparse.Namespace) -> int:
    from distdet.data.problems import DataError
    from distdet.eval.results_file import ResultsFileError

    try:
        if args.predictions is not None:
            return _run_predictions(args)
        return _run_checkpoint(args)
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
    predictions = load_coco_results(path, len(records), len(class_names), CocoIds.of(records, index.category_ids))
    metrics = compute_metrics(records, predictions, class_names, score_threshold=args.score_threshold,
                              voc07=args.voc07)
    out = args.out or path.with_name(f"{path.stem}-eval-{args.split}")
    write_evaluation_outputs(out, records, predictions, metrics, num_rendered=args.num_rendered,
                             category_ids=index.category_ids)
    print(format_metrics_table(metrics))
    print(f"\nevaluated {len(records)} images ({args.split}); wrote metrics and outputs to {out}")
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


def _run_checkpoint(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator

    from distdet.data import DetectionDataset
    from distdet.eval import evaluate_model, format_metrics_table
    from distdet.eval.evaluator import EVAL_DETECTIONS_PER_IMG, EVAL_SCORE_THRESH
    from distdet.modeling.model_card import load_detector_model

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    model, card = load_detector_model(args.checkpoint, device=accelerator.device)
    _default_to_training_data(args, card.info)
    class_names = tuple(card.class_names)
    index = _index(args, class_names)
    records = _records(args, index)
    checkpoint = Path(args.checkpoint)
    out = args.out or (checkpoint if checkpoint.is_dir() else checkpoint.parent) / f"eval-{args.split}"
    metrics = evaluate_model(
        model, DetectionDataset(records), accelerator, class_names=class_names, batch_size=args.batch_size,
        num_workers=args.num_workers,
        box_score_thresh=EVAL_SCORE_THRESH if args.box_score_thresh is None else args.box_score_thresh,
        box_detections_per_img=args.box_detections_per_img or EVAL_DETECTIONS_PER_IMG,
        score_threshold=args.score_threshold, voc07=args.voc07, out_dir=out, num_rendered=args.num_rendered,
        category_ids=index.category_ids,
    )
    if accelerator.is_main_process:
        print(format_metrics_table(metrics))
        print(f"\nevaluated {len(records)} images ({args.split}) on {accelerator.num_processes} process(es); "
              f"wrote metrics and outputs to {out}")
    return 0
