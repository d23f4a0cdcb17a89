"""The dataset layer: VOC and COCO parsing, class lists, the in-memory index, the torch Dataset, transforms, splits.

The names below are imported on first use (:pep:`562`), so that importing a torch-free module
of this package (``distdet.data.splits``, ``distdet.data.presets``, ...) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "DetectionDataset": "dataset", "collate_detection": "dataset",
    "load_rgb": "images", "read_image_size": "images",
    "DataIndex": "index", "build_index": "index",
    "DataError": "problems", "Problem": "problems", "ProblemKind": "problems",
    "ImageRecord": "records",
    "open_index": "sources",
    "Split": "splits", "choose_split": "splits", "load_manifest": "splits", "make_split": "splits",
    "save_manifest": "splits", "select_part": "splits", "select_records": "splits",
    "stratified_split": "splits", "tutorial_split": "splits",
    "PRESETS": "presets", "get_transforms": "transforms",
    "parse_voc_annotation": "voc",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distdet.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"distdet.data.{_EXPORTS[name]}"), name)
