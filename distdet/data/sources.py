"""Open a dataset folder in either layout: a COCO instances JSON, else PASCAL VOC."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from distdet.data.coco import build_coco_index, find_coco_file
from distdet.data.index import DataIndex, build_index


def dataset_format(data_dir: str | os.PathLike[str], annotations: str | os.PathLike[str] | None = None) -> str:
    """``"coco"`` when ``annotations`` is given or the folder holds a COCO file, else ``"voc"``."""
    return "coco" if find_coco_file(Path(data_dir), annotations) is not None else "voc"


def open_index(
    data_dir: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
    lenient: bool = False,
    *,
    annotations: str | os.PathLike[str] | None = None,
    run_class_names: Sequence[str] | None = None,
    run_what: str = "the run",
    allow_empty: bool = False,
    decode_images: bool = False,
) -> DataIndex:
    """Index ``data_dir`` as COCO (``--annotations FILE``, ``annotations.json`` or one
    ``instances_*.json``) or else as VOC, with the class list resolved as
    :mod:`distdet.data.class_list` describes (``class_names``: the explicit list, None to take
    it from the data; ``run_class_names``: the list it must match). Raises DataError or
    ClassListError (both ValueError) with messages naming the file and entry."""
    builder = build_coco_index if dataset_format(data_dir, annotations) == "coco" else build_index
    extra = {"annotations": annotations} if builder is build_coco_index else {}
    return builder(data_dir, None if class_names is None else tuple(class_names), lenient,
                   run_class_names=run_class_names, run_what=run_what, allow_empty=allow_empty,
                   decode_images=decode_images, **extra)
