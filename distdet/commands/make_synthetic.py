"""``distdet make-synthetic OUT``: write a seeded synthetic face-mask dataset (Kaggle VOC layout)."""
from __future__ import annotations

import argparse
import sys
import time

from distdet.classes import CLASS_NAMES
from distdet.commands.check_data import class_list_arg
from distdet.data.synthetic import (
    DEFAULT_FACE_SIZE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_OBJECTS,
    DEFAULT_NUM_IMAGES,
    make_synthetic_dataset,
    read_marker,
)
from distdet.runtime.options import non_negative_int, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-synthetic",
        help="write a synthetic face-mask dataset (PNG + VOC XML) for offline runs and tests",
        description=(
            "Draw cartoon faces of the three classes (with_mask: mask over nose and mouth; "
            "without_mask: no mask; mask_weared_incorrect: mask below the nose) on cluttered "
            "backgrounds and write OUT/images/synth_NNNN.png, OUT/annotations/synth_NNNN.xml and "
            "OUT/synthetic.json. The same parameters always give byte-identical files."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="folder to create; must be absent or empty unless --overwrite")
    parser.add_argument(
        "--num-images", type=positive_int, default=DEFAULT_NUM_IMAGES,
        help=f"number of images to draw (default: {DEFAULT_NUM_IMAGES})",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0,
        help="random seed; image i depends only on (seed, i) (default: 0)",
    )
    parser.add_argument(
        "--width", type=positive_int, default=DEFAULT_IMAGE_SIZE[0],
        help=f"image width in pixels (default: {DEFAULT_IMAGE_SIZE[0]})",
    )
    parser.add_argument(
        "--height", type=positive_int, default=DEFAULT_IMAGE_SIZE[1],
        help=f"image height in pixels (default: {DEFAULT_IMAGE_SIZE[1]})",
    )
    parser.add_argument(
        "--max-objects", type=positive_int, default=DEFAULT_MAX_OBJECTS,
        help=f"at most this many faces per image; each image has at least one (default: {DEFAULT_MAX_OBJECTS})",
    )
    parser.add_argument(
        "--min-face", type=positive_int, default=DEFAULT_FACE_SIZE[0],
        help=f"smallest face height in pixels, at least 12 (default: {DEFAULT_FACE_SIZE[0]})",
    )
    parser.add_argument(
        "--max-face", type=positive_int, default=DEFAULT_FACE_SIZE[1],
        help=f"largest face height in pixels, at most min(width, height) (default: {DEFAULT_FACE_SIZE[1]})",
    )
    parser.add_argument(
        "--class-names", type=class_list_arg, default=CLASS_NAMES, metavar="A,B,C",
        help="class names to write (class i is drawn like face-mask class i %% 3); default: the face-mask "
             "classes",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace OUT as a whole if it exists and is not empty (its old contents are deleted)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        out = make_synthetic_dataset(
            args.out,
            num_images=args.num_images,
            seed=args.seed,
            image_size=(args.width, args.height),
            max_objects_per_image=args.max_objects,
            face_size=(args.min_face, args.max_face),
            overwrite=args.overwrite,
            class_names=args.class_names,
        )
    except (FileExistsError, ValueError) as error:
        print(f"distdet make-synthetic: error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    marker = read_marker(out)
    assert marker is not None  # make_synthetic_dataset writes it last, before returning
    per_class = ", ".join(f"{name} {count}" for name, count in marker["objects_per_class"].items())
    print(
        f"wrote {args.num_images} images with {marker['num_objects']} objects ({per_class}) "
        f"to {out} in {seconds:.1f} s ({args.num_images / seconds:.1f} images/s)"
    )
    return 0
