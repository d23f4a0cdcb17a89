"""distdet: distributed Faster R-CNN fine-tuning on PASCAL VOC face-mask data."""
from __future__ import annotations

__version__ = "0.1.0"
