"""Draw detection boxes on images: one colour per class, label (and score) written on each box."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from distdet.classes import CLASS_NAMES, class_colours

_FALLBACK_COLOUR = (0, 120, 255)
_BACKGROUND = (255, 255, 255)


def to_pil(image: Image.Image | torch.Tensor | np.ndarray) -> Image.Image:
    """An RGB PIL image from PIL, a float ``[3, H, W]`` tensor in [0, 1] (or uint8), or an
    ``[H, W, 3]`` uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(t.permute(1, 2, 0).numpy(), "RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 array, got {array.dtype} {array.shape}")
    return Image.fromarray(array, "RGB")


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_detections(image: Image.Image | torch.Tensor | np.ndarray, boxes: np.ndarray | torch.Tensor,
                    labels: Sequence[int] | np.ndarray | torch.Tensor,
                    scores: Sequence[float] | np.ndarray | torch.Tensor | None = None,
                    class_names: Sequence[str] = CLASS_NAMES,
                    colours: Mapping[str, tuple[int, int, int]] | None = None,
                    line_width: int | None = None) -> Image.Image:
    """Return a copy of ``image`` with each xyxy box drawn in its class colour and captioned
    with the class name, plus the score when ``scores`` is given. ``labels`` are 1-based ids
    into ``class_names``; unknown classes are drawn in blue with their id. ``colours``
    defaults to :func:`distdet.classes.class_colours` of ``class_names``."""
    colours = class_colours(class_names) if colours is None else colours
    canvas = to_pil(image).copy()
    boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes,
                       dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if scores is not None:
        scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores,
                            dtype=np.float64).reshape(-1)
    width = line_width or max(1, round(min(canvas.size) / 200))
    font = _font(max(10, round(min(canvas.size) / 30)))
    draw = ImageDraw.Draw(canvas)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        label = int(label)
        name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
        colour = tuple(colours.get(name, _FALLBACK_COLOUR))
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        caption = name if scores is None else f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1  # above the box, inside it at the top edge
        tx = max(0.0, min(x1, canvas.width - tw - 4))  # keep the caption inside the image
        draw.rectangle([tx, ty, tx + tw + 4, ty + th + 2], fill=colour)
        draw.text((tx + 2 - left, ty + 1 - top), caption, fill=(255, 255, 255), font=font)
    return canvas


def side_by_side(left: Image.Image, right: Image.Image, titles: tuple[str, str] = ("ground truth", "predictions"),
                 gap: int = 8) -> Image.Image:
    """Place two images next to each other on a white canvas with a title above each."""
    font = _font(max(12, round(min(left.size) / 25)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = max(probe.textbbox((0, 0), t, font=font)[3] for t in titles) + 6
    width = left.width + gap + right.width
    height = title_h + max(left.height, right.height)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    canvas.paste(left, (0, title_h))
    canvas.paste(right, (left.width + gap, title_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), titles[0], fill=(0, 0, 0), font=font)
    draw.text((left.width + gap + 2, 2), titles[1], fill=(0, 0, 0), font=font)
    return canvas


def add_legend(image: Image.Image, class_names: Sequence[str] = CLASS_NAMES,
               colours: Mapping[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """Return ``image`` with a white strip below it naming each class next to a swatch of its
    colour (default: :func:`distdet.classes.class_colours`), wrapped onto more rows when the
    image is narrow (and widened when even one class name does not fit)."""
    colours = class_colours(class_names) if colours is None else colours
    font = _font(max(10, round(min(image.size) / 30)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    extents = [probe.textbbox((0, 0), name, font=font) for name in class_names]
    line_h = max(bottom - top for _, top, _, bottom in extents) + 6
    places, x, row = [], 4, 0
    for left, _, right, _ in extents:
        item_w = line_h + 4 + (right - left)
        if x > 4 and x + item_w > image.width:
            x, row = 4, row + 1
        places.append((x, row))
        x += item_w + 12
    widest = max(line_h + 4 + right - left for left, _, right, _ in extents) + 8
    canvas = Image.new("RGB", (max(image.width, widest), image.height + (row + 1) * (line_h + 4) + 2), _BACKGROUND)
    canvas.paste(to_pil(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for name, (left, top, _, bottom), (x, row) in zip(class_names, extents, places):
        y = image.height + 3 + row * (line_h + 4)
        draw.rectangle([x, y, x + line_h - 1, y + line_h - 1], fill=tuple(colours.get(name, _FALLBACK_COLOUR)))
        draw.text((x + line_h + 4 - left, y + (line_h - (bottom - top)) // 2 - top), name, fill=(0, 0, 0), font=font)
    return canvas
