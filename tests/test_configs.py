"""The shipped recipes in configs/: they parse with train.py's own parser, and the GPU recipe
keeps the learning-rate and warmup rules its header promises for 1, 4 and 8 GPUs."""
from __future__ import annotations

from pathlib import Path

import pytest

from distdet.training.config import parse_config
from distdet.training.optim import effective_lr, lr_factor_fn, resolve_warmup_steps
from distdet.training.sampling import EpochBatchSampler

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
GPU_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "facemask_r50v2_coco_gpu.yaml"
TUTORIAL_TRAIN_IMAGES = 683 - 68  # tutorial split minus the 10 % validation part


def test_configs_are_found():
    assert GPU_RECIPE in CONFIGS and len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_validates(path):
    cfg = parse_config(["--config", str(path)])
    assert cfg.config == str(path)


@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_gpu_recipe_lr_and_warmup_rules(gpus):
    cfg = parse_config(["--config", str(GPU_RECIPE)])
    global_batch = cfg.batch_size * gpus
    assert effective_lr(cfg, global_batch) == pytest.approx(0.005 * gpus)
    sampler = EpochBatchSampler(TUTORIAL_TRAIN_IMAGES, cfg.batch_size, gpus, 0, cfg.seed)
    steps_per_epoch = len(sampler.epoch_batches())
    warmup = resolve_warmup_steps(cfg, steps_per_epoch)
    assert warmup == steps_per_epoch - 1  # one epoch
    factor = lr_factor_fn(cfg, steps_per_epoch)
    first_drop = cfg.lr_milestones[0] * steps_per_epoch
    assert factor(warmup) == 1.0 and factor(first_drop - 1) == 1.0
    assert factor(first_drop) == pytest.approx(cfg.lr_gamma)
