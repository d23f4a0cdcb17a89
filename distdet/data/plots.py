"""Pictures of a dataset's labels: what ``check-data --plots DIR`` and training (``<run>/plots``) draw.

:func:`write_label_plots` writes ``labels.png``, one figure of five panels:

- objects per class (bars in the class colours, counts written on them);
- boxes per image (histogram, images without objects included);
- box width against height in pixels, one colour per class;
- the same relative to the image (width / image width, height / image height);
- image sizes (width against height, the marker area grows with the number of images).

Class names and colours are parameters, so a run with its own class list draws its own.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from distdet.data.records import ImageRecord
from distdet.io_utils import atomic_write

LABELS_NAME = "labels.png"
#: Scatter panels draw at most this many boxes per class (a seeded sample), so a big dataset
#: stays a readable picture of a few hundred KB.
MAX_POINTS_PER_CLASS = 4000
_FALLBACK_COLOUR = (0, 120, 255)


def _rgb(colours: Mapping[str, tuple[int, int, int]], name: str) -> tuple[float, float, float]:
    return tuple(c / 255 for c in colours.get(name, _FALLBACK_COLOUR))


def _box_sizes(records: Sequence[ImageRecord], label: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, 2]`` widths/heights in pixels and relative to the image, for the boxes of ``label``."""
    pixels, relative = [], []
    for rec in records:
        boxes = rec.boxes.reshape(-1, 4)[rec.labels == label]
        wh = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        pixels.append(wh)
        relative.append(wh / np.array([rec.width, rec.height], dtype=np.float64))
    if not pixels:
        return np.zeros((0, 2)), np.zeros((0, 2))
    return np.concatenate(pixels), np.concatenate(relative)


def _sample(points: np.ndarray, limit: int) -> np.ndarray:
    if len(points) <= limit:
        return points
    return points[np.random.default_rng(0).choice(len(points), limit, replace=False)]


def write_label_plots(out_dir: str | Path, records: Sequence[ImageRecord], class_names: Sequence[str],
                      colours: Mapping[str, tuple[int, int, int]], title: str = "") -> Path:
    """Write ``<out_dir>/labels.png`` (see the module docstring) and return its path.

    ``records`` carry 1-based labels into ``class_names``; ``colours`` maps a class name to RGB
    0-255 (a class without one is drawn blue). Raises ValueError when ``records`` is empty.
    """
    if not records:
        raise ValueError("no images to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8.5), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flat
    counts = [sum(int((r.labels == label).sum()) for r in records) for label in range(1, len(class_names) + 1)]
    ax = next(axes)
    bars = ax.bar(range(len(class_names)), counts, color=[_rgb(colours, n) for n in class_names])
    ax.bar_label(bars)
    ax.set_xticks(range(len(class_names)), class_names, rotation=15)
    ax.set(title="objects per class", ylabel="objects")

    ax = next(axes)
    per_image = np.array([r.num_objects for r in records])
    ax.hist(per_image, bins=np.arange(per_image.max() + 2) - 0.5, color="tab:gray", edgecolor="white")
    ax.set(title=f"boxes per image (mean {per_image.mean():.2f})", xlabel="boxes", ylabel="images")

    pixel_ax, relative_ax = next(axes), next(axes)
    for label, name in enumerate(class_names, start=1):
        pixels, relative = _box_sizes(records, label)
        style = {"s": 6, "alpha": 0.5, "color": _rgb(colours, name), "label": f"{name} ({len(pixels)})"}
        pixel_ax.scatter(*_sample(pixels, MAX_POINTS_PER_CLASS).T, **style)
        relative_ax.scatter(*_sample(relative, MAX_POINTS_PER_CLASS).T, **style)
    pixel_ax.set(title="box size (pixels)", xlabel="width", ylabel="height")
    relative_ax.set(title="box size (fraction of the image)", xlabel="width / image width",
                    ylabel="height / image height", xlim=(0, 1), ylim=(0, 1))
    for ax in (pixel_ax, relative_ax):
        ax.legend(fontsize="small", markerscale=2)
        ax.grid(alpha=0.3)

    ax = next(axes)
    sizes = Counter((r.width, r.height) for r in records)
    shapes, images = zip(*sizes.items())
    widths, heights = zip(*shapes)
    ax.scatter(widths, heights, s=[10 + 90 * n / max(images) for n in images], color="tab:purple", alpha=0.6)
    ax.set(title=f"image sizes ({len(sizes)} distinct)", xlabel="width (pixels)", ylabel="height (pixels)")
    ax.grid(alpha=0.3)
    next(axes).set_visible(False)
    fig.suptitle(title or f"{len(records)} images, {sum(counts)} objects")
    fig.tight_layout()
    return atomic_write(Path(out_dir) / LABELS_NAME, lambda tmp: fig.savefig(tmp, format="png"))
