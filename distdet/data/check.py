"""Audit a VOC or COCO dataset: what ``distdet check-data`` reports (the same report for both)."""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distdet.data.class_list import ClassListError
from distdet.data.index import DataIndex
from distdet.data.problems import DataError, Problem, ProblemKind
from distdet.data.records import ImageRecord
from distdet.data.sources import dataset_format, open_index


@dataclass
class DataReport:
    """Summary of one dataset folder; ``ok`` says whether it can be used in the chosen mode."""

    data_dir: Path
    class_names: tuple[str, ...]
    lenient: bool
    images: int = 0
    objects_per_class: dict[str, int] = field(default_factory=dict)
    image_sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    clamped: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    format: str = "voc"
    annotation_file: Path | None = None
    class_source: str = ""
    unlisted: list[Path] = field(default_factory=list)
    #: The usable images (for ``--plots``); not part of :meth:`to_dict`.
    records: list[ImageRecord] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """Strict: no problem at all. Lenient: at least one usable image (problems are skips)."""
        return self.images > 0 and (self.lenient or not self.problems)

    def problems_by_kind(self) -> dict[str, list[Problem]]:
        grouped: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            grouped[p.kind.value].append(p)
        return dict(sorted(grouped.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "mode": "lenient" if self.lenient else "strict",
            "ok": self.ok,
            "format": self.format,
            "annotation_file": None if self.annotation_file is None else str(self.annotation_file),
            "class_names": list(self.class_names),
            "class_source": self.class_source,
            "images": self.images,
            "objects": sum(self.objects_per_class.values()),
            "objects_per_class": self.objects_per_class,
            "image_sizes": {
                "distinct": len(self.image_sizes),
                "most_common": [{"width": w, "height": h, "images": n} for (w, h), n in self.image_sizes.most_common(5)],
            },
            "clamped_boxes": sum(self.clamped.values()),
            "clamped_images": self.clamped,
            "unlisted_images": [str(p) for p in self.unlisted],
            "problems": {
                kind: [{"path": str(p.path), "message": p.message} for p in items]
                for kind, items in self.problems_by_kind().items()
            },
        }


def check_data(
    data_dir: str | os.PathLike[str],
    class_names: tuple[str, ...] | None = None,
    *,
    lenient: bool = False,
    decode_images: bool = True,
    allow_empty: bool = False,
    annotations: str | os.PathLike[str] | None = None,
) -> DataReport:
    """Index ``data_dir`` (COCO or VOC, see :func:`~distdet.data.sources.open_index`) collecting
    every problem (decoding every image unless told not to). ``class_names=None`` takes the
    class list from the data."""
    report = DataReport(Path(data_dir), tuple(class_names or ()), lenient)
    try:
        report.format = dataset_format(data_dir, annotations)
        index: DataIndex = open_index(data_dir, class_names, lenient=True, annotations=annotations,
                                      allow_empty=allow_empty, decode_images=decode_images)
    except ClassListError as exc:  # names that cannot be a class list
        report.problems = [Problem(ProblemKind.UNKNOWN_CLASS, Path(data_dir), str(exc))]
        return report
    except DataError as exc:  # nothing usable: report what was found
        report.problems = exc.problems
        report.objects_per_class = dict.fromkeys(report.class_names, 0)
        return report
    report.class_names, report.class_source = index.class_names, index.class_source
    report.annotation_file, report.unlisted = index.annotation_file, index.unlisted
    report.images = len(index.records)
    report.objects_per_class = index.class_counts()
    report.image_sizes = Counter((r.width, r.height) for r in index.records)
    report.clamped = dict(index.clamped)
    report.problems = index.problems
    report.records = index.records
    return report


def format_report(report: DataReport) -> str:
    """The human-readable report printed by ``distdet check-data``."""
    layout = "COCO" + (f" ({report.annotation_file})" if report.annotation_file else "") if report.format == "coco" \
        else "PASCAL VOC"
    lines = [f"Dataset: {report.data_dir}", f"Format: {layout}", f"Mode: {'lenient' if report.lenient else 'strict'}"]
    if report.class_names:
        lines.append(f"Classes: {', '.join(report.class_names)}" + (f" (from {report.class_source})"
                                                                    if report.class_source else ""))
    lines += [f"Images: {report.images}", f"Objects: {sum(report.objects_per_class.values())}"]
    width = max((len(n) for n in report.objects_per_class), default=0)
    lines += [f"  {name:<{width}}  {count:>6}" for name, count in report.objects_per_class.items()]
    if report.image_sizes:
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in report.image_sizes.most_common(3))
        lines.append(f"Image sizes: {len(report.image_sizes)} distinct; most common: {common}")
    n_clamped = sum(report.clamped.values())
    lines.append(f"Clamped boxes: {n_clamped} in {len(report.clamped)} images")
    if report.clamped:
        lines.append("  " + ", ".join(f"{stem} ({n})" for stem, n in report.clamped.items()))
    if report.unlisted:
        lines.append(f"Unlisted images (in the image folder, not in the COCO file; not used): {len(report.unlisted)}")
        lines += [f"  {p}" for p in report.unlisted[:20]] + ([f"  ... and {len(report.unlisted) - 20} more"]
                                                            if len(report.unlisted) > 20 else [])
    grouped = report.problems_by_kind()
    lines.append(f"Problems: {len(report.problems)}" + ("" if report.problems else " (none)"))
    for kind, items in grouped.items():
        lines.append(f"  {kind}: {len(items)}")
        lines += [f"    {p.path}: {p.message}" for p in items]
    if report.ok and report.problems and report.format == "coco":
        lines.append(f"Result: OK in lenient mode (the images of {len(report.problems)} problem(s) would be skipped)")
    elif report.ok and report.problems:
        files = len({p.path for p in report.problems})
        lines.append(f"Result: OK in lenient mode ({files} file(s) would be skipped)")
    else:
        lines.append("Result: OK" if report.ok else "Result: ERRORS")
    return "\n".join(lines)
