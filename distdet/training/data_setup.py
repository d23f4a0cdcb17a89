"""The datasets of a training run: data folder, train/val/test split and its manifest."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch.utils.data import Dataset

from distdet.classes import CLASS_NAMES
from distdet.data import DetectionDataset, build_index, get_transforms, make_split
from distdet.data.records import ImageRecord
from distdet.io_utils import atomic_write_json

SPLIT_NAME = "split.json"


@dataclass
class TrainingData:
    data_dir: Path
    train_records: list[ImageRecord]
    val_records: list[ImageRecord]
    test_records: list[ImageRecord]
    train: Dataset
    val: Dataset | None
    test: Dataset
    manifest: dict[str, Any]
    manifest_path: Path

    @property
    def eval_split(self) -> tuple[str, Dataset]:
        """The split scored during training: val when carved out, else test."""
        return ("val", self.val) if self.val is not None else ("test", self.test)


def resolve_data_dir(data_dir: str | None, accelerator: Accelerator) -> Path:
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"--data-dir {path} does not exist")
        return path.resolve()
    from distdet.data.synthetic import default_data_dir

    with accelerator.main_process_first():
        return Path(default_data_dir()).resolve()


def prepare_data(cfg, run_dir: Path, accelerator: Accelerator, reuse_run_split: bool) -> TrainingData:
    data_dir = resolve_data_dir(cfg.data_dir, accelerator)
    index = build_index(data_dir, CLASS_NAMES)
    records = index.records
    by_stem = {r.stem: r for r in records}
    run_split = Path(run_dir) / SPLIT_NAME
    if cfg.split_manifest:
        manifest = _read_manifest(Path(cfg.split_manifest))
    elif reuse_run_split and run_split.is_file():
        manifest = _read_manifest(run_split)
    else:
        train, test = make_split(records, cfg.split, seed=cfg.seed)
        stems = [r.stem for r in train]
        val_stems: list[str] = []
        if cfg.val_fraction > 0:
            rng = random.Random(cfg.seed)
            val_stems = sorted(rng.sample(stems, max(1, round(len(stems) * cfg.val_fraction))))
        manifest = {"format": 1, "data_dir": str(data_dir), "kind": cfg.split, "seed": cfg.seed,
                    "val_fraction": cfg.val_fraction,
                    "train": sorted(set(stems) - set(val_stems)), "val": val_stems,
                    "test": sorted(r.stem for r in test)}
    def pick(name: str) -> list[ImageRecord]:
        missing = [s for s in manifest.get(name, []) if s not in by_stem]
        if missing:
            raise ValueError(f"split manifest names {len(missing)} {name} images not in {data_dir}: {missing[:5]}")
        return [by_stem[s] for s in manifest.get(name, [])]
    train_r, val_r, test_r = pick("train"), pick("val"), pick("test")
    if accelerator.is_main_process:
        atomic_write_json(run_split, manifest)
    return TrainingData(
        data_dir=data_dir,
        train_records=train_r,
        val_records=val_r,
        test_records=test_r,
        train=DetectionDataset(train_r, transforms=get_transforms(cfg.augment, train=True)),
        val=DetectionDataset(val_r, transforms=get_transforms(cfg.augment, train=False)) if val_r else None,
        test=DetectionDataset(test_r, transforms=get_transforms(cfg.augment, train=False)),
        manifest=manifest,
        manifest_path=run_split,
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read split manifest {path}: {exc}") from exc
