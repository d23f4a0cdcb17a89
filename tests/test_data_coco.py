"""COCO instances JSON datasets: the reader's checks on real files, crowd regions, original ids."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distdet.data import DetectionDataset, open_index
from distdet.data.class_list import ClassListError
from distdet.data.coco import MAX_JSON_BYTES, build_coco_index
from distdet.data.problems import DataError, ProblemKind
from distdet.eval import compute_metrics, write_evaluation_outputs

W, H = 64, 48


def _image(path: Path, size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)


def coco_folder(root: Path, n: int = 3, categories=None) -> Path:
    """``n`` images with one box each, categories with non-contiguous ids 7 ("b") and 3 ("a")."""
    for i in range(n):
        _image(root / "images" / f"im{i}.png")
    content = {
        "images": [{"id": 100 + i, "file_name": f"im{i}.png", "width": W, "height": H} for i in range(n)],
        "annotations": [{"id": 1 + i, "image_id": 100 + i, "category_id": (7, 3)[i % 2], "bbox": [4, 6, 20, 16]}
                        for i in range(n)],
        "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}] if categories is None else categories,
    }
    write(root, content)
    return root


def write(root: Path, content) -> Path:
    path = root / "annotations.json"
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return path


def edit(root: Path, change) -> Path:
    content = json.loads((root / "annotations.json").read_text())
    change(content)
    return write(root, content)


def problems_of(root: Path, **kwargs) -> tuple[str, list]:
    with pytest.raises(DataError) as info:
        build_coco_index(root, **kwargs)
    return str(info.value), info.value.problems


def test_non_contiguous_category_ids_map_to_labels_in_id_order(tmp_path: Path) -> None:
    index = build_coco_index(coco_folder(tmp_path))
    assert index.format == "coco" and index.class_names == ("a", "b")  # id 3 -> label 1, id 7 -> label 2
    assert index.category_ids == (3, 7)
    assert [r.stem for r in index.records] == ["im0", "im1", "im2"]
    assert [r.source_id for r in index.records] == [100, 101, 102]
    assert [r.labels.tolist() for r in index.records] == [[2], [1], [2]]
    assert index.records[0].boxes.tolist() == [[4.0, 6.0, 24.0, 22.0]]  # x, y, w, h -> x1, y1, x2, y2


def test_explicit_class_list_maps_categories_by_name(tmp_path: Path) -> None:
    index = build_coco_index(coco_folder(tmp_path), class_names=("b", "a", "c"))
    assert index.class_names == ("b", "a", "c") and index.category_ids == (7, 3, -1)
    assert [r.labels.tolist() for r in index.records] == [[1], [2], [1]]
    text, problems = problems_of(tmp_path, class_names=("a", "c"))
    assert problems[0].kind is ProblemKind.UNKNOWN_CLASS and "'b' (id 7)" in text and "annotations.json" in text


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object with 'images', 'annotations' and 'categories', got a list"),
    ('{"images": {}, "annotations": [], "categories": []}', "'images' must be a list, got a object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"images": [' + "7" * 5000 + '], "annotations": [], "categories": []}', "not valid JSON"),
    ('{"images": [' + "[" * 50_000 + "]" * 50_000 + '], "annotations": [], "categories": []}', "nested too deeply"),
])
def test_hostile_structure_is_one_clear_error_naming_the_file(tmp_path: Path, content: str, expected: str) -> None:
    coco_folder(tmp_path)
    path = write(tmp_path, content)
    text, problems = problems_of(tmp_path)
    assert expected in text and str(path) in text
    assert problems[0].kind is ProblemKind.MALFORMED_JSON


def test_a_100_mb_file_is_refused_from_its_size_before_reading(tmp_path: Path) -> None:
    coco_folder(tmp_path)
    path = tmp_path / "annotations.json"
    chunk = b"0," * (1 << 19)
    with open(path, "wb") as f:  # a real 100 MB JSON document (a list of zeros)
        f.write(b"[")
        for _ in range(100):
            f.write(chunk)
        f.write(b"0]")
    assert path.stat().st_size > 100_000_000 > MAX_JSON_BYTES
    text, problems = problems_of(tmp_path)
    assert problems[0].kind is ProblemKind.OVERSIZED_FILE and str(path) in text and str(MAX_JSON_BYTES) in text


#: (edit, problem kind, text of the message, images left in lenient mode out of 3)
@pytest.mark.parametrize("change, kind, expected, kept", [
    (lambda c: c["images"][1].update(width="64"), ProblemKind.BAD_VALUE,
     "images[1] (id 101): 'width' must be a positive integer, got '64'", 2),
    (lambda c: c["images"][0].pop("file_name"), ProblemKind.BAD_VALUE, "images[0] (id 100): missing 'file_name'", 2),
    (lambda c: c["images"][2].update(file_name="../../etc/passwd.png"), ProblemKind.BAD_VALUE,
     "must be a relative path inside the image folder", 2),
    (lambda c: c["annotations"][1].update(bbox=[float("nan"), 1, 2, 3]), ProblemKind.BAD_VALUE,
     "annotations[1] (id 2) of images[1] (id 101): bbox must be 4 finite numbers", 2),
    (lambda c: c["annotations"][0].update(bbox=[1, 2, "3", 4]), ProblemKind.BAD_VALUE,
     "annotations[0] (id 1) of images[0] (id 100): bbox must be 4 finite numbers", 2),
    (lambda c: c["annotations"][0].update(bbox=[1, 2, 0, 4]), ProblemKind.DEGENERATE_BOX, "needs w > 0 and h > 0", 2),
    (lambda c: c["annotations"][2].update(bbox=[70, 2, 5, 5]), ProblemKind.BOX_OUTSIDE_IMAGE,
     "lies outside the 64x48 image", 2),
    (lambda c: c["annotations"][0].update(category_id=5), ProblemKind.UNKNOWN_CLASS,
     "annotations[0] (id 1) of images[0] (id 100): category_id 5 is not in 'categories'", 2),
    (lambda c: c["annotations"][0].update(image_id=999), ProblemKind.BAD_VALUE,
     "annotations[0] (id 1): image_id 999 is not an entry of 'images'", 2),
    (lambda c: c["annotations"][0].update(iscrowd=2), ProblemKind.BAD_VALUE, "iscrowd must be 0 or 1, got 2", 2),
    (lambda c: c["annotations"].append("box"), ProblemKind.BAD_VALUE, "annotations[3]: expected an object, got a string", 3),
    (lambda c: c["images"][2].update(id=100), ProblemKind.DUPLICATE_ID,
     "images[0] (id 100), images[2] (id 100) share the id 100", 1),
    (lambda c: c["annotations"][2].update(id=1), ProblemKind.DUPLICATE_ID,
     "annotations[2] (id 1) of images[2] (id 102): duplicate annotation id 1 (also annotations[0])", 2),
    (lambda c: c["images"][1].update(file_name="im0.png"), ProblemKind.DUPLICATE_ID, "share the file_name 'im0.png'", 1),
    (lambda c: c["images"][1].update(file_name="im1.jpg"), ProblemKind.MISSING_IMAGE,
     "images[1] (id 101): no PNG/JPEG image 'im1.jpg'", 2),
    (lambda c: c["images"][1].update(width=65), ProblemKind.SIZE_MISMATCH,
     "images[1] (id 101) says 65x48 but im1.png is 64x48", 2),
])
def test_bad_entries_are_named_and_lenient_mode_skips_their_image(tmp_path: Path, change, kind: ProblemKind,
                                                                   expected: str, kept: int) -> None:
    path = edit(coco_folder(tmp_path), change)
    text, problems = problems_of(tmp_path)
    assert any(p.kind is kind for p in problems), problems
    assert expected in text and str(path) in text, text
    lenient = build_coco_index(tmp_path, lenient=True)
    assert lenient.problems and len(lenient.records) == kept  # the images concerned are skipped, and counted


def test_strict_mode_lists_every_problem(tmp_path: Path) -> None:
    def change(c):
        c["images"][0]["height"] = -1
        c["annotations"][1]["bbox"] = [1, 2, 3]
        c["annotations"][2]["category_id"] = 1

    edit(coco_folder(tmp_path, n=4), change)
    text, problems = problems_of(tmp_path)
    assert len(problems) == 3 and "3 problem(s)" in text
    assert {p.kind for p in problems} == {ProblemKind.BAD_VALUE, ProblemKind.UNKNOWN_CLASS}


@pytest.mark.parametrize("categories, expected", [
    ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "categories[1]: duplicate category id 1"),
    ([{"id": 1, "name": "a"}, {"id": 2, "name": "a"}], "categories[1]: duplicate category name 'a' (ids 1 and 2)"),
    ([{"id": "1", "name": "a"}], "categories[0]: 'id' must be an integer, got '1'"),
    ([{"id": True, "name": "a"}], "categories[0]: 'id' must be an integer, got True"),
    ([], "'categories' is empty"),
    ([{"id": 1, "name": "a,b"}], "class names may not contain commas"),
    ([{"id": 0, "name": "background"}, {"id": 1, "name": "a"}], "background cannot be a class name"),
])
def test_bad_categories_are_fatal_even_when_lenient(tmp_path: Path, categories, expected: str) -> None:
    coco_folder(tmp_path, categories=categories)
    with pytest.raises(DataError, match=None) as info:
        build_coco_index(tmp_path, lenient=True)
    assert expected in str(info.value) and "annotations.json" in str(info.value)


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (the pixel data is one tiny row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    coco_folder(tmp_path)
    _png_claiming(tmp_path / "images" / "im1.png", 40_000, 40_000)
    edit(tmp_path, lambda c: c["images"][1].update(width=40_000, height=40_000))
    text, problems = problems_of(tmp_path)
    assert problems[0].kind is ProblemKind.IMAGE_TOO_LARGE and "im1.png" in text and "1600000000 pixels" in text


def test_unlisted_image_files_are_a_warning_not_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    coco_folder(tmp_path)
    _image(tmp_path / "images" / "stray.jpg")
    with caplog.at_level(logging.WARNING):
        index = build_coco_index(tmp_path)
    assert len(index.records) == 3 and index.unlisted == [tmp_path / "images" / "stray.jpg"]
    assert any("not listed" in r.getMessage() and "stray.jpg" in r.getMessage() for r in caplog.records)


def test_layout_detection_and_annotations_flag(tmp_path: Path) -> None:
    coco_folder(tmp_path / "a")
    (tmp_path / "a" / "annotations.json").rename(tmp_path / "a" / "instances_train.json")
    assert open_index(tmp_path / "a").format == "coco"
    (tmp_path / "a" / "instances_val.json").write_text("{}")
    with pytest.raises(DataError, match="several COCO files: instances_train.json, instances_val.json"):
        open_index(tmp_path / "a")
    chosen = open_index(tmp_path / "a", annotations=tmp_path / "a" / "instances_train.json")
    assert chosen.annotation_file == tmp_path / "a" / "instances_train.json" and len(chosen.records) == 3


def test_run_class_list_must_match(tmp_path: Path) -> None:
    coco_folder(tmp_path)
    with pytest.raises(ClassListError) as info:
        open_index(tmp_path, run_class_names=("b", "a"), run_what="the resumed run")
    assert "the resumed run has [b, a]" in str(info.value) and "has [a, b]" in str(info.value)


def _crowd_folder(root: Path) -> Path:
    """Image 0: a person and a crowd region; image 1: one person."""
    coco_folder(root, n=2, categories=[{"id": 5, "name": "person"}])

    def change(c):  # with "area", which pycocotools needs in the user's file (distdet does not)
        c["annotations"] = [
            {"id": 1, "image_id": 100, "category_id": 5, "bbox": [2, 2, 16, 16], "iscrowd": 0, "area": 256},
            {"id": 2, "image_id": 100, "category_id": 5, "bbox": [30, 10, 30, 30], "iscrowd": 1, "area": 900},
            {"id": 3, "image_id": 101, "category_id": 5, "bbox": [10, 10, 20, 20], "iscrowd": 0, "area": 400},
        ]
    edit(root, change)
    return root


def test_crowd_regions_are_not_trained_on(tmp_path: Path) -> None:
    index = build_coco_index(_crowd_folder(tmp_path))
    record = index.records[0]
    assert record.crowd.tolist() == [False, True]
    _, target = DetectionDataset(index.records)[0]
    assert target["boxes"].tolist() == [[2.0, 2.0, 18.0, 18.0]] and target["labels"].tolist() == [1]


def test_crowd_and_original_ids_are_scored_as_pycocotools_scores_the_users_file(tmp_path: Path) -> None:
    """predictions.json carries the original ids, so pycocotools on the user's own file gives our numbers."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    index = build_coco_index(_crowd_folder(tmp_path))
    predictions = [  # image 0: the person, a detection inside the crowd region, a false positive
        {"boxes": np.array([[2, 2, 18, 18], [32, 12, 58, 38], [40, 0, 60, 8]], dtype=np.float32),
         "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([1, 1, 1])},
        {"boxes": np.array([[11, 10, 30, 31]], dtype=np.float32), "scores": np.array([0.6]), "labels": np.array([1])},
    ]
    metrics = compute_metrics(index.records, predictions, index.class_names)
    out = tmp_path / "eval"
    write_evaluation_outputs(out, index.records, predictions, metrics, num_rendered=0,
                             category_ids=index.category_ids)
    results = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in results} == {100, 101} and {r["category_id"] for r in results} == {5}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "annotations.json"))
        evaluator = COCOeval(gt, gt.loadRes(str(out / "predictions.json")), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert metrics["coco/AP"] == pytest.approx(evaluator.stats[0], abs=1e-12)
    assert metrics["coco/AP50"] == pytest.approx(evaluator.stats[1], abs=1e-12)
    assert metrics["counts"]["crowd"] == {"person": 1} and metrics["counts"]["ground_truth"] == {"person": 2}
    # the crowd detection is ignored (not a false positive) by the VOC matching too: 2 TP, 1 FP
    assert metrics["confusion_matrix"]["counts"] == [[2, 0], [1, 0]]


def test_check_data_reports_coco_as_it_reports_voc(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from distdet.cli import main

    coco_folder(tmp_path / "d")
    _image(tmp_path / "d" / "images" / "stray.png")
    edit(tmp_path / "d", lambda c: c["annotations"][1].update(bbox=[1, 2, 0, 4]))
    assert main(["check-data", str(tmp_path / "d"), "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert f"Format: COCO ({tmp_path / 'd' / 'annotations.json'})" in out and "Classes: a, b (from the categories" in out
    assert "Images: 2" in out and "  degenerate_box: 1" in out and "annotations[1] (id 2) of images[1] (id 101)" in out
    assert "Unlisted images (in the image folder, not in the COCO file; not used): 1" in out and "Result: ERRORS" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["format"] == "coco" and report["class_names"] == ["a", "b"] and not report["ok"]
    assert report["objects_per_class"] == {"a": 0, "b": 2} and len(report["unlisted_images"]) == 1
    assert main(["check-data", str(tmp_path / "d"), "--lenient"]) == 0
    assert "Result: OK in lenient mode (the images of 1 problem(s) would be skipped)" in capsys.readouterr().out
