"""The dataset layer on the real Face Mask Detection files (skipped when they are absent)."""
from __future__ import annotations

import os
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.data import FACEMASK, ORIGINALS, needs_facemask, needs_originals
from distdet.classes import CLASS_NAMES
from distdet.data import DetectionDataset, build_index, collate_detection, load_rgb

ORIGINAL_STEMS = sorted(p.stem for p in (ORIGINALS / "images").glob("*.png")) if ORIGINALS.is_dir() else []


def png_flavour(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from the PNG's IHDR, read without Pillow."""
    head = path.read_bytes()[:26]
    assert head[12:16] == b"IHDR"
    return struct.unpack(">BB", head[24:26])


def oracle_boxes(xml: Path) -> tuple[np.ndarray, list[str]]:
    """Boxes and names read with the standard library's parser, clamped with numpy."""
    root = ET.parse(xml).getroot()
    w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
    boxes = np.array([[float(o.findtext(f"bndbox/{c}")) for c in ("xmin", "ymin", "xmax", "ymax")]
                      for o in root.iter("object")], dtype=np.float32)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    return boxes, [o.findtext("name") for o in root.iter("object")]


@needs_originals
def test_original_sample_covers_every_png_flavour() -> None:
    flavours = {stem: png_flavour(ORIGINALS / "images" / f"{stem}.png") for stem in ORIGINAL_STEMS}
    # 8-bit RGB, 8-bit RGBA and 16-bit RGBA (colour type 2 = RGB, 6 = RGBA)
    assert {flavours[s] for s in ("maksssksksss0", "maksssksksss106")} == {(8, 2)}
    assert {flavours[s] for s in ("maksssksksss10", "maksssksksss101")} == {(8, 6)}
    assert {flavours[s] for s in ("maksssksksss1", "maksssksksss100", "maksssksksss102")} == {(16, 6)}


@needs_originals
@pytest.mark.parametrize("stem", ORIGINAL_STEMS)
def test_every_original_loads_as_8bit_rgb(stem: str) -> None:
    image = load_rgb(ORIGINALS / "images" / f"{stem}.png")
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.max() > 200 and pixels.min() < 50  # real content, not a blank or clipped plane
    copy = FACEMASK / "images" / f"{stem}.png"
    if copy.is_file():  # the shared copy was made with Image.open(p).convert("RGB"): pixel-identical
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(copy)))


@needs_originals
def test_original_sample_index_matches_xml_after_clamping() -> None:
    index = build_index(ORIGINALS)
    assert [r.stem for r in index.records] == ORIGINAL_STEMS
    assert index.clamped == {"maksssksksss5": 1, "maksssksksss603": 2}
    for record in index.records:
        boxes, names = oracle_boxes(record.annotation_path)
        np.testing.assert_array_equal(record.boxes, boxes)
        assert record.boxes.dtype == np.float32 and record.labels.dtype == np.int64
        assert [CLASS_NAMES[l - 1] for l in record.labels] == names
        assert not record.difficult.any() and record.difficult.shape == record.labels.shape
        assert (record.boxes[:, 2] <= record.width).all() and (record.boxes[:, 3] <= record.height).all()
    assert index.records[ORIGINAL_STEMS.index("maksssksksss603")].boxes[:, 2].max() == 400.0


@needs_originals
def test_dataset_items_follow_the_detection_convention() -> None:
    index = build_index(ORIGINALS)
    dataset = DetectionDataset(index.records)
    for i, record in enumerate(index.records):
        image, target = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (3, record.height, record.width)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        expected = torch.from_numpy(np.array(load_rgb(record.image_path))).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(image, expected)
        torch.testing.assert_close(target["boxes"], torch.from_numpy(record.boxes))
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == record.labels.tolist()
        assert target["image_id"].dtype == torch.int64 and target["image_id"].shape == () and int(target["image_id"]) == i
        b = record.boxes
        torch.testing.assert_close(target["area"], torch.from_numpy((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0] * len(b)
    images, targets = collate_detection([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2 and images[1].shape[0] == 3


@needs_originals
def test_dataloader_with_worker_processes() -> None:
    dataset = DetectionDataset(build_index(ORIGINALS).records)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_detection)
    ids = [int(t["image_id"]) for _, targets in loader for t in targets]
    assert ids == list(range(len(dataset)))


@needs_facemask
def test_real_dataset_counts() -> None:
    index = build_index(FACEMASK)
    assert len(index.records) == 853 and index.problems == []
    assert index.class_counts() == {"with_mask": 3232, "without_mask": 717, "mask_weared_incorrect": 123}
    assert index.num_objects == 4072
    assert index.num_clamped_boxes == 12
    assert sorted(index.clamped) == sorted(f"maksssksksss{n}" for n in (5, 93, 110, 231, 251, 457, 501, 603, 616, 706, 787))
    stems = [r.stem for r in index.records]
    assert stems == sorted(p[:-4] for p in os.listdir(FACEMASK / "annotations"))  # lexicographic
    assert stems[:3] == ["maksssksksss0", "maksssksksss1", "maksssksksss10"]
    assert len({(r.width, r.height) for r in index.records}) == 136
