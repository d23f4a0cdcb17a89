"""Problems found in untrusted dataset files, and the error that carries them.

Every check in :mod:`distdet.data` reports what it finds as a :class:`Problem` (a kind from
:class:`ProblemKind`, the offending file, and a sentence saying what is wrong). Strict code
paths raise :class:`DataError` holding all problems found; lenient ones skip the file and keep
the problem for the report.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class ProblemKind(str, Enum):
    """The kinds of bad input the dataset layer detects."""

    MALFORMED_XML = "malformed_xml"
    MALFORMED_JSON = "malformed_json"
    DUPLICATE_ID = "duplicate_id"
    UNSAFE_XML = "unsafe_xml"
    OVERSIZED_FILE = "oversized_file"
    NOT_A_FILE = "not_a_file"
    BAD_VALUE = "bad_value"
    UNKNOWN_CLASS = "unknown_class"
    MISSING_IMAGE = "missing_image"
    MISSING_ANNOTATION = "missing_annotation"
    DUPLICATE_STEM = "duplicate_stem"
    UNREADABLE_IMAGE = "unreadable_image"
    TRUNCATED_IMAGE = "truncated_image"
    IMAGE_TOO_LARGE = "image_too_large"
    SIZE_MISMATCH = "size_mismatch"
    DEGENERATE_BOX = "degenerate_box"
    BOX_OUTSIDE_IMAGE = "box_outside_image"
    EMPTY_ANNOTATION = "empty_annotation"
    EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    kind: ProblemKind
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} [{self.kind.value}]"


class DataError(ValueError):
    """Bad dataset input; ``problems`` lists every problem found, each naming its file."""

    def __init__(self, problems: Iterable[Problem], header: str | None = None) -> None:
        self.problems: list[Problem] = list(problems)
        if not self.problems:
            raise ValueError("DataError needs at least one problem")
        lines = [str(p) for p in self.problems]
        if header is None and len(lines) == 1:
            text = lines[0]
        else:
            text = "\n".join([header or f"{len(lines)} problems in the dataset:", *("  " + l for l in lines)])
        super().__init__(text)

    @classmethod
    def single(cls, kind: ProblemKind, path: Path | str, message: str) -> "DataError":
        return cls([Problem(kind, Path(path), message)])
