"""The datasets of a training run: data folder, train/val/test split and its manifest.

The split is read from ``--split-manifest``, or, when a run resumes, from the resumed run's
``split.json``, or made by :func:`distdet.data.splits.choose_split` (``--split-scheme``). With
``--val-fraction`` a validation part is carved out of the training images (stratified on each
image's rarest class, seeded with ``--seed``) unless the manifest already has one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch.utils.data import Dataset

from distdet.classes import CLASS_NAMES
from distdet.data.dataset import DetectionDataset
from distdet.data.index import build_index
from distdet.data.splits import Split, choose_split, load_manifest, save_manifest
from distdet.data.synthetic import resolve_data_dir
from distdet.data.transforms import get_transforms
from distdet.data.records import ImageRecord
from distdet.io_utils import atomic_write
from distdet.training.config import TrainConfig

SPLIT_NAME = "split.json"


@dataclass
class TrainingData:
    data_dir: Path
    split: Split
    train: DetectionDataset
    val: DetectionDataset | None
    test: DetectionDataset
    manifest_path: Path

    @property
    def train_records(self) -> list[ImageRecord]:
        return self.train.records

    @property
    def eval_split(self) -> tuple[str, Dataset]:
        """The part scored during training: val when there is one, else test."""
        return ("val", self.val) if self.val is not None else ("test", self.test)

    def manifest(self) -> dict[str, Any]:
        return {"name": self.split.name, "seed": self.split.seed, "params": self.split.params,
                "train": self.split.train, "val": self.split.val, "test": self.split.test}


def training_split(cfg: TrainConfig, records: list[ImageRecord], resume_split: Path | None) -> Split:
    """The split to train with (see the module docstring)."""
    if not cfg.split_manifest and resume_split is not None and resume_split.is_file():
        return load_manifest(resume_split)  # a resumed run keeps its split exactly
    return choose_split(records, cfg.split_scheme, manifest=cfg.split_manifest or None,
                        test_fraction=cfg.test_fraction, seed=cfg.seed, val_fraction=cfg.val_fraction)


def prepare_data(cfg: TrainConfig, run_dir: Path, accelerator: Accelerator,
                 resume_split: Path | None = None) -> TrainingData:
    """Index the data, choose the split, write ``split.json`` (main process) and build the datasets.

    ``resume_split``: the ``split.json`` of the run being resumed, used when it exists.
    """
    data_dir = resolve_data_dir(cfg.data_dir)
    records = build_index(data_dir, CLASS_NAMES).records
    manifest_path = Path(run_dir) / SPLIT_NAME
    split = training_split(cfg, records, resume_split)
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
    )
