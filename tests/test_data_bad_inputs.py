"""One test per kind of bad dataset input: each gives a DataError naming the file and the problem."""
from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.data import copy_sample, edit_xml, image_path, needs_originals, xml_path
from distdet.data import DataError, DetectionDataset, ProblemKind, build_index, load_rgb, read_image_size
from distdet.data.check import check_data

pytestmark = needs_originals


def only_problem(exc: DataError, kind: ProblemKind, path: Path) -> None:
    """Exactly one problem, of ``kind``, on ``path``, and the message names the file."""
    assert [(p.kind, p.path) for p in exc.problems] == [(kind, path)], str(exc)
    assert str(path) in str(exc)


def strict_error(root: Path, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        build_index(root, **kwargs)
    return info.value


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return copy_sample(tmp_path / "data")


def test_clean_copy_indexes(data: Path) -> None:
    index = build_index(data)
    assert [r.stem for r in index.records] == ["maksssksksss0", "maksssksksss10", "maksssksksss5"]
    assert index.problems == []


def test_malformed_xml(data: Path) -> None:
    path = xml_path(data, "maksssksksss10")
    path.write_text(path.read_text()[:200])
    exc = strict_error(data)
    only_problem(exc, ProblemKind.MALFORMED_XML, path)
    assert "not well-formed" in str(exc)


def test_wrong_root_element(data: Path) -> None:
    path = xml_path(data, "maksssksksss10")
    path.write_text("<html><body/></html>")
    only_problem(strict_error(data), ProblemKind.MALFORMED_XML, path)


def test_deeply_nested_xml_is_refused_not_a_crash(data: Path) -> None:
    path = xml_path(data, "maksssksksss10")
    path.write_text("<annotation>" + "<a>" * 100_000 + "</a>" * 100_000 + "</annotation>")
    only_problem(strict_error(data), ProblemKind.MALFORMED_XML, path)


def test_unknown_class(data: Path) -> None:
    path = edit_xml(data, "maksssksksss10", "<name>with_mask</name>", "<name>with_hat</name>")
    exc = strict_error(data)
    only_problem(exc, ProblemKind.UNKNOWN_CLASS, path)
    assert "'with_hat'" in str(exc) and "with_mask" in str(exc)


def test_other_class_list_reads_other_voc_folders(data: Path) -> None:
    edit_xml(data, "maksssksksss10", "<name>with_mask</name>", "<name>with_hat</name>")
    names = ("with_mask", "without_mask", "mask_weared_incorrect", "with_hat")
    index = build_index(data, class_names=names)
    assert index.class_counts()["with_hat"] == 1
    assert [int(l) for l in index.records[1].labels] == [4]


def test_missing_image(data: Path) -> None:
    image_path(data, "maksssksksss10").unlink()
    exc = strict_error(data)
    only_problem(exc, ProblemKind.MISSING_IMAGE, xml_path(data, "maksssksksss10"))
    assert "no image maksssksksss10" in str(exc)


def test_missing_annotation(data: Path) -> None:
    xml_path(data, "maksssksksss10").unlink()
    exc = strict_error(data)
    only_problem(exc, ProblemKind.MISSING_ANNOTATION, image_path(data, "maksssksksss10"))
    assert "no annotation maksssksksss10.xml" in str(exc)


def test_duplicate_image_stem(data: Path) -> None:
    Image.open(image_path(data, "maksssksksss10")).convert("RGB").save(data / "images" / "maksssksksss10.jpg")
    exc = strict_error(data)
    assert {p.kind for p in exc.problems} == {ProblemKind.DUPLICATE_STEM, ProblemKind.MISSING_IMAGE}
    assert "maksssksksss10" in str(exc)


def test_unreadable_image(data: Path) -> None:
    path = image_path(data, "maksssksksss10")
    path.write_bytes(b"this is not an image at all" * 10)
    exc = strict_error(data)
    only_problem(exc, ProblemKind.UNREADABLE_IMAGE, path)
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_rgb(path)


def test_corrupt_png_data(data: Path) -> None:
    path = image_path(data, "maksssksksss10")
    raw = bytearray(path.read_bytes())
    start = raw.index(b"IDAT") + 4
    raw[start + 100 : start + 4000] = bytes(3900)  # zero out the middle of the compressed stream
    path.write_bytes(bytes(raw))
    exc = strict_error(data, decode_images=True)
    assert [p.path for p in exc.problems] == [path]
    assert exc.problems[0].kind in (ProblemKind.UNREADABLE_IMAGE, ProblemKind.TRUNCATED_IMAGE)


def test_truncated_image(data: Path) -> None:
    path = image_path(data, "maksssksksss10")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    # The header is intact, so indexing (headers only) passes and the Dataset catches it ...
    index = build_index(data)
    dataset = DetectionDataset(index.records)
    with pytest.raises(DataError) as info:
        dataset[1]
    only_problem(info.value, ProblemKind.TRUNCATED_IMAGE, path)
    # ... while a full check decodes every image and reports it.
    only_problem(strict_error(data, decode_images=True), ProblemKind.TRUNCATED_IMAGE, path)
    assert [p.path for p in check_data(data).problems] == [path]


def test_xml_size_disagrees_with_image(data: Path) -> None:
    path = edit_xml(data, "maksssksksss10", "<width>301</width>", "<width>300</width>")
    exc = strict_error(data)
    only_problem(exc, ProblemKind.SIZE_MISMATCH, path)
    assert "300x400" in str(exc) and "301x400" in str(exc)


def test_image_replaced_after_indexing(data: Path) -> None:
    index = build_index(data)
    path = image_path(data, "maksssksksss10")
    Image.new("RGB", (50, 40)).save(path)
    with pytest.raises(DataError) as info:
        DetectionDataset(index.records)[1]
    only_problem(info.value, ProblemKind.SIZE_MISMATCH, path)


@pytest.mark.parametrize("xmin,xmax", [("194", "98"), ("194", "194")], ids=["swapped", "zero_width"])
def test_degenerate_box(data: Path, xmin: str, xmax: str) -> None:
    edit_xml(data, "maksssksksss10", "<xmin>98</xmin>", f"<xmin>{xmin}</xmin>")
    path = edit_xml(data, "maksssksksss10", "<xmax>194</xmax>", f"<xmax>{xmax}</xmax>")
    exc = strict_error(data)
    only_problem(exc, ProblemKind.DEGENERATE_BOX, path)
    assert f"degenerate box (xmin={xmin}, ymin=267, xmax={xmax}, ymax=383)" in str(exc)


def test_degenerate_height(data: Path) -> None:
    path = edit_xml(data, "maksssksksss10", "<ymax>383</ymax>", "<ymax>267</ymax>")
    only_problem(strict_error(data), ProblemKind.DEGENERATE_BOX, path)


def test_box_outside_image_is_clamped_and_counted(data: Path) -> None:
    edit_xml(data, "maksssksksss10", "<xmin>98</xmin>", "<xmin>-7.5</xmin>")
    edit_xml(data, "maksssksksss10", "<ymax>383</ymax>", "<ymax>1000</ymax>")
    index = build_index(data)
    record = {r.stem: r for r in index.records}["maksssksksss10"]
    np.testing.assert_array_equal(record.boxes, np.array([[0, 267, 194, 400]], dtype=np.float32))
    # maksssksksss5 has one original box ending at x=401 on a 400-wide image
    assert index.clamped == {"maksssksksss10": 1, "maksssksksss5": 1}
    assert index.num_clamped_boxes == 2 and index.problems == []


def test_box_entirely_outside_image(data: Path) -> None:
    path = edit_xml(data, "maksssksksss10", "<xmin>98</xmin>", "<xmin>400</xmin>")
    path = edit_xml(data, "maksssksksss10", "<xmax>194</xmax>", "<xmax>420</xmax>")
    exc = strict_error(data)
    only_problem(exc, ProblemKind.BOX_OUTSIDE_IMAGE, path)
    assert "outside the 301x400 image" in str(exc)


def test_empty_annotation(data: Path) -> None:
    path = xml_path(data, "maksssksksss10")
    text = path.read_text()
    path.write_text(text[: text.index("<object>")] + "</annotation>\n")
    exc = strict_error(data)
    only_problem(exc, ProblemKind.EMPTY_ANNOTATION, path)
    # Negative images are allowed on request, and the Dataset serves them with boxes (0, 4).
    index = build_index(data, allow_empty=True)
    image, target = DetectionDataset(index.records)[1]
    assert image.shape == (3, 400, 301)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE annotation [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><size><width>301</width><height>400</height></size>
<object><name>&lol9;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
</annotation>
"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<annotation><size><width>301</width><height>400</height></size>
<object><name>&secret;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
</annotation>
"""


@pytest.mark.parametrize("text", [BILLION_LAUGHS, XXE], ids=["billion_laughs", "xxe"])
def test_doctype_and_entities_are_refused(data: Path, text: str) -> None:
    path = xml_path(data, "maksssksksss10")
    path.write_text(text)
    exc = strict_error(data)
    only_problem(exc, ProblemKind.UNSAFE_XML, path)
    assert "root:" not in str(exc)  # nothing of /etc/passwd leaked into the message


def test_utf16_xml_cannot_hide_a_doctype(data: Path) -> None:
    path = xml_path(data, "maksssksksss10")
    path.write_bytes(XXE.replace('version="1.0"', 'version="1.0" encoding="UTF-16"').encode("utf-16"))
    only_problem(strict_error(data), ProblemKind.UNSAFE_XML, path)


def test_oversized_annotation_file(data: Path) -> None:
    path = xml_path(data, "maksssksksss10")
    text = path.read_text()
    path.write_text(text.replace("</annotation>", "<!--" + "x" * (1 << 20) + "--></annotation>"))
    exc = strict_error(data)
    only_problem(exc, ProblemKind.OVERSIZED_FILE, path)
    assert "limit is 1048576" in str(exc)


@pytest.mark.parametrize("value", ["98px", "nan", "inf", "", "1_0", "0x10", "\u0669\u0668"])
def test_non_numeric_coordinates(data: Path, value: str) -> None:
    path = edit_xml(data, "maksssksksss10", "<xmin>98</xmin>", f"<xmin>{value}</xmin>")
    exc = strict_error(data)
    only_problem(exc, ProblemKind.BAD_VALUE, path)
    assert "<bndbox>/<xmin>" in str(exc)


def test_decimal_coordinates_are_accepted(data: Path) -> None:
    edit_xml(data, "maksssksksss10", "<xmin>98</xmin>", "<xmin>98.25</xmin>")
    index = build_index(data)
    assert index.records[1].boxes[0, 0] == pytest.approx(98.25)


@pytest.mark.parametrize("old,new", [("<width>301</width>", "<width>wide</width>"),
                                     ("<width>301</width>", "<width>301.5</width>"),
                                     ("<height>400</height>", "")])
def test_bad_image_size_in_xml(data: Path, old: str, new: str) -> None:
    path = edit_xml(data, "maksssksksss10", old, new)
    only_problem(strict_error(data), ProblemKind.BAD_VALUE, path)


def test_bad_difficult_flag(data: Path) -> None:
    path = edit_xml(data, "maksssksksss10", "<difficult>0</difficult>", "<difficult>yes</difficult>")
    only_problem(strict_error(data), ProblemKind.BAD_VALUE, path)


def write_png_bomb(path: Path, width: int, height: int) -> None:
    """A valid 8-bit greyscale PNG of ``width`` x ``height`` black pixels (compresses ~1000:1)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb(data: Path) -> None:
    path = image_path(data, "maksssksksss10")
    write_png_bomb(path, 10_000, 6_000)  # 60 megapixels in a ~60 KB file
    assert path.stat().st_size < 1_000_000
    edit_xml(data, "maksssksksss10", "<width>301</width>", "<width>10000</width>")
    edit_xml(data, "maksssksksss10", "<height>400</height>", "<height>6000</height>")
    exc = strict_error(data)
    only_problem(exc, ProblemKind.IMAGE_TOO_LARGE, path)
    assert "60000000 pixels" in str(exc)
    for read in (read_image_size, load_rgb):
        with pytest.raises(DataError, match="limit is 50000000"):
            read(path)


def test_fifo_named_like_an_image_does_not_hang(data: Path) -> None:
    path = image_path(data, "maksssksksss10")
    path.unlink()
    os.mkfifo(path)
    only_problem(strict_error(data), ProblemKind.NOT_A_FILE, path)


def test_directory_named_like_an_annotation(data: Path) -> None:
    path = xml_path(data, "maksssksksss10")
    path.unlink()
    path.mkdir()
    only_problem(strict_error(data), ProblemKind.NOT_A_FILE, path)


def test_missing_folder_and_wrong_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset folder does not exist"):
        build_index(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "flat")) + ".*expected subfolders images/"):
        build_index(tmp_path / "flat")


def test_voc_layout_is_recognised(tmp_path: Path, data: Path) -> None:
    voc = tmp_path / "voc"
    shutil.copytree(data / "images", voc / "JPEGImages")
    shutil.copytree(data / "annotations", voc / "Annotations")
    assert len(build_index(voc).records) == 3


def test_strict_mode_lists_every_problem(data: Path) -> None:
    bad_class = edit_xml(data, "maksssksksss10", "<name>with_mask</name>", "<name>hat</name>")
    bad_size = edit_xml(data, "maksssksksss0", "<width>512</width>", "<width>500</width>")
    exc = strict_error(data)
    assert {(p.kind, p.path) for p in exc.problems} == {
        (ProblemKind.UNKNOWN_CLASS, bad_class), (ProblemKind.SIZE_MISMATCH, bad_size)}
    assert str(bad_class) in str(exc) and str(bad_size) in str(exc)
    assert "lenient" in str(exc)


def test_lenient_mode_skips_counts_and_logs(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_class = edit_xml(data, "maksssksksss10", "<name>with_mask</name>", "<name>hat</name>")
    missing = image_path(data, "maksssksksss0")
    missing.unlink()
    with caplog.at_level(logging.WARNING, logger="distdet.data.index"):
        index = build_index(data, lenient=True)
    assert [r.stem for r in index.records] == ["maksssksksss5"]
    assert {(p.kind, p.path) for p in index.problems} == {
        (ProblemKind.UNKNOWN_CLASS, bad_class), (ProblemKind.MISSING_IMAGE, xml_path(data, "maksssksksss0"))}
    assert sorted(map(str, index.skipped_files)) == sorted([str(bad_class), str(xml_path(data, "maksssksksss0"))])
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert str(bad_class) in logged and str(xml_path(data, "maksssksksss0")) in logged
    assert sum(index.class_counts().values()) == 4  # only maksssksksss5's objects


def test_lenient_mode_with_nothing_usable_still_fails(data: Path) -> None:
    for stem in ("maksssksksss0", "maksssksksss5", "maksssksksss10"):
        image_path(data, stem).unlink()
    exc = strict_error(data, lenient=True)
    assert "no usable image/annotation pairs" in str(exc)
    assert sum(p.kind is ProblemKind.MISSING_IMAGE for p in exc.problems) == 4
