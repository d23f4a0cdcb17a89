"""Read a COCO instances JSON (plus its image folder) into a :class:`~distdet.data.index.DataIndex`.

The file is untrusted input, read under the same rules as the VOC layer:

- it must be a regular file of at most ``max_bytes`` (:data:`MAX_JSON_BYTES`), checked with
  ``stat`` before reading, and is parsed ONCE with :mod:`json`; nesting deeper than the parser's
  recursion limit is refused as a clear error, not a crash;
- the top level must be an object with lists ``images``, ``annotations`` and ``categories``;
  every entry is checked for its type and fields, and a problem names the file, the entry
  (``images[3] (id 17)``) and what is wrong; numbers must be finite (``NaN``/``Infinity``,
  which Python's json accepts, are refused);
- ids must be unique (images, annotations, categories) as must category names and image
  file names; annotations must name a known image and category; boxes (``bbox`` x, y, w, h)
  must have w, h > 0 and overlap the image (they are clamped to it); ``file_name`` must be a
  relative path inside the image folder; each image must exist with the listed size, its
  header checked before any pixel is decoded (decompression bombs);
- image files in the image folder that the file does not list are logged as a warning.

Category ids need not be contiguous: the categories, sorted by id, become labels 1..K (or,
with an explicit class list, each category maps to its name's position in that list); the
original id of each label is kept in ``DataIndex.category_ids`` and each image's id in its
record's ``source_id``. ``iscrowd`` annotations are kept with ``ImageRecord.iscrowd`` set:
the training dataset leaves them out and the evaluation treats them as pycocotools does.
The optional per-annotation key ``difficult`` (0/1, written by ``distdet convert``) carries the
VOC flag. Records are sorted by file stem, like a VOC index.

Strict mode raises :class:`DataError` listing every problem; lenient mode skips each image
that has a problem (with its annotations) and keeps the problems. Problems in
``categories`` and in the file's structure are always fatal (the class list depends on them).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from distdet.data.class_list import ClassList, ClassListError, ClassListMismatch, resolve_class_list
from distdet.data.images import IMAGE_SUFFIXES, MAX_PIXELS
from distdet.data.index import DataIndex, check_image_size, settle_problems
from distdet.data.problems import DataError, Problem, ProblemKind
from distdet.data.records import ImageRecord
from distdet.data.voc import read_untrusted_bytes

log = logging.getLogger(__name__)

#: Largest annotation file accepted: 64 MiB holds about 300k box annotations (a large
#: Roboflow / CVAT export is a few MB); parsed, such a file takes roughly 10x its size in memory.
MAX_JSON_BYTES = 64 << 20
#: Names looked for in a dataset folder, in order (``instances_*.json`` also under annotations/).
COCO_NAMES = ("annotations.json", "instances_*.json")
_SECTIONS = ("images", "annotations", "categories")


def find_coco_file(data_dir: Path, annotations: str | os.PathLike[str] | None = None) -> Path | None:
    """The COCO file of ``data_dir``: ``annotations`` if given, else ``annotations.json``, else
    the one ``instances_*.json`` in the folder or its ``annotations/``; None when there is none.
    Several candidates are a DataError listing them."""
    if annotations is not None:
        path = Path(annotations)
        if not path.is_file():
            raise DataError.single(ProblemKind.NOT_A_FILE, path, "--annotations file does not exist")
        return path
    if (data_dir / COCO_NAMES[0]).is_file():
        return data_dir / COCO_NAMES[0]
    found = sorted(data_dir.glob(COCO_NAMES[1])) + sorted((data_dir / "annotations").glob(COCO_NAMES[1]))
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise DataError.single(ProblemKind.NOT_A_FILE, data_dir, "several COCO files: "
                               + ", ".join(p.name for p in found) + "; choose one with --annotations FILE")
    return found[0] if found else None


def coco_images_dir(data_dir: Path, coco_file: Path) -> Path:
    """``data_dir/images`` if present, else ``data_dir/<split>`` for ``instances_<split>.json``, else ``data_dir``."""
    if (data_dir / "images").is_dir():
        return data_dir / "images"
    split = coco_file.stem.removeprefix("instances_")
    if coco_file.stem.startswith("instances_") and (data_dir / split).is_dir():
        return data_dir / split
    return data_dir


def load_coco_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, list]:
    """Read and parse ``path`` once; DataError naming the file unless it is an object with the three lists."""
    data = read_untrusted_bytes(path, max_bytes)
    try:
        content = json.loads(data)
    except RecursionError:
        raise DataError.single(ProblemKind.MALFORMED_JSON, path, "JSON nested too deeply to be a COCO file") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise DataError.single(ProblemKind.MALFORMED_JSON, path, f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(content, dict):
        raise DataError.single(ProblemKind.MALFORMED_JSON, path, "expected a JSON object with 'images', "
                               f"'annotations' and 'categories', got a {_type(content)}")
    problems = [Problem(ProblemKind.MALFORMED_JSON, path, f"{key!r} must be a list, got "
                        + ("nothing" if key not in content else f"a {_type(content[key])}"))
                for key in _SECTIONS if not isinstance(content.get(key), list)]
    if problems:
        raise DataError(problems, header=f"{path}: {len(problems)} problem(s):")
    return {key: content[key] for key in _SECTIONS}


def _type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fields(entry: Any, where: str, wanted: dict[str, str]) -> str | None:
    """Why ``entry`` is not an object with the ``wanted`` fields, or None; ``wanted`` maps a field
    name to 'id' (an integer), 'size' (a positive integer), 'text' (a non-empty string) or 'any'."""
    if not isinstance(entry, dict):
        return f"{where}: expected an object, got a {_type(entry)}"
    for name, kind in wanted.items():
        value = entry.get(name)
        if name not in entry:
            return f"{where}: missing {name!r}"
        if kind == "id" and not _integer(value):
            return f"{where}: {name!r} must be an integer, got {value!r:.60}"
        if kind == "size" and not (_integer(value) and value > 0):
            return f"{where}: {name!r} must be a positive integer, got {value!r:.60}"
        if kind == "text" and not (isinstance(value, str) and value.strip()):
            return f"{where}: {name!r} must be a non-empty string, got {value!r:.60}"
    return None


def _categories(path: Path, entries: list) -> dict[int, str]:
    """Category id -> name; every problem is fatal."""
    problems: list[Problem] = []
    by_id: dict[int, str] = {}
    names: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"categories[{i}]"
        why = _fields(entry, where, {"id": "id", "name": "text"})
        if why is None and entry["id"] in by_id:
            why = f"{where}: duplicate category id {entry['id']} (also categories with name {by_id[entry['id']]!r})"
        if why is None and entry["name"].strip() in names:
            why = f"{where}: duplicate category name {entry['name']!r} (ids {names[entry['name'].strip()]} and {entry['id']})"
        if why is not None:
            kind = ProblemKind.DUPLICATE_ID if "duplicate" in why else ProblemKind.BAD_VALUE
            problems.append(Problem(kind, path, why))
            continue
        by_id[entry["id"]] = entry["name"].strip()
        names[entry["name"].strip()] = entry["id"]
    if not by_id and not problems:
        problems.append(Problem(ProblemKind.BAD_VALUE, path, "'categories' is empty"))
    if problems:
        raise DataError(problems, header=f"{path}: {len(problems)} problem(s) in 'categories':")
    return by_id


def _class_list(path: Path, categories: dict[int, str], class_names: Sequence[str] | None,
                run_class_names: Sequence[str] | None, run_what: str) -> tuple[ClassList, dict[int, int]]:
    """The class list and category id -> label; unknown names under an explicit list are fatal."""
    declared = tuple(categories[c] for c in sorted(categories))
    try:
        resolved = resolve_class_list(explicit=class_names, declared=declared,
                                      declared_source=f"the categories of {path}", run=run_class_names,
                                      run_what=run_what)
    except ClassListMismatch:
        raise
    except ClassListError as exc:  # the categories' names cannot be a class list
        raise DataError.single(ProblemKind.BAD_VALUE, path, str(exc)) from None
    label_of = {name: i + 1 for i, name in enumerate(resolved.names)}
    unknown = [f"{categories[c]!r} (id {c})" for c in sorted(categories) if categories[c] not in label_of]
    if unknown:
        raise DataError.single(ProblemKind.UNKNOWN_CLASS, path, f"categories {', '.join(unknown)} are not in the "
                               f"class list {', '.join(resolved.names)}")
    return resolved, {c: label_of[name] for c, name in categories.items()}


def _safe_relative(file_name: str) -> bool:
    parts = PurePosixPath(file_name.replace("\\", "/")).parts
    return bool(parts) and not file_name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


@dataclass
class _Image:
    """One valid ``images`` entry and what the annotations add to it."""

    id: int
    file_name: str
    width: int
    height: int
    where: str
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    difficult: list[bool] = field(default_factory=list)
    crowd: list[bool] = field(default_factory=list)
    clamped: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.file_name.replace("\\", "/")).stem


def _images(path: Path, entries: list, problems: list[Problem]) -> dict[int, _Image]:
    """Valid images by id; entries with a bad field, or sharing an id, file name or stem, are problems."""
    images: dict[int, _Image] = {}
    claimed: dict[str, list[int]] = defaultdict(list)  # "id 5", "file_name 'a.png'", "file stem 'a'" -> entries
    parsed: list[_Image] = []
    for i, entry in enumerate(entries):
        where = f"images[{i}]" + (f" (id {entry['id']})" if isinstance(entry, dict) and _integer(entry.get("id")) else "")
        why = _fields(entry, where, {"id": "id", "file_name": "text", "width": "size", "height": "size"})
        if why is None and not _safe_relative(entry["file_name"]):
            why = f"{where}: file_name {entry['file_name']!r:.80} must be a relative path inside the image folder"
        if why is not None:
            problems.append(Problem(ProblemKind.BAD_VALUE, path, why))
            continue
        image = _Image(entry["id"], entry["file_name"], entry["width"], entry["height"], where)
        parsed.append(image)
        for key in (f"id {image.id}", f"file_name {image.file_name!r}", f"file stem {image.stem!r}"):
            claimed[key].append(len(parsed) - 1)
    clashing: set[int] = set()
    reported: set[tuple[int, ...]] = set()
    for key, indices in claimed.items():
        if len(indices) > 1 and tuple(indices) not in reported:  # one file name clash is one stem clash too
            reported.add(tuple(indices))
            clashing.update(indices)
            entries_text = ", ".join(parsed[j].where for j in indices)
            problems.append(Problem(ProblemKind.DUPLICATE_ID, path, f"{entries_text} share the {key}"))
    for j, image in enumerate(parsed):
        if j not in clashing:
            images[image.id] = image
    return images


def _add_annotation(path: Path, i: int, entry: Any, images: dict[int, _Image], label_of: dict[int, int],
                    seen_ids: dict[int, int], rejected: set[int], problems: list[Problem]) -> None:
    """Validate ``annotations[i]`` and add it to its image; a problem goes to the image it names
    (so lenient mode skips that image) or, when it names none, to ``problems``."""
    is_object = isinstance(entry, dict)
    where = f"annotations[{i}]" + (f" (id {entry['id']})" if is_object and _integer(entry.get("id")) else "")
    image = images.get(entry.get("image_id")) if is_object and _integer(entry.get("image_id")) else None
    if image is None and is_object and entry.get("image_id") in rejected:
        return  # its image entry already has a problem
    found = problems if image is None else image.problems

    def bad(kind: ProblemKind, message: str) -> None:
        found.append(Problem(kind, path, f"{where}{'' if image is None else ' of ' + image.where}: {message}"))

    why = _fields(entry, "", {"id": "id", "image_id": "id", "category_id": "id", "bbox": "any"})
    if why is not None:
        return bad(ProblemKind.BAD_VALUE, why.removeprefix(": "))
    if entry["id"] in seen_ids:
        return bad(ProblemKind.DUPLICATE_ID, f"duplicate annotation id {entry['id']} (also annotations[{seen_ids[entry['id']]}])")
    seen_ids[entry["id"]] = i
    if image is None:
        return bad(ProblemKind.BAD_VALUE, f"image_id {entry['image_id']} is not an entry of 'images'")
    bbox, category = entry["bbox"], entry["category_id"]
    crowd, difficult = entry.get("iscrowd", 0), entry.get("difficult", 0)
    if category not in label_of:
        return bad(ProblemKind.UNKNOWN_CLASS, f"category_id {category} is not in 'categories'")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite(v) for v in bbox)):
        return bad(ProblemKind.BAD_VALUE, f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r:.80}")
    for name, flag in (("iscrowd", crowd), ("difficult", difficult)):
        if not _integer(flag) or flag not in (0, 1):
            return bad(ProblemKind.BAD_VALUE, f"{name} must be 0 or 1, got {flag!r:.40}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return bad(ProblemKind.DEGENERATE_BOX, f"degenerate bbox [{x:g}, {y:g}, {w:g}, {h:g}] needs w > 0 and h > 0")
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(image.width)), min(y + h, float(image.height))
    if x2 <= x1 or y2 <= y1:
        return bad(ProblemKind.BOX_OUTSIDE_IMAGE,
                   f"bbox [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {image.width}x{image.height} image")
    image.clamped += (x1, y1, x2, y2) != (x, y, x + w, y + h)
    image.boxes.append([x1, y1, x2, y2])
    image.labels.append(label_of[category])
    image.crowd.append(bool(crowd))
    image.difficult.append(bool(difficult))


def _record(image: _Image, images_dir: Path, path: Path, *, allow_empty: bool, decode_images: bool,
            max_pixels: int) -> ImageRecord:
    """The record of one image whose annotations are valid; DataError for file problems."""
    image_path = images_dir / image.file_name.replace("\\", "/")
    if not image.labels and not allow_empty:
        raise DataError.single(ProblemKind.EMPTY_ANNOTATION, path, f"{image.where}: image has no annotations")
    if image_path.suffix.lower() not in IMAGE_SUFFIXES or not image_path.is_file():
        raise DataError.single(ProblemKind.MISSING_IMAGE, path,
                               f"{image.where}: no PNG/JPEG image {image.file_name!r} in {images_dir}")
    check_image_size(image_path, path, image.width, image.height, decode_images=decode_images,
                     max_pixels=max_pixels, what=f"{image.where}")
    return ImageRecord(
        stem=image.stem, image_path=image_path, annotation_path=path, width=image.width, height=image.height,
        boxes=np.asarray(image.boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(image.labels, dtype=np.int64), difficult=np.asarray(image.difficult, dtype=bool),
        iscrowd=np.asarray(image.crowd, dtype=bool), source_id=image.id)


def _unlisted(images_dir: Path, listed: set[Path]) -> list[Path]:
    """Image files directly in ``images_dir`` that no ``images`` entry names."""
    with os.scandir(images_dir) as entries:
        found = [Path(e.path) for e in entries
                 if not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p not in listed)


def build_coco_index(
    data_dir: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
    lenient: bool = False,
    *,
    annotations: str | os.PathLike[str] | None = None,
    run_class_names: Sequence[str] | None = None,
    run_what: str = "the run",
    allow_empty: bool = False,
    decode_images: bool = False,
    max_pixels: int = MAX_PIXELS,
    max_json_bytes: int = MAX_JSON_BYTES,
) -> DataIndex:
    """Index the COCO dataset of ``data_dir`` (see the module docstring for every check).

    ``annotations`` names the JSON file (default: :func:`find_coco_file`); images are looked
    up under :func:`coco_images_dir`. The class list follows :mod:`distdet.data.class_list`.
    """
    data_dir = Path(data_dir)
    path = find_coco_file(data_dir, annotations)
    if path is None:
        raise DataError.single(ProblemKind.NOT_A_FILE, data_dir, "no COCO file (annotations.json or instances_*.json)")
    content = load_coco_json(path, max_json_bytes)
    categories = _categories(path, content["categories"])
    class_list, label_of = _class_list(path, categories, class_names, run_class_names, run_what)
    problems: list[Problem] = []
    images = _images(path, content["images"], problems)
    rejected = {e["id"] for e in content["images"] if isinstance(e, dict) and _integer(e.get("id"))} - images.keys()
    seen_ids: dict[int, int] = {}
    for i, entry in enumerate(content["annotations"]):
        _add_annotation(path, i, entry, images, label_of, seen_ids, rejected, problems)

    images_dir = coco_images_dir(data_dir, path)
    records: list[ImageRecord] = []
    clamped: dict[str, int] = {}
    for image in sorted(images.values(), key=lambda im: (im.stem, im.id)):
        if image.problems:
            problems.extend(image.problems)
            continue
        try:
            records.append(_record(image, images_dir, path, allow_empty=allow_empty, decode_images=decode_images,
                                   max_pixels=max_pixels))
        except DataError as exc:
            problems.extend(exc.problems)
            continue
        if image.clamped:
            clamped[image.stem] = image.clamped
    settle_problems(problems, bool(records), path, "no usable image in the COCO file", lenient, "images")
    unlisted = _unlisted(images_dir, {images_dir / im.file_name.replace("\\", "/") for im in images.values()})
    if unlisted:
        log.warning("%d image file(s) in %s are not listed in %s and are not used: %s%s", len(unlisted), images_dir,
                    path.name, ", ".join(p.name for p in unlisted[:5]), " ..." if len(unlisted) > 5 else "")
    label_ids = {label: c for c, label in label_of.items()}
    return DataIndex(
        data_dir=data_dir, class_names=class_list.names, records=records, problems=problems, clamped=clamped,
        class_source=class_list.source, format="coco", annotation_file=path,
        category_ids=tuple(label_ids.get(i + 1, -1) for i in range(len(class_list.names))), unlisted=unlisted)
