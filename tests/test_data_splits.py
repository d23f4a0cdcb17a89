"""Tutorial and stratified splits, and split manifests, on the real data."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support.data import FACEMASK, needs_facemask
from distdet.data import DataError, build_index, load_manifest, make_split, save_manifest, select_records
from distdet.data.splits import Split, stratified_split, tutorial_split

pytestmark = needs_facemask


@pytest.fixture(scope="module")
def records():
    return build_index(FACEMASK).records


def test_tutorial_split_is_the_last_170_sorted_names(records) -> None:
    split = make_split(records, "tutorial")
    names = sorted(f[: -len(".xml")] for f in os.listdir(FACEMASK / "annotations"))
    assert (len(split.train), len(split.val), len(split.test)) == (683, 0, 170)
    assert split.test == names[-170:] and split.train == names[:-170]
    assert split.test[0] == "maksssksksss713" and split.test[-1] == "maksssksksss99"


def images_with(records, label: int) -> set[str]:
    return {r.stem for r in records if label in r.labels}


def test_stratified_split_is_seeded_and_stratified(records) -> None:
    split = stratified_split(records, test_fraction=0.2, seed=7, val_fraction=0.1)
    assert split == stratified_split(records, test_fraction=0.2, seed=7, val_fraction=0.1)
    assert split.test != stratified_split(records, test_fraction=0.2, seed=8, val_fraction=0.1).test
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(map(len, parts)) == 853 and set.union(*parts) == {r.stem for r in records}
    assert (len(split.test), len(split.val)) == (round(0.2 * 853), round(0.1 * 853))
    # every class keeps (within one image of rounding per stratum) its share in each part
    for label in (1, 2, 3):
        having = images_with(records, label)
        for part, fraction in ((split.test, 0.2), (split.val, 0.1)):
            assert abs(len(having & set(part)) / len(having) - fraction) < 0.04, (label, fraction)
    rarest = images_with(records, 3)
    assert abs(len(rarest & set(split.test)) - 0.2 * len(rarest)) <= 1


def test_manifest_round_trip(records, tmp_path: Path) -> None:
    split = make_split(records, "stratified", test_fraction=0.25, seed=3)
    path = save_manifest(tmp_path / "run" / "split.json", split)
    payload = json.loads(path.read_text())
    assert payload["name"] == "stratified" and payload["seed"] == 3 and payload["test"] == split.test
    loaded = load_manifest(path)
    assert loaded == split
    parts = loaded.select(records)
    assert [r.stem for r in parts["test"]] == split.test
    assert len(parts["train"]) + len(parts["test"]) == 853 and parts["val"] == []
    tutorial = make_split(records, "tutorial")
    assert load_manifest(save_manifest(tmp_path / "t.json", tutorial)) == tutorial


def test_manifest_errors_name_the_file(records, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    for content in ("{not json", json.dumps({"format": "other"}),
                    json.dumps({"format": "distdet-split/1", "train": "a", "test": []}),
                    json.dumps({"format": "distdet-split/1", "train": ["a"], "test": ["a"]})):
        bad.write_text(content)
        with pytest.raises(DataError, match=str(bad)):
            load_manifest(bad)
    with pytest.raises(DataError, match="cannot read"):
        load_manifest(tmp_path / "absent.json")


def test_unknown_stems_are_named(records) -> None:
    split = Split("custom", train=["maksssksksss0", "nope1"], val=[], test=["nope2"])
    with pytest.raises(DataError, match="nope1"):
        split.select(records)
    assert [r.stem for r in select_records(records, ["maksssksksss9", "maksssksksss0"])] == ["maksssksksss9", "maksssksksss0"]


def test_bad_split_arguments(records) -> None:
    with pytest.raises(ValueError, match="unknown split 'random'"):
        make_split(records, "random")
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(records, test_fraction=1.5)
    with pytest.raises(ValueError, match="test_size"):
        tutorial_split(records[:100])
