"""The class list of a run: where it comes from, and the check that two lists agree.

A run's classes are, in this order of precedence:

1. the names given explicitly (``--class-names a,b,c``, or ``classes:`` / ``class-names:``
   in a config file), in that order;
2. the names the dataset declares: a COCO file's ``categories`` (sorted by category id), or
   the ``class_names`` of a synthetic dataset's ``synthetic.json``;
3. for a VOC folder, the names found in its annotations: the face-mask table when they are
   all face-mask names, else the names sorted alphabetically (logged, with a hint to pass
   ``--class-names`` for another order).

Background is label 0; the classes are labels 1..K in list order. A run that resumes, or a
model that is evaluated, compares its recorded list with the one resolved from the data, and
a difference is a :class:`ClassListError` naming both lists.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from distdet.classes import CLASS_NAMES

log = logging.getLogger(__name__)

#: Names a class may not take: the confusion matrix's extra row and column.
RESERVED_NAMES = ("background", "missed")


class ClassListError(ValueError):
    """A class list that is malformed, or that differs from the one it must match."""


class ClassListMismatch(ClassListError):
    """The data's class list differs from the run's (the message names both lists)."""


@dataclass(frozen=True)
class ClassList:
    """Resolved class names (label ``i + 1`` is ``names[i]``) and, in words, where they came from."""

    names: tuple[str, ...]
    source: str


def parse_class_names(value: str | Sequence[str], where: str = "--class-names") -> tuple[str, ...]:
    """``"a,b,c"`` (or a list of names) as a tuple; ClassListError naming ``where`` if malformed.

    Names are stripped; each must be non-empty, free of commas, distinct and not one of
    :data:`RESERVED_NAMES`.
    """
    if isinstance(value, str):
        items: list[object] = value.split(",")
    elif isinstance(value, Sequence):
        items = list(value)
        if any(isinstance(item, str) and "," in item for item in items):
            raise ClassListError(f"{where}: class names may not contain commas, got {list(value)!r}")
    else:
        raise ClassListError(f"{where}: expected comma-separated class names or a list, got {value!r}")
    if not all(isinstance(item, str) for item in items):
        raise ClassListError(f"{where}: class names must be strings, got {items!r}")
    names = tuple(str(item).strip() for item in items)
    if not names or not all(names):
        raise ClassListError(f"{where}: expected distinct comma-separated class names, got an empty name in {value!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ClassListError(f"{where}: expected distinct comma-separated class names, got {', '.join(repeated)} "
                             "more than once")
    reserved = [n for n in names if n.lower() in RESERVED_NAMES]
    if reserved:
        raise ClassListError(f"{where}: {', '.join(reserved)} cannot be a class name (reserved: "
                             f"{', '.join(RESERVED_NAMES)}; label 0 is background)")
    return names


def format_names(names: Sequence[str]) -> str:
    """``[a, b, c]``: a class list as it appears in messages."""
    return "[" + ", ".join(names) + "]"


def check_same_classes(expected: Sequence[str], expected_what: str, actual: Sequence[str], actual_what: str) -> None:
    """Raise ClassListMismatch naming both lists unless they are equal (same names, same order)."""
    if tuple(expected) != tuple(actual):
        raise ClassListMismatch(
            f"class list mismatch: {expected_what} has {format_names(expected)} but {actual_what} has "
            f"{format_names(actual)}; labels 1..K would mean different classes (pass --class-names "
            f"{','.join(expected)} to use the first list)")


def resolve_class_list(*, explicit: Sequence[str] | None = None, declared: Sequence[str] | None = None,
                       declared_source: str = "the dataset", found: Collection[str] = (),
                       run: Sequence[str] | None = None, run_what: str = "the run") -> ClassList:
    """Apply the precedence of the module docstring.

    ``explicit``: names given by the user; ``declared``: names the dataset declares (described
    by ``declared_source``); ``found``: names seen in VOC annotations (used only when neither
    of the others is given); ``run``: the list of the run being resumed or evaluated
    (``run_what`` says which), which the result must equal - a VOC folder without a
    declaration only needs its names to be among the run's, and then takes the run's list.
    """
    if explicit is not None:
        resolved = ClassList(tuple(explicit), "--class-names")
    elif declared is not None:
        resolved = ClassList(parse_class_names(tuple(declared), declared_source), declared_source)
    elif run is not None:
        unknown = sorted(set(found) - set(run))
        if unknown:
            raise ClassListMismatch(
                f"class list mismatch: {run_what} has {format_names(run)} but the VOC annotations also name "
                f"{format_names(unknown)}")
        return ClassList(tuple(run), run_what)
    elif set(found) <= set(CLASS_NAMES):
        resolved = ClassList(CLASS_NAMES, "the face-mask class table")
    else:
        resolved = ClassList(parse_class_names(sorted(found), "the VOC annotations"), "the VOC annotations (names sorted)")
        log.info("class list from the VOC annotations, sorted: %s (labels 1..%d); pass --class-names %s "
                 "to choose another order", ", ".join(resolved.names), len(resolved.names), ",".join(resolved.names))
    if run is not None:
        check_same_classes(run, run_what, resolved.names, resolved.source)
    return resolved
