"""``distdet export --model-dir RUN --format torchscript|onnx --output-file FILE``: a deployable model file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distdet.commands.arguments import add_model_dir, add_output
from distdet.runtime.options import probability

FORMAT_CHOICES = ("torchscript", "onnx")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained detector to TorchScript or ONNX (optionally verified)",
        description=(
            "Export a trained detector, pre- and post-processing included, for one float32 "
            "[3, H, W] image in [0, 1]. TorchScript: torch.jit.load(FILE)([image]) returns "
            "(losses, [{boxes, labels, scores}]). ONNX: input 'image' with dynamic H and W, "
            "outputs 'boxes', 'labels', 'scores' (run it with onnxruntime, extra distdet[onnx]). "
            "With --verify the exported file is loaded in its runtime and its detections are "
            "compared with the PyTorch model's on sample images; a mismatch exits with status 1. "
            "The class table (label id -> class name and colour, from the model card) is written to "
            "FILE.classes.json."
        ),
        allow_abbrev=False,
    )
    add_model_dir(parser, required=True)
    parser.add_argument("--format", required=True, choices=FORMAT_CHOICES, help="export format")
    add_output(parser, "--output-file", "file to write", required=True)
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="ONNX: size of the example image traced (any size runs later; "
                             "default: the model's min_size square)")
    parser.add_argument("--score-threshold", type=probability, metavar="S",
                        help="score threshold fixed in the export (default: the model card's)")
    parser.add_argument("--verify", action="store_true",
                        help="compare the export's detections with the PyTorch model's on three synthetic "
                             "face-mask images (or on --verify-images)")
    parser.add_argument("--verify-images", nargs="+", type=Path, metavar="IMAGE",
                        help="images to verify on instead of the default ones (implies --verify)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from distdet.inference.class_table import write_class_table
    from distdet.inference.export import ExportError, export_model, load_verify_images, synthetic_verify_images, verify_export
    from distdet.modeling.model_card import load_detector_model
    from distdet.modeling.models import set_eval_thresholds

    if args.image_size is not None and min(args.image_size) < 32:
        print(f"distdet export: error: --image-size {args.image_size} is too small (at least 32 px)", file=sys.stderr)
        return 2
    try:
        model, card = load_detector_model(args.model_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"distdet export: error: cannot load checkpoint {args.model_dir}: {exc}", file=sys.stderr)
        return 2
    if args.score_threshold is not None:
        set_eval_thresholds(model, args.score_threshold, model.roi_heads.detections_per_img)
    try:
        images = load_verify_images(args.verify_images) if args.verify_images else None
        path = export_model(model, args.format, args.output_file, tuple(args.image_size) if args.image_size else None)
        print(f"wrote {args.format} model {path} ({path.stat().st_size / 2**20:.1f} MiB) from {card.model}, "
              f"score threshold {model.roi_heads.score_thresh:g}")
        print(f"wrote its class table {write_class_table(path, card)}: labels 1..{len(card.class_names)} = "
              f"{', '.join(card.class_names)}")
        if not (args.verify or images):
            return 0
        result = verify_export(model, path, args.format, images or synthetic_verify_images())
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"distdet export: error: {exc}", file=sys.stderr)
        return 2
    print(f"verify: {result.describe()}")
    for problem in result.problems:
        print(f"  {problem}", file=sys.stderr)
    return 0 if result.ok else 1
