"""Transform presets move boxes with the pixels; the Dataset serves images without objects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distdet.data import DetectionDataset, ImageRecord, build_index, get_transforms
from distdet.data.transforms import PRESETS

W, H = 64, 48
RECT = (10, 5, 30, 25)  # x1, y1, x2, y2 on the continuous pixel axis


def write_pair(root: Path, stem: str, boxes: list[tuple[str, tuple[float, float, float, float]]],
               paint: tuple[int, int, int, int] | None = RECT) -> None:
    """A black W x H PNG with one white rectangle (``paint``) and a VOC XML with ``boxes``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    if paint:
        x1, y1, x2, y2 = paint
        pixels[y1:y2, x1:x2] = 255
    Image.fromarray(pixels).save(root / "images" / f"{stem}.png")
    objects = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for name, b in boxes)
    (root / "annotations" / f"{stem}.xml").write_text(
        f"\n<annotation><size><width>{W}</width><height>{H}</height><depth>3</depth></size>{objects}</annotation>\n")


def painted_box(image: torch.Tensor) -> list[float]:
    """Bounding box (continuous xyxy) of the bright pixels of an image tensor."""
    mask = image.mean(0) > 0.5
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.fixture
def one_box(tmp_path: Path) -> list[ImageRecord]:
    write_pair(tmp_path, "a", [("without_mask", RECT)])
    return build_index(tmp_path).records


@pytest.mark.parametrize("preset", ["hflip", "strong"])
def test_boxes_follow_the_pixels(one_box: list[ImageRecord], preset: str) -> None:
    dataset = DetectionDataset(one_box, get_transforms(preset, train=True))
    outcomes = set()  # hflip: flipped or not; strong: zoomed out or not
    for seed in range(24):
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert target["labels"].tolist() == [2]
        box = target["boxes"][0].tolist()
        assert box == painted_box(image), f"seed {seed}"
        if preset == "hflip":
            assert image.shape[1:] == (H, W)
            outcomes.add(box == [W - RECT[2], RECT[1], W - RECT[0], RECT[3]])
        else:
            outcomes.add(image.shape[1:] != (H, W))  # zoomed out at least once, not always
        assert float(target["area"][0]) == pytest.approx((box[2] - box[0]) * (box[3] - box[1]))
    assert outcomes == {True, False}


@pytest.mark.parametrize("preset", ["none", "hflip", "strong"])
def test_eval_transforms_never_change_geometry(one_box: list[ImageRecord], preset: str) -> None:
    dataset = DetectionDataset(one_box, get_transforms(preset, train=False))
    plain = DetectionDataset(one_box)
    for seed in range(5):
        torch.manual_seed(seed)
        image, target = dataset[0]
        torch.testing.assert_close(image, plain[0][0])
        assert target["boxes"][0].tolist() == list(map(float, RECT))


def test_sanitize_drops_tiny_boxes_with_their_labels(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", [("mask_weared_incorrect", (40, 30, 40.5, 40)), ("with_mask", RECT)])
    records = build_index(tmp_path).records
    assert records[0].num_objects == 2
    dataset = DetectionDataset(records, get_transforms("strong", train=True))
    for seed in range(5):
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert target["labels"].tolist() == [1]
        assert target["boxes"][0].tolist() == painted_box(image)
        assert target["area"].shape == target["iscrowd"].shape == (1,)


def test_strong_preset_never_swaps_colour_channels(tmp_path: Path) -> None:
    """A skin-coloured face (hue 30 degrees: red > green > blue) stays red > green > blue in every
    pixel under ``strong``'s colour jitter; the stock ``RandomPhotometricDistort`` permutes the
    channels of about 40% of the images (p 0.5, 5 of 6 permutations), relabelling colours."""
    write_pair(tmp_path, "skin", [("without_mask", RECT)], paint=None)
    Image.fromarray(np.full((H, W, 3), (200, 130, 60), dtype=np.uint8)).save(tmp_path / "images" / "skin.png")
    dataset = DetectionDataset(build_index(tmp_path).records, get_transforms("strong", train=True))
    jittered = 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, _ = dataset[0]
        pixels = image.flatten(1)[:, image.flatten(1).sum(0) > 0]  # without the zoom-out's black border
        red, green, blue = pixels
        assert bool((red > green).all() and (green > blue).all()), f"seed {seed}: channels reordered"
        jittered += not torch.allclose(pixels[:, 0], torch.tensor([200, 130, 60]) / 255)
    assert jittered > 10  # the colour jitter itself still runs


@pytest.mark.parametrize("preset", PRESETS)
def test_image_without_objects(tmp_path: Path, preset: str) -> None:
    write_pair(tmp_path, "empty", [], paint=None)
    records = build_index(tmp_path, allow_empty=True).records
    assert records[0].boxes.shape == (0, 4)
    dataset = DetectionDataset(records, get_transforms(preset, train=True))
    for seed in range(4):
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == target["area"].shape == target["iscrowd"].shape == (0,)
        assert target["labels"].dtype == torch.int64


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'flip'.*none, hflip, strong"):
        get_transforms("flip")
