"""The names of the augmentation presets (:mod:`distdet.data.transforms` builds them), without
importing torch, for the ``--augment`` flag."""
from __future__ import annotations

PRESETS: tuple[str, ...] = ("none", "hflip", "strong")
DEFAULT_TRAIN_PRESET = "hflip"
