"""The torch Dataset over indexed records, in torchvision's detection convention."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from distdet.data.images import MAX_PIXELS, load_rgb
from distdet.data.problems import DataError, ProblemKind
from distdet.data.records import ImageRecord

Target = dict[str, torch.Tensor]
Transform = Callable[[Any, Any], tuple[Any, Any]]


class DetectionDataset(Dataset):
    """Images decoded per item; annotations come from the records (no XML is read here).

    Item ``i`` is ``(image, target)``: ``image`` float32 ``[3, H, W]`` in ``[0, 1]``; ``target``
    has ``boxes`` float32 ``[N, 4]`` xyxy, ``labels`` int64 ``[N]``, ``image_id`` int64 scalar
    (= ``i``, the position in ``records``), ``area`` float32 ``[N]`` and ``iscrowd`` int64 ``[N]``.
    An image without objects gives ``boxes`` of shape ``(0, 4)``. COCO crowd regions
    (``record.iscrowd``) are left out of the target: they are not trained on (as torchvision's
    COCO references do); the evaluation reads them from the records.

    ``transforms`` is a torchvision.transforms.v2 style callable taking and returning
    ``(image, target)`` where ``image`` is a uint8 :class:`tv_tensors.Image` and
    ``target["boxes"]`` a :class:`tv_tensors.BoundingBoxes`; it may return uint8 or float
    images (uint8 is scaled to [0, 1] afterwards). ``area`` is computed after the transforms.
    """

    def __init__(self, records: Sequence[ImageRecord], transforms: Transform | None = None, *,
                 max_pixels: int = MAX_PIXELS) -> None:
        self.records: list[ImageRecord] = list(records)
        self.transforms = transforms
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self.records[index]
        pil = load_rgb(record.image_path, self.max_pixels)
        if pil.size != (record.width, record.height):
            raise DataError.single(
                ProblemKind.SIZE_MISMATCH, record.image_path,
                f"image is {pil.size[0]}x{pil.size[1]} but its annotation says {record.width}x{record.height}",
            )
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        keep = ~record.crowd
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(record.boxes.reshape(-1, 4)[keep].astype("float32", copy=True)),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=(record.height, record.width),
            ),
            "labels": torch.from_numpy(record.labels[keep].astype("int64", copy=True)),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image = image.as_subclass(torch.Tensor)
        if image.dtype == torch.uint8:
            image = image.to(torch.float32).div_(255)
        boxes = target["boxes"].as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4)
        labels = target["labels"].as_subclass(torch.Tensor).to(torch.int64)
        return image, {
            "boxes": boxes,
            "labels": labels,
            "image_id": torch.tensor(index, dtype=torch.int64),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(labels.shape[0], dtype=torch.int64),
        }


def collate_detection(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Collate detection items into ``(list of images, list of targets)`` (sizes differ)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
