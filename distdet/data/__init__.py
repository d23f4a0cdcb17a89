"""The dataset layer: VOC and COCO parsing, class lists, the in-memory index, the torch Dataset, transforms, splits."""
from __future__ import annotations

from distdet.data.dataset import DetectionDataset, collate_detection
from distdet.data.images import load_rgb, read_image_size
from distdet.data.index import DataIndex, build_index
from distdet.data.problems import DataError, Problem, ProblemKind
from distdet.data.records import ImageRecord
from distdet.data.sources import open_index
from distdet.data.splits import (
    Split,
    load_manifest,
    make_split,
    save_manifest,
    select_records,
    stratified_split,
    tutorial_split,
)
from distdet.data.transforms import PRESETS, get_transforms
from distdet.data.voc import parse_voc_annotation

__all__ = [
    "DataError", "DataIndex", "DetectionDataset", "ImageRecord", "PRESETS", "Problem", "ProblemKind",
    "Split", "build_index", "collate_detection", "get_transforms", "load_manifest", "load_rgb",
    "make_split", "open_index", "parse_voc_annotation", "read_image_size", "save_manifest", "select_records",
    "stratified_split", "tutorial_split",
]
