"""Parse one PASCAL VOC annotation file, treating it as untrusted input.

Defences: the file must be a regular file no larger than ``max_bytes``; it must be ASCII-
compatible (no NUL bytes, so no UTF-16/32 that could hide markup from the byte scan); any
``<!DOCTYPE`` or ``<!ENTITY`` is refused before parsing (no entity expansion, so no "billion
laughs" and no external entities); lxml runs with entity resolution, DTD loading and network
access off and its default depth/size limits on. Numbers must be plain finite decimals.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lxml import etree

from distdet.classes import CLASS_NAMES
from distdet.data.files import read_untrusted_bytes
from distdet.data.problems import DataError, Problem, ProblemKind

#: Largest annotation file accepted (the real ones are about 1 KiB).
MAX_XML_BYTES = 1 << 20

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_COORDS = ("xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True)
class VocAnnotation:
    """One parsed annotation: size from ``<size>``, boxes clamped to it, label ids 1-based."""

    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy, clamped to [0, width] x [0, height]
    labels: np.ndarray  # int64 [N] (0 for every object when parsed without a class list)
    difficult: np.ndarray  # bool [N]
    num_clamped: int  # boxes that had to be clamped into the image
    names: tuple[str, ...] = ()  # class name of each object


def make_xml_parser() -> etree.XMLParser:
    """An lxml parser that never resolves entities, loads DTDs or touches the network."""
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        remove_blank_text=True,
        dtd_validation=False,
        load_dtd=False,
        remove_comments=True,
        remove_pis=True,
    )


def _parse_number(text: str | None, what: str) -> float:
    if text is None:
        raise ValueError(f"missing {what}")
    s = text.strip()
    if s.isascii() and s.isdigit():  # fast path: the common plain integer
        return float(s)
    if not _NUMBER.fullmatch(s):
        raise ValueError(f"{what} is not a number: {s[:40]!r}")
    value = float(s)
    if not math.isfinite(value):
        raise ValueError(f"{what} is not a finite number: {s[:40]!r}")
    return value


def _parse_size(text: str | None, what: str) -> int:
    value = _parse_number(text, what)
    if value != int(value) or value < 1:
        raise ValueError(f"{what} must be a positive whole number, got {text.strip()[:40]!r}")
    return int(value)


def _text(element: etree._Element | None) -> str | None:
    return None if element is None else element.text


def _parse_tree(path: Path, data: bytes, parser: etree.XMLParser) -> etree._Element:
    if b"\x00" in data:
        raise DataError.single(ProblemKind.UNSAFE_XML, path, "NUL bytes: only UTF-8/ASCII XML is accepted")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise DataError.single(ProblemKind.UNSAFE_XML, path, "DOCTYPE/ENTITY declarations are refused")
    try:
        root = etree.fromstring(data.lstrip(b" \t\r\n"), parser)
    except etree.XMLSyntaxError as exc:
        raise DataError.single(ProblemKind.MALFORMED_XML, path, f"not well-formed XML: {exc}") from None
    if root is None:
        raise DataError.single(ProblemKind.MALFORMED_XML, path, "empty XML document")
    if root.getroottree().docinfo.doctype:
        raise DataError.single(ProblemKind.UNSAFE_XML, path, "DOCTYPE declarations are refused")
    if root.tag != "annotation":
        raise DataError.single(ProblemKind.MALFORMED_XML, path, f"root element is <{root.tag}>, expected <annotation>")
    return root


def parse_voc_annotation(
    path: str | os.PathLike[str],
    class_names: tuple[str, ...] | None = CLASS_NAMES,
    *,
    max_bytes: int = MAX_XML_BYTES,
    parser: etree.XMLParser | None = None,
) -> VocAnnotation:
    """Parse and validate one VOC XML file.

    Coordinates are taken as given on a continuous pixel axis; a box running past the image
    is clamped to it and counted in ``num_clamped``. Raises :class:`DataError` listing every
    problem in the file (unsafe or malformed XML, oversized file, missing or non-numeric
    values, unknown class names, degenerate boxes, boxes entirely outside the image).
    A file with no ``<object>`` is returned with zero boxes; callers decide if that is allowed.
    With ``class_names=None`` any name is accepted and every label is 0: the caller assigns
    labels once the class list is known (from ``names``).
    """
    path = Path(path)
    root = _parse_tree(path, read_untrusted_bytes(path, max_bytes, "annotation"), parser or make_xml_parser())
    try:
        width = _parse_size(root.findtext("size/width"), "<size>/<width>")
        height = _parse_size(root.findtext("size/height"), "<size>/<height>")
    except ValueError as exc:
        raise DataError.single(ProblemKind.BAD_VALUE, path, str(exc)) from None

    label_of = None if class_names is None else {name: i + 1 for i, name in enumerate(class_names)}
    problems: list[Problem] = []
    boxes: list[list[float]] = []
    labels: list[int] = []
    names: list[str] = []
    difficult: list[bool] = []
    num_clamped = 0
    for i, obj in enumerate(root.iterfind("object")):
        fields = {child.tag: child for child in obj}
        name = (_text(fields.get("name")) or "").strip()
        where = f"object {i} ({name or 'no name'})"
        try:
            if not name:
                raise ValueError("missing <name>")
            bndbox = fields.get("bndbox")
            if bndbox is None:
                raise ValueError("missing <bndbox>")
            corners = {child.tag: child.text for child in bndbox}
            coords = [_parse_number(corners.get(c), f"<bndbox>/<{c}>") for c in _COORDS]
            flag = (_text(fields.get("difficult")) or "0").strip()
            if flag not in ("0", "1"):
                raise ValueError(f"<difficult> must be 0 or 1, got {flag[:40]!r}")
        except ValueError as exc:
            problems.append(Problem(ProblemKind.BAD_VALUE, path, f"{where}: {exc}"))
            continue
        if label_of is not None and name not in label_of:
            problems.append(Problem(
                ProblemKind.UNKNOWN_CLASS, path,
                f"{where}: unknown class name {name[:80]!r}; known classes: {', '.join(class_names)}",
            ))
            continue
        x1, y1, x2, y2 = coords
        if x2 <= x1 or y2 <= y1:
            problems.append(Problem(
                ProblemKind.DEGENERATE_BOX, path,
                f"{where}: degenerate box (xmin={x1:g}, ymin={y1:g}, xmax={x2:g}, ymax={y2:g}) needs xmax > xmin and ymax > ymin",
            ))
            continue
        cx1, cx2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        cy1, cy2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if cx2 <= cx1 or cy2 <= cy1:
            problems.append(Problem(
                ProblemKind.BOX_OUTSIDE_IMAGE, path,
                f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image",
            ))
            continue
        num_clamped += (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
        boxes.append([cx1, cy1, cx2, cy2])
        labels.append(0 if label_of is None else label_of[name])
        names.append(name)
        difficult.append(flag == "1")
    if problems:
        raise DataError(problems, header=f"{path}: {len(problems)} problem(s):")
    return VocAnnotation(
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
        num_clamped=num_clamped,
        names=tuple(names),
    )
