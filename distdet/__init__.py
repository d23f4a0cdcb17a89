"""distdet: distributed Faster R-CNN fine-tuning on PASCAL VOC face-mask data.

``distdet.load_detector(path)`` (see :mod:`distdet.inference.predictor`) is imported on first use, so
that ``import distdet`` stays light (no torch).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"load_detector": "distdet.inference.predictor", "Detector": "distdet.inference.predictor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distdet' has no attribute {name!r}")
