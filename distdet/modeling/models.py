"""Faster R-CNN models by name, with their box predictor sized for our classes.

``weights`` chooses the whole detector's starting point: ``"none"`` (random), ``"coco"``
(torchvision's COCO weights through its weight enum), or a path to a state-dict file.
``backbone_weights`` chooses the backbone's: ``"none"``, ``"imagenet"`` or a path. The box
predictor always ends up with ``num_classes + 1`` outputs (background is 0).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

from distdet.modeling.multiscale import size_tuple, use_sizes
from distdet.modeling.names import MODEL_NAMES, TORCHVISION_MODEL_NAMES
from distdet.modeling.weights import ensure_available, load_state_dict_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchvisionModel:
    """A torchvision Faster R-CNN builder and the weight enums it accepts."""

    builder: Callable[..., nn.Module]
    coco_weights: WeightsEnum
    imagenet_weights: WeightsEnum


TORCHVISION_MODELS: dict[str, TorchvisionModel] = {
    "fasterrcnn_resnet50_fpn": TorchvisionModel(
        tv_frcnn.fasterrcnn_resnet50_fpn,
        tv_frcnn.FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
        ResNet50_Weights.IMAGENET1K_V1,
    ),
    "fasterrcnn_resnet50_fpn_v2": TorchvisionModel(
        tv_frcnn.fasterrcnn_resnet50_fpn_v2,
        tv_frcnn.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
        ResNet50_Weights.IMAGENET1K_V1,
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": TorchvisionModel(
        tv_frcnn.fasterrcnn_mobilenet_v3_large_fpn,
        tv_frcnn.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
        MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": TorchvisionModel(
        tv_frcnn.fasterrcnn_mobilenet_v3_large_320_fpn,
        tv_frcnn.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1,
        MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    ),
}

if tuple(TORCHVISION_MODELS) != TORCHVISION_MODEL_NAMES:
    raise ImportError("distdet.modeling.names.TORCHVISION_MODEL_NAMES must list TORCHVISION_MODELS' keys in order")


def build_model(
    name: str,
    num_classes: int,
    *,
    weights: str = "none",
    backbone_weights: str = "none",
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    eval_min_size: int | None = None,
    trainable_backbone_layers: int | None = None,
    box_score_thresh: float = 0.05,
    box_detections_per_img: int = 100,
    box_batch_size_per_image: int = 512,
    rpn_batch_size_per_image: int = 256,
    frozen_batchnorm: bool = False,
) -> nn.Module:
    """Build detector ``name`` for ``num_classes`` object classes (+1 background output).

    ``box_batch_size_per_image`` / ``rpn_batch_size_per_image`` (torchvision's defaults) are the
    proposals / anchors sampled per image for the training losses; they do not affect inference,
    and on CPU the box head's cost grows with the first.

    Backbones built from pretrained weights use frozen batch norm (torchvision's convention);
    ``frozen_batchnorm=True`` gives that structure without the pretrained weights, which is
    how a fine-tuned detector is rebuilt from its model card before its weights are loaded.

    ``min_size`` is one short side or several: training then resizes each batch to one of them
    and evaluation to ``eval_min_size`` (default: the largest), see
    :mod:`distdet.modeling.multiscale`. One size evaluated at itself is torchvision's transform.

    Raises ValueError for an unknown name or weights choice, WeightsUnavailableError when
    downloadable weights are asked for offline and are not cached.
    """
    head_kwargs = dict(
        min_size=size_tuple(min_size),
        max_size=max_size,
        box_score_thresh=box_score_thresh,
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
    )
    if name == "fasterrcnn_lite0_fpn":
        model = _build_lite0(
            num_classes, weights, backbone_weights, trainable_backbone_layers, frozen_batchnorm, head_kwargs
        )
        return use_sizes(model, min_size, eval_min_size)
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    spec = TORCHVISION_MODELS[name]
    coco = _choose(weights, "coco", spec.coco_weights, "--weights")
    imagenet = _choose(backbone_weights, "imagenet", spec.imagenet_weights, "--backbone-weights")
    model = spec.builder(
        weights=coco if isinstance(coco, WeightsEnum) else None,
        weights_backbone=imagenet if isinstance(imagenet, WeightsEnum) else None,
        trainable_backbone_layers=trainable_backbone_layers if (coco or imagenet) else None,
        **head_kwargs,
    )
    _replace_box_predictor(model, num_classes)
    if frozen_batchnorm:
        _freeze_batchnorm(model.backbone.body)
    if isinstance(imagenet, Path):
        _load_partial(model.backbone.body, imagenet, "backbone")
    if isinstance(coco, Path):
        _load_partial(model, coco, "detector")
    return use_sizes(model, min_size, eval_min_size)


def _choose(value: str, enum_name: str, enum: WeightsEnum, flag: str) -> WeightsEnum | Path | None:
    """Map a weights flag value to None, an available enum, or an existing file path."""
    if value == "none":
        return None
    if value == enum_name:
        return ensure_available(enum)
    path = Path(value)
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"{flag} file {path} does not exist")
        return path
    raise ValueError(f"{flag} must be 'none', '{enum_name}' or a path to a weights file, got {value!r}")


def _replace_box_predictor(model: nn.Module, num_classes: int) -> None:
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes + 1)


def _load_partial(module: nn.Module, path: Path, what: str) -> None:
    """Load the tensors of ``path`` whose names and shapes match ``module``; log the rest."""
    state = load_state_dict_file(path)
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"weights file {path} shares no tensor (name and shape) with the {what}")
    module.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    logger.info("loaded %d %s tensors from %s; %d kept their initial values", len(usable), what, path, len(skipped))
    if skipped:
        logger.info("not loaded from %s: %s", path, ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))


def _build_lite0(
    num_classes: int,
    weights: str,
    backbone_weights: str,
    trainable_backbone_layers: int | None,
    frozen_batchnorm: bool,
    head_kwargs: dict,
) -> nn.Module:
    from distdet.modeling.backbones.lite0 import fasterrcnn_lite0_fpn  # optional extra: timm

    if backbone_weights not in ("none", "imagenet"):
        raise ValueError("fasterrcnn_lite0_fpn takes --backbone-weights imagenet|none (from the installed package)")
    if weights == "coco":
        raise ValueError("fasterrcnn_lite0_fpn has no COCO weights; use --weights none or a file path")
    model = fasterrcnn_lite0_fpn(
        num_classes + 1,
        pretrained_backbone=backbone_weights == "imagenet",
        trainable_backbone_layers=trainable_backbone_layers,
        frozen_bn=True if frozen_batchnorm else None,
        **head_kwargs,
    )
    if weights != "none":
        _load_partial(model, Path(weights), "detector")
    return model


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` below ``module`` by a ``FrozenBatchNorm2d`` with its values."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def uses_frozen_batchnorm(model: nn.Module) -> bool:
    """True when the detector's backbone normalises with frozen (statistics-free) batch norm."""
    return any("Frozen" in type(m).__name__ for m in model.backbone.modules())


def set_eval_thresholds(model: nn.Module, score_thresh: float, detections_per_img: int) -> tuple[float, int]:
    """Set the detector's score threshold and detections per image; return the old values."""
    heads = model.roi_heads
    old = (heads.score_thresh, heads.detections_per_img)
    heads.score_thresh, heads.detections_per_img = score_thresh, detections_per_img
    return old
