"""``distdet check-data DIR``: report on a VOC or COCO dataset folder and fail when it has errors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from distdet.classes import class_colours
from distdet.data.check import check_data, format_report
from distdet.data.class_list import ClassListError, parse_class_names
from distdet.data.plots import write_label_plots


def class_list_arg(text: str) -> tuple[str, ...]:
    """argparse type of ``--class-names``: exit 2 with the reason for a malformed list."""
    try:
        return parse_class_names(text)
    except ClassListError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-data",
        help="check a VOC or COCO dataset folder and print a report",
        description=(
            "Index a COCO dataset (annotations.json, instances_*.json or --annotations FILE, with its "
            "images) or else a PASCAL VOC folder (images/ + annotations/, or JPEGImages/ + Annotations/), "
            "decode every image and print: format, class list, number of images, objects per class, image sizes, "
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
        "--class-names", type=class_list_arg, default=None, metavar="A,B,C",
        help="comma-separated class names in label order (default: the COCO categories, or the face-mask "
             "table when every VOC name is a face-mask class, else the VOC names sorted)",
    )
    parser.add_argument("--annotations", type=Path, metavar="FILE", default=None,
                        help="the COCO instances JSON, when it is not DIR/annotations.json or DIR/instances_*.json")
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
        args.data_dir, args.class_names, lenient=args.lenient, annotations=args.annotations,
        decode_images=not args.quick, allow_empty=args.allow_empty,
    )
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    if args.plots is not None and report.records:
        print(f"Plots: {write_label_plots(args.plots, report.records, report.class_names, class_colours(report.class_names))}")
    return 0 if report.ok else 1
