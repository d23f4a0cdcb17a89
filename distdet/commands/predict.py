"""``distdet predict --checkpoint RUN INPUT... --out DIR``: detections drawn and saved as JSON."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: The ``--mixed-precision`` choices (:data:`distdet.inference.predictor.PRECISIONS`), kept here so that
#: building the parser does not import torch.
PRECISION_CHOICES = ("no", "fp16", "bf16")


def parse_positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_probability(text: str) -> float:
    """argparse type: a number within [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="run a trained detector on images, folders or glob patterns",
        description=(
            "Run a trained detector on image files, folders (their .png/.jpg/.jpeg files) and glob "
            "patterns. Writes one rendered PNG per input (boxes in the class colours with class "
            "name and score, and a legend), one predictions.json, and prints a line per image with "
            "the detections per class. Unreadable images are listed at the end and make the exit "
            "status 1; the others are still predicted. Several processes: accelerate launch "
            "--multi_gpu --num_processes N -m distdet predict ... (inputs are split between them, "
            "one merged predictions.json is written)."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--checkpoint", required=True, metavar="RUN_OR_WEIGHTS",
                        help="model folder (model.pt + model_card.json, e.g. a run folder or its best/) "
                             "or a weights file with model_card.json beside it")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the results")
    parser.add_argument("--score-threshold", type=parse_probability, default=0.5, metavar="S",
                        help="keep detections with a score above S (default: 0.5)")
    parser.add_argument("--device", default="auto",
                        help="auto (the GPU of this process when there is one, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=parse_positive_int, default=4, metavar="N", help="images per forward pass (default: 4)")
    parser.add_argument("--mixed-precision", choices=PRECISION_CHOICES, default="no",
                        help="autocast dtype for inference (default: no)")
    parser.add_argument("--annotations", type=Path, metavar="DIR",
                        help="folder of VOC XML files (matched by file stem): draw the ground truth "
                             "beside each prediction")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator

    from distdet.inference.batch_predict import expand_inputs, predict_files, rank_batches
    from distdet.inference.predictor import load_detector

    if args.annotations is not None and not args.annotations.is_dir():
        print(f"distdet predict: error: --annotations {args.annotations} is not a folder", file=sys.stderr)
        return 2
    explicit = args.device not in ("auto", "cpu")
    if explicit and not torch.cuda.is_available():
        print(f"distdet predict: error: --device {args.device} asked for, but CUDA is not available", file=sys.stderr)
        return 2
    accelerator = Accelerator(cpu=args.device == "cpu" or not torch.cuda.is_available())
    if explicit and accelerator.num_processes > 1:
        print(f"distdet predict: error: --device {args.device} names one device, but {accelerator.num_processes} "
              "processes were launched; use --device auto", file=sys.stderr)
        return 2
    device = torch.device(args.device) if explicit else accelerator.device
    try:
        detector = load_detector(args.checkpoint, device=device, score_threshold=args.score_threshold,
                                 mixed_precision=args.mixed_precision, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as exc:
        print(f"distdet predict: error: cannot load checkpoint {args.checkpoint}: {exc}", file=sys.stderr)
        return 2
    paths, input_failures, skipped = expand_inputs(args.inputs)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        print(f"predicting {len(paths)} image(s) with {world} process(es) on {device}", flush=True)
    if world > 1:
        mine = rank_batches(len(paths), args.batch_size, world, rank)
        print(f"[rank {rank}/{world}] {sum(map(len, mine))} image(s) in {len(mine)} batch(es)", flush=True)
    summary = predict_files(detector, paths, args.out, accelerator, annotations_dir=args.annotations,
                            input_failures=input_failures, skipped=skipped, checkpoint=str(args.checkpoint))
    if not accelerator.is_main_process:
        return 1 if summary.failures else 0
    print(f"wrote {summary.predictions_file} and {len(summary.images)} rendered image(s) to {args.out}")
    if summary.skipped:
        print(f"{len(summary.skipped)} folder entr(y/ies) skipped (not regular files):", file=sys.stderr)
        for entry in summary.skipped:
            print(f"  {entry['file']}: {entry['reason']}", file=sys.stderr)
    if summary.failures:
        print(f"{len(summary.failures)} problem(s) with the inputs:", file=sys.stderr)
        for failure in summary.failures:
            print(f"  {failure['file']}: {failure['error']}", file=sys.stderr)
        return 1
    return 0
