"""Where a run's class list comes from, how it is checked, and the colours it is drawn in."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from support.data import edit_xml
from support.trainer import make_tiny_dataset

from distdet.classes import CLASS_COLOURS, CLASS_NAMES, PALETTE, class_colours
from distdet.data import open_index
from distdet.data.class_list import ClassListError, parse_class_names, resolve_class_list
from distdet.data.synthetic import make_synthetic_dataset
from distdet.training.config import parse_config, read_config_file

FIVE = ("cat", "dog", "bird", "fish", "frog")


@pytest.mark.parametrize("text, expected", [
    ("a,,b", "expected distinct comma-separated class names, got an empty name"),
    ("a,b,a", "got a more than once"),
    ("a,background", "background cannot be a class name"),
])
def test_malformed_lists_are_refused_naming_the_flag(text: str, expected: str) -> None:
    with pytest.raises(ClassListError, match=expected) as info:
        parse_class_names(text)
    assert str(info.value).startswith("--class-names: ")


def test_precedence_explicit_then_declared_then_found(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_class_list(explicit=("b", "a"), declared=("x",), found={"a"}).names == ("b", "a")
    assert resolve_class_list(declared=("x", "y"), found={"y"}).names == ("x", "y")
    assert resolve_class_list(found={"with_mask", "mask_weared_incorrect"}).names == CLASS_NAMES
    with caplog.at_level(logging.INFO):
        found = resolve_class_list(found={"zebra", "ant"})
    assert found.names == ("ant", "zebra") and "sorted" in found.source
    assert any("--class-names ant,zebra" in r.getMessage() for r in caplog.records)
    # a VOC folder without declaration takes the run's list when its names are among it
    assert resolve_class_list(found={"ant"}, run=("zebra", "ant")).names == ("zebra", "ant")
    with pytest.raises(ClassListError, match=r"the run has \[zebra\] but the VOC annotations also name \[ant\]"):
        resolve_class_list(found={"ant"}, run=("zebra",))


def test_voc_names_are_discovered_sorted_and_a_given_list_is_kept(tmp_path: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "d", num_images=3, image_size=(64, 48), face_size=(16, 30),
                                  max_objects_per_image=1, class_names=("zebra", "ant", "moth"))
    (data / "synthetic.json").unlink()  # a plain VOC folder: nothing declares the list
    index = open_index(data)
    assert set(index.class_names) <= {"ant", "moth", "zebra"} and "sorted" in index.class_source
    assert list(index.class_names) == sorted(index.class_names)
    given = open_index(data, ("zebra", "ant", "moth"))
    assert given.class_names == ("zebra", "ant", "moth") and given.class_source == "--class-names"
    name_of = {r.stem: [index.class_names[l - 1] for l in r.labels] for r in index.records}
    assert {r.stem: [given.class_names[l - 1] for l in r.labels] for r in given.records} == name_of


def test_synthetic_marker_declares_its_list(tmp_path: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "d", num_images=6, image_size=(64, 48), face_size=(16, 30),
                                  class_names=FIVE)
    index = open_index(data)
    assert index.class_names == FIVE and "synthetic.json" in index.class_source
    assert open_index(make_tiny_dataset(tmp_path)).class_names == CLASS_NAMES


def test_unknown_voc_name_under_a_run_list_names_both_lists(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path)
    edit_xml(data, "synth_0000", "<name>", "<name>x", 1)
    (data / "synthetic.json").rename(tmp_path / "marker.json")
    try:
        with pytest.raises(ClassListError) as info:
            open_index(data, run_class_names=CLASS_NAMES, run_what="the model card")
    finally:
        (tmp_path / "marker.json").rename(data / "synthetic.json")
    assert "the model card has [with_mask, without_mask, mask_weared_incorrect]" in str(info.value)


def test_config_file_classes_key_and_flag(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("classes: [cat, dog]\n")
    assert read_config_file(yaml_file) == {"class_names": "cat,dog"}
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('class-names = "cat,dog,bird"\n')
    assert parse_config(["--config", str(toml_file)]).class_names == "cat,dog,bird"
    yaml_file.write_text("classes: [cat, cat]\n")
    with pytest.raises(ValueError, match="option 'classes'.*cat more than once"):
        read_config_file(yaml_file)


def test_bad_class_names_flag_exits_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--class-names", "a,,b"])
    assert info.value.code == 2 and "--class-names" in capsys.readouterr().err


def test_colours_face_mask_table_kept_others_distinct_and_stable() -> None:
    assert class_colours(CLASS_NAMES) == CLASS_COLOURS
    assert class_colours(("without_mask",)) == {"without_mask": CLASS_COLOURS["without_mask"]}
    many = tuple(f"class{i}" for i in range(40))
    colours = class_colours(many)
    assert [colours[n] for n in many[: len(PALETTE)]] == list(PALETTE)
    assert len(set(colours.values())) == 40
    assert class_colours(many) == colours  # the same list always gets the same colours
    assert class_colours(FIVE)["cat"] == PALETTE[0] and class_colours(FIVE)["frog"] == PALETTE[4]
