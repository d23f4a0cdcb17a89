"""Pictures a training run draws before its first step, into the run folder.

- ``plots/labels.png``: label statistics of the training images (:mod:`distdet.data.plots`);
- ``train_batches.png``: the first training batches of the main process exactly as the model
  gets them (after augmentation: each sample is loaded through the run's seeded dataset with
  its ``(epoch, index)`` key, as the DataLoader does; the detector's own resize and
  normalisation come later, inside the model), boxes and class names drawn, one row per batch,
  with a legend of the class colours.

Both are a convenience: :func:`write_start_pictures` logs a failure and carries on.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from distdet.data.plots import write_label_plots
from distdet.data.records import ImageRecord
from distdet.io_utils import atomic_write
from distdet.render import add_legend, draw_detections, to_pil

logger = logging.getLogger(__name__)

TRAIN_BATCHES_NAME = "train_batches.png"
PLOTS_DIR = "plots"
#: Batches drawn, and at most this many images of each (16 images, as Ultralytics' mosaics).
PREVIEW_BATCHES = 4
PREVIEW_PER_BATCH = 4
#: The longer side of each tile, in pixels: small enough for a 4x4 sheet of about 1000 px.
TILE = 240
_GAP = 6


def _tile(image: torch.Tensor, target: Mapping[str, torch.Tensor], class_names: Sequence[str],
          colours: Mapping[str, tuple[int, int, int]]) -> Image.Image:
    """One sample scaled to fit a TILE square, its boxes drawn at that scale."""
    pil = to_pil(image)
    scale = TILE / max(pil.size)
    pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.BILINEAR)
    boxes = target["boxes"].detach().cpu().float().reshape(-1, 4) * scale
    return draw_detections(pil, boxes, target["labels"], class_names=class_names, colours=colours)


def draw_batches(batches: Sequence[Sequence[tuple[torch.Tensor, Mapping[str, torch.Tensor]]]],
                 class_names: Sequence[str], colours: Mapping[str, tuple[int, int, int]]) -> Image.Image:
    """A sheet with one row per batch of ``(image, target)`` samples, titled ``batch N``, and a legend."""
    rows = [[_tile(image, target, class_names, colours) for image, target in batch] for batch in batches]
    if not any(rows):
        raise ValueError("no samples to draw")
    title_h = 16
    width = max(sum(t.width for t in row) + _GAP * (len(row) - 1) for row in rows)
    heights = [title_h + max((t.height for t in row), default=0) for row in rows]
    sheet = Image.new("RGB", (width, sum(heights) + _GAP * (len(rows) - 1)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for number, (row, height) in enumerate(zip(rows, heights)):
        draw.text((2, y + 2), f"batch {number}", fill=(0, 0, 0))
        x = 0
        for tile in row:
            sheet.paste(tile, (x, y + title_h))
            x += tile.width + _GAP
        y += height + _GAP
    return add_legend(sheet, class_names, colours)


def write_train_batches(path: str | Path, dataset: Dataset, batches: Sequence[Sequence[object]],
                        class_names: Sequence[str], colours: Mapping[str, tuple[int, int, int]]) -> Path:
    """Load the samples of ``batches`` (keys into ``dataset``; the first PREVIEW_BATCHES batches,
    PREVIEW_PER_BATCH samples each) and write their sheet to ``path``."""
    samples = [[dataset[key] for key in batch[:PREVIEW_PER_BATCH]] for batch in batches[:PREVIEW_BATCHES]]
    sheet = draw_batches(samples, class_names, colours)
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def write_start_pictures(run_dir: Path, train_records: Sequence[ImageRecord], dataset: Dataset,
                         batches: Sequence[Sequence[object]], class_names: Sequence[str],
                         colours: Mapping[str, tuple[int, int, int]]) -> list[Path]:
    """``plots/labels.png`` and ``train_batches.png`` (see the module docstring); return the
    paths written. ``batches``: the main process's first batches of keys into ``dataset``."""
    written = []
    for what, make in (("label plots", lambda: write_label_plots(run_dir / PLOTS_DIR, train_records, class_names,
                                                                 colours, title="training images")),
                       ("training batch preview", lambda: write_train_batches(run_dir / TRAIN_BATCHES_NAME, dataset,
                                                                              batches, class_names, colours))):
        try:
            written.append(make())
            logger.info("%s written: %s", what, written[-1])
        except Exception:  # noqa: BLE001 - pictures must never stop a training run
            logger.exception("could not write the %s of %s", what, run_dir)
    return written
