"""The datasets of a training run: data folder, train/val/test split and its manifest.

The split is read from ``--split-manifest``, or, when a run resumes, from the resumed run's
``split.json``, or made by :func:`distdet.data.splits.choose_split` (``--split-scheme``). With
``--val-fraction`` a validation part is carved out of the training images (stratified on each
image's rarest class, seeded with ``--seed``) unless the manifest already has one.

The class list is resolved by :func:`distdet.data.open_index` from ``--class-names`` and the
data (:mod:`distdet.data.class_list`); it is written into ``split.json``, and a run that
resumes (or follows ``--split-manifest``) must have the class list recorded there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch.utils.data import Dataset

from distdet.data.class_list import parse_class_names
from distdet.data.dataset import DetectionDataset
from distdet.data.sources import open_index
from distdet.data.splits import Split, choose_split, load_manifest, save_manifest
from distdet.data.synthetic import resolve_data_dir
from distdet.data.transforms import get_transforms
from distdet.data.records import ImageRecord
from distdet.io_utils import atomic_write
from distdet.training.config import TrainConfig

SPLIT_NAME = "split.json"

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    data_dir: Path
    split: Split
    train: DetectionDataset
    val: DetectionDataset | None
    test: DetectionDataset
    manifest_path: Path
    class_names: tuple[str, ...]
    class_source: str
    annotations: Path | None = None
    category_ids: tuple[int, ...] | None = None

    @property
    def train_records(self) -> list[ImageRecord]:
        return self.train.records

    @property
    def eval_split(self) -> tuple[str, Dataset]:
        """The part scored during training: val when there is one, else test."""
        return ("val", self.val) if self.val is not None else ("test", self.test)

    def manifest(self) -> dict[str, Any]:
        return {"name": self.split.name, "seed": self.split.seed, "params": self.split.params,
                "class_names": list(self.class_names),
                "train": self.split.train, "val": self.split.val, "test": self.split.test}

    def card_info(self) -> dict[str, Any]:
        """What the model card records about the data: folder, split, COCO file and category ids."""
        return {"data_dir": str(self.data_dir), "split_manifest": str(self.manifest_path),
                "annotations": None if self.annotations is None else str(self.annotations),
                "class_source": self.class_source,
                "category_ids": None if self.category_ids is None else list(self.category_ids)}


def training_split(cfg: TrainConfig, records: list[ImageRecord], resume_split: Path | None) -> Split:
    """The split to train with (see the module docstring)."""
    if not cfg.split_manifest and resume_split is not None and resume_split.is_file():
        return load_manifest(resume_split)  # a resumed run keeps its split exactly
    return choose_split(records, cfg.split_scheme, manifest=cfg.split_manifest or None,
                        test_fraction=cfg.test_fraction, seed=cfg.seed, val_fraction=cfg.val_fraction)


def recorded_class_names(cfg: TrainConfig, resume_split: Path | None) -> tuple[tuple[str, ...] | None, str]:
    """The class list the run must keep: that of the resumed run's split, else of ``--split-manifest``
    (None when neither records one), and in words where it comes from."""
    for path, what in ((resume_split, "the resumed run"), (cfg.split_manifest, "--split-manifest")):
        if path is not None and Path(path).is_file():
            names = load_manifest(path).class_names
            if names:
                return names, f"{what} ({path})"
    return None, "the run"


def prepare_data(cfg: TrainConfig, run_dir: Path, accelerator: Accelerator,
                 resume_split: Path | None = None) -> TrainingData:
    """Index the data, choose the split, write ``split.json`` (main process) and build the datasets.

    ``resume_split``: the ``split.json`` of the run being resumed, used when it exists.
    """
    data_dir = resolve_data_dir(cfg.data_dir)
    run_class_names, run_what = recorded_class_names(cfg, resume_split)
    index = open_index(data_dir, parse_class_names(cfg.class_names) if cfg.class_names else None, cfg.lenient,
                       annotations=cfg.annotations, run_class_names=run_class_names, run_what=run_what)
    logger.info("classes (labels 1..%d): %s, from %s", len(index.class_names), ", ".join(index.class_names),
                index.class_source)
    if index.problems:
        logger.warning("--lenient: %d problem(s); the images concerned are skipped", len(index.problems))
    records = index.records
    manifest_path = Path(run_dir) / SPLIT_NAME
    split = replace(training_split(cfg, records, resume_split), class_names=index.class_names)
    parts = split.select(records)
    if not parts["train"]:
        raise ValueError(f"the split of {data_dir} has no training images")
    if accelerator.is_main_process:
        atomic_write(manifest_path, lambda tmp: save_manifest(tmp, split))
    eval_transform = get_transforms(cfg.augment, train=False)
    return TrainingData(
        data_dir=data_dir,
        split=split,
        train=DetectionDataset(parts["train"], transforms=get_transforms(cfg.augment, train=True)),
        val=DetectionDataset(parts["val"], transforms=eval_transform) if parts["val"] else None,
        test=DetectionDataset(parts["test"], transforms=eval_transform),
        manifest_path=manifest_path,
        class_names=index.class_names,
        class_source=index.class_source,
        annotations=index.annotation_file,
        category_ids=index.category_ids,
    )
