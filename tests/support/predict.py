"""Shared by the predict, export and report tests: a small detector trained on synthetic data.

The model folder is built once per test session (under pytest's base temporary folder) and
reused by every module that asks for it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from distdet.classes import CLASS_NAMES
from distdet.data import DetectionDataset, build_index, collate_detection
from distdet.data.synthetic import make_synthetic_dataset
from distdet.modeling.model_card import ModelCard, save_detector
from distdet.modeling.models import build_model
from support.data import original_sample_dir  # noqa: F401  (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
#: Small images and a low score threshold, so that the barely trained model has detections.
BUILD = dict(min_size=96, max_size=128, box_score_thresh=0.01, box_detections_per_img=20)
IMAGE_SIZE = (128, 96)
TRAIN_STEPS = 40


def child_env() -> dict[str, str]:
    """Environment for ``python -m distdet`` children: this checkout importable, one thread."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def synthetic_data(base: Path) -> Path:
    """A few synthetic face-mask images with VOC annotations (made once under ``base``)."""
    root = base / "synthetic"
    if not (root / "synthetic.json").is_file():
        make_synthetic_dataset(root, num_images=8, seed=3, image_size=IMAGE_SIZE, face_size=(24, 60))
    return root


def trained_model_dir(base: Path) -> Path:
    """A model folder (model.pt + model_card.json) trained for a few steps on synthetic data."""
    out = base / "model"
    if (out / "model_card.json").is_file():
        return out
    data = synthetic_data(base)
    dataset = DetectionDataset(build_index(data).records)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(MODEL, len(CLASS_NAMES), **BUILD)
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 64  # cheaper steps; not part of the model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
        model.train()
        for step in range(TRAIN_STEPS):
            images, targets = collate_detection([dataset[(2 * step + i) % len(dataset)] for i in range(2)])
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    card = ModelCard(MODEL, list(CLASS_NAMES), build=dict(BUILD), info={"trained_steps": TRAIN_STEPS})
    save_detector(model.eval(), card, out)
    return out
