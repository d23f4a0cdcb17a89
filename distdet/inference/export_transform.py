"""The inference transform the exports use: torchvision's, with the eager resize size.

No ``from __future__ import annotations`` here: TorchScript compiles this module's methods
and needs their annotations as real types.
"""
import math
from typing import Optional

import torch
import torchvision
from torch import Tensor
from torch.nn import functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _get_shape_onnx


@torch.jit.unused
def _traced_resize_size(image: Tensor, min_size: float, max_size: float) -> list[int]:
    """The eager output size as ONNX-traceable float64 tensor ops (1-D throughout: the
    exporter computes 0-dim scalar operands in float32)."""
    shape = _get_shape_onnx(image).to(torch.float64)  # [h, w]
    limits = torch.tensor([min_size, max_size], dtype=torch.float64)
    scale = (limits / torch.sort(shape).values).min(dim=0, keepdim=True).values
    size = torch.floor(shape * scale).to(torch.int64)
    return [size[0], size[1]]  # tensors standing in for ints while tracing


class ExactResizeTransform(GeneralizedRCNNTransform):
    """torchvision's inference transform with the eager resize size on every path.

    Eval mode only (what an export runs): the short side goes to ``min_size[-1]`` unless the
    long side would exceed ``max_size``; the size is ``floor(side * scale)`` in double
    precision, as eager PyTorch computes it.
    """

    def resize(self, image: Tensor,
               target: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        if self.training or target is not None or self.fixed_size is not None:
            raise RuntimeError("ExactResizeTransform only runs inference without fixed_size")
        min_size, max_size = float(self.min_size[-1]), float(self.max_size)
        if torchvision._is_tracing():
            size = _traced_resize_size(image, min_size, max_size)
        else:
            height, width = float(image.shape[-2]), float(image.shape[-1])
            scale = min(min_size / min(height, width), max_size / max(height, width))
            size = [int(math.floor(height * scale)), int(math.floor(width * scale))]
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return image, target
