"""``distdet convert --to coco|voc SRC DST``: write a dataset in the other layout."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distdet.commands.check_data import class_list_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a dataset between PASCAL VOC folders and COCO instances JSON",
        description=(
            "Read SRC (a VOC folder, or a COCO instances JSON with its images; checked as training "
            "reads it) and write DST in the format of --to: coco = DST/images/ + DST/annotations.json "
            "(image ids 1..N, categories 1..K in class-list order); voc = DST/images/ + "
            "DST/annotations/<stem>.xml. Reading DST back gives the same images, boxes, labels and "
            "sizes in the same order. Exit status 0 on success, 1 when SRC has errors, 2 for bad flags."
        ),
    )
    parser.add_argument("src", metavar="SRC", type=Path, help="dataset folder to read")
    parser.add_argument("dst", metavar="DST", type=Path, help="folder to create; must be absent or empty")
    parser.add_argument("--to", required=True, choices=("coco", "voc"), help="format to write")
    parser.add_argument("--annotations", type=Path, metavar="FILE", default=None,
                        help="SRC's COCO file, when it is not SRC/annotations.json or SRC/instances_*.json")
    parser.add_argument("--class-names", type=class_list_arg, default=None, metavar="A,B,C",
                        help="class names in label order (default: taken from SRC, see 'Train on your own data')")
    parser.add_argument("--lenient", action="store_true", help="skip (and report) images with problems")
    parser.add_argument("--allow-empty", action="store_true", help="keep images without objects")
    parser.add_argument("--link", action="store_true",
                        help="hard-link the images instead of copying them (same file system only)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it is not empty")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from distdet.data.class_list import resolve_class_list
    from distdet.data.convert import write_coco, write_voc
    from distdet.data.problems import DataError
    from distdet.data.sources import open_index

    try:
        index = open_index(args.src, args.class_names, args.lenient, annotations=args.annotations,
                           allow_empty=args.allow_empty)
    except (DataError, ValueError) as error:
        print(f"distdet convert: error: {error}", file=sys.stderr)
        return 1
    try:
        if args.to == "coco":
            out, note = write_coco(index, args.dst, link=args.link, overwrite=args.overwrite), ""
        else:
            out, crowd = write_voc(index, args.dst, link=args.link, overwrite=args.overwrite)
            note = f"; {crowd} crowd region(s) left out (VOC has none)" if crowd else ""
    except FileExistsError as error:
        print(f"distdet convert: error: {error}", file=sys.stderr)
        return 2
    skipped = f", {len(index.skipped_files)} file(s) skipped" if index.problems else ""
    print(f"wrote {len(index.records)} images with {index.num_objects} objects from {args.src} ({index.format}) "
          f"to {out} ({args.to}){skipped}{note}")
    print(f"classes (labels 1..{len(index.class_names)}): {','.join(index.class_names)} from {index.class_source}")
    if args.to == "voc" and resolve_class_list(found=index.class_names).names != index.class_names:
        print(f"the VOC copy does not record this order: pass --class-names {','.join(index.class_names)} "
              "when you use it")
    return 0
