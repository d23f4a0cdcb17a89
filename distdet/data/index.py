"""Build the in-memory index of a VOC folder: every XML parsed once, every pair validated."""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lxml import etree

from distdet.classes import CLASS_NAMES
from distdet.data.class_list import ClassList, resolve_class_list
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
    ``class_source`` says where ``class_names`` came from (see :mod:`distdet.data.class_list`).
    A COCO index also has its ``annotation_file``, ``category_ids`` (the original category
    id of label ``i + 1`` at position ``i``) and ``unlisted`` (image files in the image folder
    that the file does not list; warned about, not problems).
    """

    data_dir: Path
    class_names: tuple[str, ...]
    records: list[ImageRecord]
    problems: list[Problem] = field(default_factory=list)
    clamped: dict[str, int] = field(default_factory=dict)
    class_source: str = ""
    format: str = "voc"
    annotation_file: Path | None = None
    category_ids: tuple[int, ...] | None = None
    unlisted: list[Path] = field(default_factory=list)

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
    for images, labels in LAYOUTS:
        if (data_dir / images).is_dir() and (data_dir / labels).is_dir():
            return data_dir / images, data_dir / labels
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
    stem: str, image_path: Path, xml_path: Path, class_names: tuple[str, ...] | None, parser: etree.XMLParser, *,
    allow_empty: bool, decode_images: bool, max_pixels: int, max_xml_bytes: int,
) -> tuple[ImageRecord, int, tuple[str, ...]]:
    """Validate one pair; return its record, clamped-box count and object names or raise DataError."""
    ann = parse_voc_annotation(xml_path, class_names, max_bytes=max_xml_bytes, parser=parser)
    if ann.labels.size == 0 and not allow_empty:
        raise DataError.single(ProblemKind.EMPTY_ANNOTATION, xml_path, "annotation has no <object>")
    check_image_size(image_path, xml_path, ann.width, ann.height, decode_images=decode_images, max_pixels=max_pixels)
    record = ImageRecord(
        stem=stem, image_path=image_path, annotation_path=xml_path, width=ann.width, height=ann.height,
        boxes=ann.boxes, labels=ann.labels, difficult=ann.difficult,
    )
    return record, ann.num_clamped, ann.names


def check_image_size(image_path: Path, annotation_path: Path, width: int, height: int, *,
                     decode_images: bool, max_pixels: int, what: str = "<size>") -> None:
    """Raise DataError when the image's real size is not the annotated ``width`` x ``height``, or
    its aspect ratio is beyond :data:`~distdet.data.images.MAX_ASPECT_RATIO`."""
    size = load_rgb(image_path, max_pixels).size if decode_images else read_image_size(image_path, max_pixels)
    if size != (width, height):
        raise DataError.single(
            ProblemKind.SIZE_MISMATCH, annotation_path,
            f"{what} says {width}x{height} but {image_path.name} is {size[0]}x{size[1]}",
        )
    check_aspect_ratio(image_path, *size)


def settle_problems(problems: list[Problem], usable: bool, where: Path, nothing_usable: str, lenient: bool,
                    skipped: str) -> None:
    """Raise DataError listing ``problems`` when nothing is ``usable`` (either mode) or in strict
    mode; in lenient mode log each problem as a skip of one of the ``skipped`` (files, images)."""
    if not usable:
        problems.append(Problem(ProblemKind.MISSING_IMAGE, where, nothing_usable))
        raise DataError(problems, header=f"{len(problems)} problem(s) in {where}:")
    if problems and not lenient:
        raise DataError(problems, header=f"{len(problems)} problem(s) in {where} (use lenient mode to skip these {skipped}):")
    for problem in problems:
        log.warning("skipping %s", problem)


def _declared_synthetic_names(data_dir: Path) -> tuple[str, ...] | None:
    """The ``class_names`` a synthetic dataset's ``synthetic.json`` declares, if any."""
    from distdet.data.synthetic import read_marker

    names = (read_marker(data_dir) or {}).get("class_names")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _declared_class_list(data_dir: Path, class_names: Sequence[str] | None,
                         run_class_names: Sequence[str] | None, run_what: str) -> ClassList | None:
    """The class list known before parsing (given, or declared by ``synthetic.json``), else None."""
    declared = _declared_synthetic_names(data_dir) if class_names is None else None
    if class_names is None and declared is None:
        return None
    return resolve_class_list(explicit=None if class_names is None else tuple(class_names), declared=declared,
                              declared_source=f"{data_dir / 'synthetic.json'}", run=run_class_names,
                              run_what=run_what)


def _relabel(record: ImageRecord, names: tuple[str, ...], class_names: tuple[str, ...]) -> ImageRecord:
    label_of = {name: i + 1 for i, name in enumerate(class_names)}
    return replace(record, labels=np.asarray([label_of[n] for n in names], dtype=np.int64))


def build_index(
    data_dir: str | os.PathLike[str],
    class_names: Sequence[str] | None = CLASS_NAMES,
    lenient: bool = False,
    *,
    run_class_names: Sequence[str] | None = None,
    run_what: str = "the run",
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

    ``class_names=None`` takes the class list from the data (see
    :mod:`distdet.data.class_list`): every XML is still parsed once, labels are assigned
    when all names are known. With ``run_class_names`` the resolved list must match that
    run's (:class:`~distdet.data.class_list.ClassListError` naming both lists otherwise).
    """
    data_dir = Path(data_dir)
    class_list = _declared_class_list(data_dir, class_names, run_class_names, run_what)
    class_names = None if class_list is None else class_list.names
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
    object_names: list[tuple[str, ...]] = []
    for stem in sorted(images.keys() & annotations.keys()):
        try:
            record, n_clamped, names = _index_pair(
                stem, images[stem], annotations[stem], class_names, parser, allow_empty=allow_empty,
                decode_images=decode_images, max_pixels=max_pixels, max_xml_bytes=max_xml_bytes,
            )
        except DataError as exc:
            problems.extend(exc.problems)
            continue
        records.append(record)
        object_names.append(names)
        if n_clamped:
            clamped[stem] = n_clamped
    if class_list is None:
        found = {name for names in object_names for name in names}
        class_list = resolve_class_list(found=found, run=run_class_names, run_what=run_what)
        records = [_relabel(r, names, class_list.names) for r, names in zip(records, object_names)]

    settle_problems(problems, bool(records), data_dir, "no usable image/annotation pairs", lenient, "files")
    return DataIndex(data_dir=data_dir, class_names=class_list.names, records=records, problems=problems,
                     clamped=clamped, class_source=class_list.source)
