"""``distdet predict --model-dir RUN INPUT... --output-dir DIR``: detections drawn and saved as JSON."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distdet.commands.arguments import add_model_dir, add_output, add_runtime_options, build_command_accelerator
from distdet.runtime.options import positive_int, probability


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
    add_model_dir(parser, required=True)
    add_output(parser, "--output-dir", "folder for the results", required=True)
    parser.add_argument("--score-threshold", type=probability, default=0.5, metavar="S",
                        help="keep detections with a score above S (default: 0.5)")
    parser.add_argument("--device", default="auto",
                        help="auto (the GPU of this process when there is one, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="images per forward pass (default: 4)")
    add_runtime_options(parser)
    parser.add_argument("--annotations", type=Path, metavar="DIR",
                        help="folder of VOC XML files (matched by file stem): draw the ground truth "
                             "beside each prediction")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from distdet.inference.batch_predict import expand_inputs, predict_files
    from distdet.inference.predictor import load_detector
    from distdet.runtime.sharding import shard_batches

    if args.annotations is not None and not args.annotations.is_dir():
        print(f"distdet predict: error: --annotations {args.annotations} is not a folder", file=sys.stderr)
        return 2
    explicit = args.device not in ("auto", "cpu")
    if explicit and not torch.cuda.is_available():
        print(f"distdet predict: error: --device {args.device} asked for, but CUDA is not available", file=sys.stderr)
        return 2
    accelerator = build_command_accelerator(args, "predict", cpu=args.device == "cpu")
    if accelerator is None:
        return 2
    if explicit and accelerator.num_processes > 1:
        print(f"distdet predict: error: --device {args.device} names one device, but {accelerator.num_processes} "
              "processes were launched; use --device auto", file=sys.stderr)
        return 2
    device = torch.device(args.device) if explicit else accelerator.device
    try:
        detector = load_detector(args.model_dir, device=device, score_threshold=args.score_threshold,
                                 mixed_precision=args.mixed_precision, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as exc:
        print(f"distdet predict: error: cannot load checkpoint {args.model_dir}: {exc}", file=sys.stderr)
        return 2
    paths, input_failures = expand_inputs(args.inputs)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        print(f"predicting {len(paths)} image(s) with {world} process(es) on {device}", flush=True)
    if world > 1:
        mine = shard_batches(len(paths), args.batch_size, world, rank, pad=False)
        print(f"[rank {rank}/{world}] {sum(map(len, mine))} image(s) in {len(mine)} batch(es)", flush=True)
    summary = predict_files(detector, paths, args.output_dir, accelerator, annotations_dir=args.annotations,
                            input_failures=input_failures, checkpoint=str(args.model_dir))
    if not accelerator.is_main_process:
        return 1 if summary.failures else 0
    print(f"wrote {summary.predictions_file} and {len(summary.images)} rendered image(s) to {args.output_dir}")
    if summary.failures:
        print(f"{len(summary.failures)} problem(s) with the inputs:", file=sys.stderr)
        for failure in summary.failures:
            print(f"  {failure['file']}: {failure['error']}", file=sys.stderr)
        return 1
    return 0
