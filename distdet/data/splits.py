"""Train/val/test splits of indexed records, and their JSON manifests.

A split is a set of lists of file stems. ``tutorial`` reproduces the original tutorial (stems
sorted lexicographically, the last 170 are the test set); ``stratified`` is a seeded split by
fraction, stratified on the rarest class present in each image. The split a run used is
written as a manifest that a later run can load with :func:`load_manifest`; the manifest also
records the run's class list (``class_names``, empty in manifests written before it was).
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distdet.data.problems import DataError, ProblemKind
from distdet.data.records import ImageRecord

MANIFEST_FORMAT = "distdet-split/1"
SPLIT_NAMES: tuple[str, ...] = ("tutorial", "stratified")
#: Test-set size of the original tutorial (853 images: 683 train, 170 test).
TUTORIAL_TEST_SIZE = 170
_PARTS = ("train", "val", "test")
#: The parts a command can select (``--split-part``): a split's three, or every record.
SPLIT_PARTS: tuple[str, ...] = ("test", "train", "val", "all")


@dataclass(frozen=True)
class Split:
    """Stems per part; ``name``, ``seed`` and ``params`` record how the split was made,
    ``class_names`` the class list of the run that used it (empty when not recorded)."""

    name: str
    train: list[str]
    val: list[str]
    test: list[str]
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()

    def select(self, records: Sequence[ImageRecord]) -> dict[str, list[ImageRecord]]:
        """Records of each part (``"train"``, ``"val"``, ``"test"``), in stem order of the split."""
        return {part: select_records(records, getattr(self, part)) for part in _PARTS}


def select_records(records: Sequence[ImageRecord], stems: Sequence[str]) -> list[ImageRecord]:
    """Return the records named by ``stems`` in that order; DataError lists unknown stems."""
    by_stem = {r.stem: r for r in records}
    unknown = [s for s in stems if s not in by_stem]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        where = records[0].image_path.parent if records else Path(".")
        raise DataError.single(
            ProblemKind.MISSING_IMAGE, where, f"{len(unknown)} stem(s) of the split are not in the dataset: {shown}"
        )
    return [by_stem[s] for s in stems]


def tutorial_split(records: Sequence[ImageRecord], test_size: int = TUTORIAL_TEST_SIZE) -> Split:
    """Sort stems lexicographically; the last ``test_size`` are test, the rest train."""
    stems = sorted(r.stem for r in records)
    if not 0 < test_size < len(stems):
        raise ValueError(f"test_size must be between 1 and {len(stems) - 1} for {len(stems)} images, got {test_size}")
    cut = len(stems) - test_size
    return Split("tutorial", train=stems[:cut], val=[], test=stems[cut:], params={"test_size": test_size})


def _stratum(record: ImageRecord, frequency: Counter) -> int:
    """The rarest (globally) class present in the image; 0 for an image without objects."""
    present = {int(l) for l in record.labels}
    return min(present, key=lambda l: (frequency[l], l)) if present else 0


def _apportion(sizes: dict[int, int], total: int) -> dict[int, int]:
    """Split ``total`` across strata proportionally to ``sizes`` (largest remainder method)."""
    n = sum(sizes.values())
    exact = {k: total * v / n for k, v in sizes.items()}
    share = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (share[k] - exact[k], k))[: total - sum(share.values())]:
        share[k] += 1
    return share


def stratified_split(
    records: Sequence[ImageRecord], test_fraction: float = 0.2, seed: int = 0, val_fraction: float = 0.0
) -> Split:
    """Seeded split by fraction, stratified on each image's rarest class.

    The test (and val) set gets ``round(fraction * N)`` images, spread over the strata in
    proportion to their sizes. The same records, fractions and seed always give the same split.
    """
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    n = len(records)
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    if n_test < 1 or n_test + n_val >= n:
        raise ValueError(f"fractions test={test_fraction}, val={val_fraction} leave no test or no train images out of {n}")
    frequency = Counter(int(l) for r in records for l in r.labels)
    strata: dict[int, list[str]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.stem):
        strata[_stratum(r, frequency)].append(r.stem)
    sizes = {k: len(v) for k, v in strata.items()}
    test_share = _apportion(sizes, n_test)
    val_share = _apportion({k: sizes[k] - test_share[k] for k in sizes}, n_val) if n_val else dict.fromkeys(sizes, 0)
    rng = random.Random(seed)
    parts: dict[str, list[str]] = {p: [] for p in _PARTS}
    for key in sorted(strata):
        stems = strata[key][:]
        rng.shuffle(stems)
        t, v = test_share[key], val_share[key]
        parts["test"] += stems[:t]
        parts["val"] += stems[t : t + v]
        parts["train"] += stems[t + v :]
    return Split(
        "stratified", *(sorted(parts[p]) for p in _PARTS), seed=seed,
        params={"test_fraction": test_fraction, "val_fraction": val_fraction},
    )


def make_split(records: Sequence[ImageRecord], name: str = "tutorial", **kwargs: Any) -> Split:
    """Dispatch by name: ``"tutorial"`` (``test_size``) or ``"stratified"`` (``test_fraction``, ``seed``, ``val_fraction``)."""
    if name == "tutorial":
        return tutorial_split(records, **kwargs)
    if name == "stratified":
        return stratified_split(records, **kwargs)
    raise ValueError(f"unknown split {name!r}; choose one of: {', '.join(SPLIT_NAMES)}")


def choose_split(records: Sequence[ImageRecord], scheme: str = "tutorial", *, manifest: str | os.PathLike[str] | None = None,
                 test_fraction: float = 0.2, seed: int = 0, val_fraction: float = 0.0) -> Split:
    """The split a command uses: ``manifest``'s if given, else one made by ``scheme``.

    ``test_fraction`` and ``seed`` apply to the stratified scheme. With ``val_fraction > 0`` and
    no validation part yet, that fraction of the training stems is carved out as ``val``
    (stratified, seeded with ``seed``), and the split's params record it.
    """
    if manifest is not None:
        split = load_manifest(manifest)
    elif scheme == "stratified":
        split = make_split(records, "stratified", test_fraction=test_fraction, seed=seed)
    else:
        split = make_split(records, scheme)
    if val_fraction > 0 and not split.val:
        by_stem = {r.stem: r for r in records}
        carved = stratified_split([by_stem[s] for s in split.train if s in by_stem],
                                  test_fraction=val_fraction, seed=seed)
        split = replace(split, train=carved.train, val=carved.test,
                        params={**split.params, "val_fraction": val_fraction, "val_seed": seed})
    return split


def select_part(records: Sequence[ImageRecord], part: str, scheme: str = "tutorial",
                manifest: str | os.PathLike[str] | None = None) -> list[ImageRecord]:
    """The records of ``part`` (one of :data:`SPLIT_PARTS`; ``"all"`` = every record, in index
    order) of :func:`choose_split`'s split; ValueError when that part is empty."""
    if part == "all":
        return list(records)
    if part not in _PARTS:
        raise ValueError(f"unknown split part {part!r}; choose one of: {', '.join(SPLIT_PARTS)}")
    selected = choose_split(records, scheme, manifest=manifest).select(records)[part]
    if not selected:
        origin = f"manifest {manifest}" if manifest is not None else f"the {scheme} split"
        raise ValueError(f"the {part!r} part of {origin} is empty; choose another --split-part")
    return selected


def save_manifest(path: str | os.PathLike[str], split: Split) -> Path:
    """Write ``split`` as JSON (format, name, seed, params, class names, train/val/test stem lists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": MANIFEST_FORMAT, "name": split.name, "seed": split.seed, "params": split.params,
               "class_names": list(split.class_names), **{p: list(getattr(split, p)) for p in _PARTS}}
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return path


def load_manifest(path: str | os.PathLike[str]) -> Split:
    """Read a manifest written by :func:`save_manifest`; DataError naming the file if it is invalid."""
    path = Path(path)

    def bad(message: str) -> DataError:
        return DataError.single(ProblemKind.BAD_VALUE, path, f"invalid split manifest: {message}")

    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError.single(ProblemKind.NOT_A_FILE, path, f"cannot read split manifest: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != MANIFEST_FORMAT:
        raise bad(f"expected a JSON object with format {MANIFEST_FORMAT!r}")
    parts: dict[str, list[str]] = {}
    for p in _PARTS:
        stems = payload.get(p, [])
        if not isinstance(stems, list) or not all(isinstance(s, str) for s in stems):
            raise bad(f"{p!r} must be a list of file stems")
        parts[p] = stems
    seen: Counter = Counter(s for p in _PARTS for s in parts[p])
    repeated = sorted(s for s, c in seen.items() if c > 1)
    if repeated:
        raise bad(f"stems listed more than once: {', '.join(repeated[:10])}")
    if not parts["train"] and not parts["test"]:
        raise bad("train and test are both empty")
    seed = payload.get("seed")
    params = payload.get("params") or {}
    if not (seed is None or isinstance(seed, int)) or not isinstance(params, dict):
        raise bad("'seed' must be an integer or null and 'params' an object")
    class_names = payload.get("class_names", [])
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
        raise bad("'class_names' must be a list of class names")
    return Split(str(payload.get("name", "manifest")), parts["train"], parts["val"], parts["test"], seed=seed,
                 params=params, class_names=tuple(class_names))
