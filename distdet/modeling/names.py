"""The detector names ``--model`` accepts, without importing torch (the parsers need them).

:data:`distdet.modeling.models.TORCHVISION_MODELS` maps the torchvision names to their builders
and refuses to load if the two lists drift apart.
"""
from __future__ import annotations

#: Faster R-CNN variants built by torchvision.
TORCHVISION_MODEL_NAMES: tuple[str, ...] = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)
#: Models built outside torchvision's registry (optional extras).
EXTRA_MODELS: tuple[str, ...] = ("fasterrcnn_lite0_fpn",)

MODEL_NAMES: tuple[str, ...] = TORCHVISION_MODEL_NAMES + EXTRA_MODELS
