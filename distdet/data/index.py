"""Build the in-memory index of a VOC folder: every XML parsed once, every pair validated."""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from distdet.classes import CLASS_NAMES
from distdet.data.images import IMAGE_SUFFIXES, MAX_PIXELS, check_aspect_ratio, load_rgb, read_image_size
from distdet.data.problems import DataError, Problem, ProblemKind
from distdet.data.records import ImageRecord
from distdet.data.voc import MAX_XML_BYTES, make_xml_parser, parse_voc_annotation

log = logging.getLogger(__name__)

#: (images folder, annotations folder) layouts recognised, in order: Kaggle, then VOC.
LAYOUTS: tuple[tuple[str, str], ...] = (("images", "annotations"), ("JPEGImages", "Annotations"))


@dataclass
class DataIndex:
    """The parsed dataset.

    ``records`` holds the usable image/annotation pairs sorted lexicographically by stem;
    ``problems`` every problem found (non-empty only in lenient mode, where the files
    concerned were skipped); ``clamped`` maps stem -> number of boxes clamped into the image.
    """

    data_dir: Path
    class_names: tuple[str, ...]
    records: list[ImageRecord]
    problems: list[Problem] = field(default_factory=list)
    clamped: dict[str, int] = field(default_factory=dict)

    def class_counts(self) -> dict[str, int]:
        """Objects per class name over ``records`` (every class listed, zeros included)."""
        counts = Counter(int(l) for r in self.records for l in r.labels)
        return {name: counts.get(i + 1, 0) for i, name in enumerate(self.class_names)}

    @property
    def num_objects(self) -> int:
        return sum(r.num_objects for r in self.records)

    @property
    def num_clamped_boxes(self) -> int:
        return sum(self.clamped.values())

    @property
    def skipped_files(self) -> list[Path]:
        """Files named by a problem (each once, in order found)."""
        return list(dict.fromkeys(p.path for p in self.problems))


def find_layout(data_dir: Path) -> tuple[Path, Path]:
    """Return ``(images_dir, annotations_dir)`` of ``data_dir``; raise DataError if neither layout fits."""
    if not data_dir.is_dir():
        raise DataError.single(ProblemKind.NOT_A_FILE, data_dir, "dataset folder does not exist")
    for images, annotations in LAYOUTS:
        if (data_dir / images).is_dir() and (data_dir / annotations).is_dir():
            return data_dir / images, data_dir / annotations
    wanted = " or ".join(f"{i}/ + {a}/" for i, a in LAYOUTS)
    raise DataError.single(ProblemKind.NOT_A_FILE, data_dir, f"expected subfolders {wanted}")


def _scan(folder: Path, suffixes: tuple[str, ...], problems: list[Problem]) -> dict[str, Path]:
    """Map stem -> path for visible entries of ``folder`` whose suffix is in ``suffixes``."""
    found: dict[str, Path] = {}
    duplicates: set[str] = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") or path.suffix.lower() not in suffixes:
                continue
            if path.stem in found:
                duplicates.add(path.stem)
                problems.append(Problem(
                    ProblemKind.DUPLICATE_STEM, path, f"another file in {folder} has the stem {path.stem!r}: {found[path.stem].name}"
                ))
            else:
                found[path.stem] = path
    for stem in duplicates:
        del found[stem]
    return found


def _index_pair(
    stem: str, image_path: Path, xml_path: Path, class_names: tuple[str, ...], parser: etree.XMLParser, *,
    allow_empty: bool, decode_images: bool, max_pixels: int, max_xml_bytes: int,
) -> tuple[ImageRecord, int]:
    """Validate one pair; return its record and clamped-box count or raise DataError."""
    ann = parse_voc_annotation(xml_path, class_names, max_bytes=max_xml_bytes, parser=parser)
    if ann.labels.size == 0 and not allow_empty:
        raise DataError.single(ProblemKind.EMPTY_ANNOTATION, xml_path, "annotation has no <object>")
    if decode_images:
        size = load_rgb(image_path, max_pixels).size
    else:
        size = read_image_size(image_path, max_pixels)
    if size != (ann.width, ann.height):
        raise DataError.single(
            ProblemKind.SIZE_MISMATCH, xml_path,
            f"<size> says {ann.width}x{ann.height} but {image_path.name} is {size[0]}x{size[1]}",
        )
    check_aspect_ratio(image_path, *size)
    record = ImageRecord(
        stem=stem, image_path=image_path, annotation_path=xml_path, width=ann.width, height=ann.height,
        boxes=ann.boxes, labels=ann.labels, difficult=ann.difficult,
    )
    return record, ann.num_clamped


def build_index(
    data_dir: str | os.PathLike[str],
    class_names: tuple[str, ...] = CLASS_NAMES,
    lenient: bool = False,
    *,
    allow_empty: bool = False,
    decode_images: bool = False,
    max_pixels: int = MAX_PIXELS,
    max_xml_bytes: int = MAX_XML_BYTES,
) -> DataIndex:
    """Pair ``images/*.png|jpg|jpeg`` with ``annotations/*.xml`` by stem and parse each XML once.

    Image sizes are read from file headers (no pixel decoding) unless ``decode_images`` is set,
    which decodes every image fully to find truncated or corrupt files. Annotations without
    objects are an ``empty_annotation`` problem unless ``allow_empty``.

    Strict mode (default) raises :class:`DataError` listing every problem, each naming its
    file. Lenient mode skips each file with a problem, logs a warning per skip and keeps the
    problems in ``DataIndex.problems``. Either mode raises when no usable image remains.
    """
    data_dir = Path(data_dir)
    class_names = tuple(class_names)
    images_dir, annotations_dir = find_layout(data_dir)
    problems: list[Problem] = []
    images = _scan(images_dir, IMAGE_SUFFIXES, problems)
    annotations = _scan(annotations_dir, (".xml",), problems)
    for stem in sorted(annotations.keys() - images.keys()):
        problems.append(Problem(ProblemKind.MISSING_IMAGE, annotations[stem], f"no image {stem}.png/.jpg/.jpeg in {images_dir}"))
    for stem in sorted(images.keys() - annotations.keys()):
        problems.append(Problem(ProblemKind.MISSING_ANNOTATION, images[stem], f"no annotation {stem}.xml in {annotations_dir}"))

    parser = make_xml_parser()
    records: list[ImageRecord] = []
    clamped: dict[str, int] = {}
    for stem in sorted(images.keys() & annotations.keys()):
        try:
            record, n_clamped = _index_pair(
                stem, images[stem], annotations[stem], class_names, parser, allow_empty=allow_empty,
                decode_images=decode_images, max_pixels=max_pixels, max_xml_bytes=max_xml_bytes,
            )
        except DataError as exc:
            problems.extend(exc.problems)
            continue
        records.append(record)
        if n_clamped:
            clamped[stem] = n_clamped

    if not records:
        problems.append(Problem(ProblemKind.MISSING_IMAGE, data_dir, "no usable image/annotation pairs"))
        raise DataError(problems, header=f"{len(problems)} problem(s) in {data_dir}:")
    if problems and not lenient:
        raise DataError(problems, header=f"{len(problems)} problem(s) in {data_dir} (use lenient mode to skip these files):")
    for problem in problems:
        log.warning("skipping %s", problem)
    return DataIndex(data_dir=data_dir, class_names=class_names, records=records, problems=problems, clamped=clamped)
