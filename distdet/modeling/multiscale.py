"""Multi-scale training: one short side per training batch, one evaluation size.

torchvision's ``GeneralizedRCNNTransform`` accepts a tuple ``min_size``. In training mode its
``resize`` calls ``torch_choice(min_size)`` once per IMAGE, which draws
``torch.empty(1).uniform_()`` from torch's global CPU generator (whatever the images' device),
interleaved with the draws of the RPN and box-head samplers. In eval mode it resizes to
``min_size[-1]``, the tuple's last entry, whatever the others are.

:class:`BatchScaleTransform` changes both:

- **one size per batch**: each training forward draws one short side (from ``size_source``,
  a callable the trainer sets to its seeded schedule, else torchvision's ``torch_choice`` over
  the sizes, once) and resizes every image of the batch to it. Images of one batch share a
  scale, so batches that ``--aspect-ratio-group-factor`` filled with images of one shape pad
  as little as they would at one size; per-image draws would pad every image to the largest
  one's scale.
- **its own evaluation size**: in eval mode ``min_size`` reads ``(eval_min_size,)``, so
  torchvision's eval path and every reader of ``min_size[-1]`` (the predictor's resize check,
  the export's transform) use that size; in training mode ``min_size`` is the size tuple.

``max_size`` stays fixed, as in torchvision and detectron2: for an image whose long/short
ratio exceeds ``max_size / size`` the long side binds, so the listed sizes above
``max_size / ratio`` all give that image the same size.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform


class BatchScaleTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` drawing one short side per training batch, with an evaluation size."""

    def __init__(self, train_sizes: Sequence[int], eval_min_size: int, max_size: int, image_mean: list[float],
                 image_std: list[float], size_divisible: int = 32, fixed_size: tuple[int, int] | None = None) -> None:
        super().__init__(tuple(train_sizes), max_size, image_mean, image_std, size_divisible, fixed_size)
        self.eval_min_size = int(eval_min_size)
        #: returns the next training batch's short side; None: torchvision's draw, once per batch
        self.size_source: Callable[[], int] | None = None
        self.batch_min_size: int | None = None  # the current training batch's short side

    @classmethod
    def replacing(cls, transform: GeneralizedRCNNTransform, train_sizes: Sequence[int],
                  eval_min_size: int) -> "BatchScaleTransform":
        """A transform like ``transform`` (normalisation, ``max_size``, padding) with these sizes."""
        return cls(train_sizes, eval_min_size, transform.max_size, transform.image_mean, transform.image_std,
                   transform.size_divisible, transform.fixed_size)

    @property
    def min_size(self) -> tuple[int, ...]:  # type: ignore[override]
        """The training sizes in training mode, ``(eval_min_size,)`` in eval mode."""
        return self.train_sizes if self.training else (self.eval_min_size,)

    @min_size.setter
    def min_size(self, sizes: Sequence[int]) -> None:
        self.train_sizes = tuple(int(size) for size in sizes)

    def forward(self, images: list[Tensor],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        if self.training:
            source = self.size_source
            self.batch_min_size = source() if source is not None else super().torch_choice(list(self.train_sizes))
        return super().forward(images, targets)

    def torch_choice(self, k: list[int]) -> int:
        """torchvision's per-image draw, answered with the batch's size (drawn once in :meth:`forward`)."""
        return self.batch_min_size if self.batch_min_size is not None else super().torch_choice(k)


def size_tuple(min_size: int | Sequence[int]) -> tuple[int, ...]:
    """``min_size`` as a tuple of short sides (one int is a tuple of one)."""
    return (int(min_size),) if isinstance(min_size, int) else tuple(int(size) for size in min_size)


def use_sizes(model: nn.Module, min_size: int | Sequence[int], eval_min_size: int | None) -> nn.Module:
    """Give ``model`` a :class:`BatchScaleTransform` unless it trains and evaluates at one size.

    ``eval_min_size`` None means the largest training size. One training size evaluated at
    that size keeps torchvision's transform untouched (today's behaviour, random stream included).
    """
    sizes = size_tuple(min_size)
    eval_size = max(sizes) if eval_min_size is None else int(eval_min_size)
    if len(sizes) > 1 or eval_size != sizes[0]:
        model.transform = BatchScaleTransform.replacing(model.transform, sizes, eval_size)
    return model


def inference_build(build: dict[str, Any]) -> dict[str, Any]:
    """A model card's ``build`` as :func:`~distdet.modeling.models.build_model` arguments for
    inference: ``min_size`` becomes the evaluation size (``eval_min_size``; for a card without one,
    its single ``min_size`` or the largest of a list), so the rebuilt detector has torchvision's
    plain transform at that size."""
    kwargs = {key: value for key, value in build.items() if key != "eval_min_size"}
    if "eval_min_size" in build:
        kwargs["min_size"] = build["eval_min_size"]
    elif "min_size" in build:
        kwargs["min_size"] = max(size_tuple(build["min_size"]))
    return kwargs


def size_record(sizes: Sequence[int]) -> int | list[int]:
    """Training sizes as cards and checkpoints record them: one size as the plain integer they
    held before lists existed, several as a list."""
    return int(sizes[0]) if len(sizes) == 1 else [int(size) for size in sizes]
