"""``distdet check-data DIR``: report on a VOC dataset folder and fail when it has errors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from distdet.classes import CLASS_COLOURS, CLASS_NAMES
from distdet.data.check import check_data, format_report
from distdet.data.plots import write_label_plots


def _class_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated class names, got {text!r}")
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-data",
        help="check a VOC dataset folder and print a report",
        description=(
            "Index a PASCAL VOC folder (images/ + annotations/, or JPEGImages/ + Annotations/), "
            "decode every image and print: number of images, objects per class, image sizes, "
            "boxes clamped into their image, and every problem found grouped by kind with the "
            "file names. Exit status 0 when the data is usable, 1 when it has errors."
        ),
    )
    parser.add_argument("data_dir", metavar="DIR", type=Path, help="dataset folder to check")
    parser.add_argument(
        "--lenient", action="store_true",
        help="treat problems as files to skip (as training with --lenient would) and exit 0 "
             "if at least one usable image remains; default: any problem is an error",
    )
    parser.add_argument(
        "--class-names", type=_class_list, default=CLASS_NAMES, metavar="A,B,C",
        help=f"comma-separated class names in label order (default: {','.join(CLASS_NAMES)})",
    )
    parser.add_argument(
        "--allow-empty", action="store_true",
        help="accept annotations without objects (negative images) instead of reporting them",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="read image sizes from file headers only, without decoding pixels "
             "(faster, but truncated or corrupt image data goes unnoticed)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument(
        "--plots", type=Path, metavar="DIR",
        help="also draw the usable images' label statistics into DIR/labels.png (objects per class, "
             "boxes per image, box sizes in pixels and relative to the image, image sizes)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = check_data(
        args.data_dir, args.class_names, lenient=args.lenient,
        decode_images=not args.quick, allow_empty=args.allow_empty,
    )
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    if args.plots is not None and report.records:
        print(f"Plots: {write_label_plots(args.plots, report.records, args.class_names, CLASS_COLOURS)}")
    return 0 if report.ok else 1
