"""``distdet check-data``: report contents and exit status."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.data import FACEMASK, copy_sample, edit_xml, image_path, needs_facemask, needs_originals, xml_path
from distdet.commands import check_data

REPO = Path(__file__).resolve().parents[1]


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="distdet")
    check_data.register(parser.add_subparsers())
    args = parser.parse_args(["check-data", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


@needs_facemask
def test_real_dataset_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out = run_in_process([str(FACEMASK), "--json", str(tmp_path / "report.json")], capsys)
    assert code == 0
    lines = out.splitlines()
    assert "Images: 853" in lines and "Objects: 4072" in lines
    assert [l.split() for l in lines if l.strip().split(" ")[0] in ("with_mask", "without_mask", "mask_weared_incorrect")] == [
        ["with_mask", "3232"], ["without_mask", "717"], ["mask_weared_incorrect", "123"]]
    assert "Image sizes: 136 distinct; most common: 301x400 (184)" in out
    assert "Clamped boxes: 12 in 11 images" in lines and "maksssksksss603 (2)" in out
    assert "Problems: 0 (none)" in lines and lines[-1] == "Result: OK"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["images"] == 853 and report["clamped_boxes"] == 12
    assert report["objects_per_class"] == {"with_mask": 3232, "without_mask": 717, "mask_weared_incorrect": 123}
    assert report["problems"] == {}


@needs_originals
def test_errors_are_grouped_by_kind_and_fail(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = copy_sample(tmp_path / "data")
    bad_class = edit_xml(data, "maksssksksss10", "<name>with_mask</name>", "<name>hat</name>")
    truncated = image_path(data, "maksssksksss5")
    truncated.write_bytes(truncated.read_bytes()[:5000])
    face_mask = ["--class-names", "with_mask,without_mask,mask_weared_incorrect"]
    code, out = run_in_process([str(data), *face_mask, "--json", str(tmp_path / "r.json")], capsys)
    assert code == 1
    assert "Images: 1" in out and "Result: ERRORS" in out
    assert "  unknown_class: 1" in out and f"    {bad_class}: object 0 (hat): unknown class name 'hat'" in out
    assert "  truncated_image: 1" in out and f"    {truncated}: truncated image data" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["ok"] and [p["path"] for p in report["problems"]["truncated_image"]] == [str(truncated)]
    # --quick reads headers only and misses the truncation, but still fails on the class
    code, out = run_in_process([str(data), *face_mask, "--quick"], capsys)
    assert code == 1 and "truncated_image" not in out and "unknown_class" in out
    # lenient: the bad files would be skipped, one usable image remains
    code, out = run_in_process([str(data), *face_mask, "--lenient"], capsys)
    assert code == 0 and "Result: OK in lenient mode (2 file(s) would be skipped)" in out
    # a class list that knows "hat" accepts that file
    code, out = run_in_process([str(data), "--class-names", "with_mask,without_mask,mask_weared_incorrect,hat", "--quick"], capsys)
    assert code == 0 and "hat" in out
    # without a class list the VOC names are taken, sorted, since "hat" is not a face-mask class
    code, out = run_in_process([str(data), "--quick"], capsys)
    assert code == 0 and "Classes: hat, with_mask, without_mask (from the VOC annotations (names sorted))" in out


@needs_originals
def test_nothing_usable_fails_even_when_lenient(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = copy_sample(tmp_path / "data", stems=("maksssksksss10",))
    xml_path(data, "maksssksksss10").write_text("<annotation>")
    code, out = run_in_process([str(data), "--lenient"], capsys)
    assert code == 1 and "malformed_xml" in out and "no usable image/annotation pairs" in out
    code, out = run_in_process([str(tmp_path / "absent")], capsys)
    assert code == 1 and "dataset folder does not exist" in out


def test_help_explains_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        run_in_process(["--help"], capsys)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("DIR", "--lenient", "--class-names", "--allow-empty", "--quick", "--json"))


def test_class_names_flag_is_validated(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        run_in_process(["somewhere", "--class-names", "a,,b"], capsys)
    assert "distinct comma-separated class names" in capsys.readouterr().err


@needs_originals
def test_console_command_exit_codes(tmp_path: Path) -> None:
    data = copy_sample(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "distdet", "check-data", str(data)],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "Images: 3" in ok.stdout and "Clamped boxes: 1 in 1 images" in ok.stdout
    edit_xml(data, "maksssksksss0", "<width>512</width>", "<width>500</width>")
    bad = subprocess.run([sys.executable, "-m", "distdet", "check-data", str(data)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "size_mismatch" in bad.stdout and str(xml_path(data, "maksssksksss0")) in bad.stdout
