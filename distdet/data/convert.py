"""Write an indexed dataset in the other layout: COCO instances JSON or PASCAL VOC folders.

Both writers take a :class:`~distdet.data.index.DataIndex` (so the source was validated by
the reader of its own format) and produce a folder that reads back into the same records:
same stems in the same order, same sizes, labels and class list, and boxes equal to the
float32 values of the source (coordinates are written in full precision, and a float32 pair
``x1, x2`` is exactly ``x, x + w`` in float64). The VOC ``difficult`` flag travels in COCO as
the extra annotation key ``difficult``; COCO crowd regions have no VOC counterpart and are
left out of a VOC copy (the writer returns how many). Images are copied (or hard-linked with
``link=True``); the folder is built under a temporary name and renamed into place.
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxml import etree

from distdet.data.index import DataIndex
from distdet.data.records import ImageRecord
from distdet.io_utils import atomic_write_json

FORMATS = ("coco", "voc")


def _number(value: float) -> str:
    """A coordinate as written: an integer when it is one, else the shortest exact float."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _image_name(record: ImageRecord) -> str:
    return record.stem + record.image_path.suffix.lower()


def coco_dataset(index: DataIndex) -> dict[str, Any]:
    """The index as a COCO instances dict (image ids 1..N in record order, categories 1..K)."""
    images, annotations = [], []
    for image_id, record in enumerate(index.records, start=1):
        images.append({"id": image_id, "file_name": _image_name(record), "width": record.width,
                       "height": record.height})
        for box, label, difficult, crowd in zip(record.boxes.tolist(), record.labels.tolist(),
                                                record.difficult.tolist() or [False] * record.num_objects,
                                                record.crowd.tolist()):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(crowd), "difficult": int(difficult)})
    categories = [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(index.class_names)]
    return {"info": {"description": f"converted by distdet from {index.data_dir}"}, "images": images,
            "annotations": annotations, "categories": categories}


def voc_xml(record: ImageRecord, class_names: tuple[str, ...]) -> tuple[bytes, int]:
    """One record as VOC XML bytes, and the number of crowd regions left out."""
    root = etree.Element("annotation")
    etree.SubElement(root, "filename").text = _image_name(record)
    size = etree.SubElement(root, "size")
    for tag, value in (("width", record.width), ("height", record.height), ("depth", 3)):
        etree.SubElement(size, tag).text = str(value)
    crowd = record.crowd
    difficult = record.difficult.tolist() or [False] * record.num_objects
    for box, label, hard, is_crowd in zip(record.boxes.tolist(), record.labels.tolist(), difficult, crowd.tolist()):
        if is_crowd:
            continue
        obj = etree.SubElement(root, "object")
        etree.SubElement(obj, "name").text = class_names[int(label) - 1]
        etree.SubElement(obj, "difficult").text = "1" if hard else "0"
        bndbox = etree.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            etree.SubElement(bndbox, tag).text = _number(value)
    return etree.tostring(root, pretty_print=True, xml_declaration=False, encoding="utf-8"), int(crowd.sum())


def _place_image(record: ImageRecord, dst: Path, link: bool) -> None:
    target = dst / _image_name(record)
    if link:
        try:
            os.link(record.image_path, target)
            return
        except OSError:
            pass  # another file system: copy instead
    shutil.copyfile(record.image_path, target)


def _build(dst: Path, fill: Callable[[Path], None], overwrite: bool) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst}: exists and is not an empty folder (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fill(tmp)
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst


def write_coco(index: DataIndex, dst: str | os.PathLike[str], *, link: bool = False, overwrite: bool = False) -> Path:
    """Write ``dst/images/*`` and ``dst/annotations.json``; return ``dst``."""
    def fill(root: Path) -> None:
        (root / "images").mkdir(parents=True)
        for record in index.records:
            _place_image(record, root / "images", link)
        atomic_write_json(root / "annotations.json", coco_dataset(index))

    return _build(Path(dst), fill, overwrite)


def write_voc(index: DataIndex, dst: str | os.PathLike[str], *, link: bool = False,
              overwrite: bool = False) -> tuple[Path, int]:
    """Write ``dst/images/*`` and ``dst/annotations/<stem>.xml``; return ``dst`` and the crowd regions left out."""
    left_out = 0

    def fill(root: Path) -> None:
        nonlocal left_out
        (root / "images").mkdir(parents=True)
        (root / "annotations").mkdir()
        for record in index.records:
            _place_image(record, root / "images", link)
            xml, crowd = voc_xml(record, index.class_names)
            (root / "annotations" / f"{record.stem}.xml").write_bytes(xml)
            left_out += crowd

    return _build(Path(dst), fill, overwrite), left_out
