"""How much the face-mask classes differ in colour, and what a channel permutation does to that.

For every box, the mean RGB of its central half (the face or the mask, little background);
per class: the mean colour, the share of boxes ordered like skin (red > green > blue) and the
share that are bluer than red. Then, for each of the 6 channel permutations that
``RandomPhotometricDistort`` can apply, the share of ``with_mask``/``without_mask`` boxes that a
nearest-colour rule (chromaticity centroids of the unpermuted boxes) still assigns to their own
class: the drop is how much of the colour cue a permuted image contradicts. The measurement
behind the ``strong`` preset leaving the permutation out (:mod:`distdet.data.transforms`).

    PYTHONPATH=. python benchmarks/box_colours.py --data-dir ../shared/facemask   # ~15 s on 2 cores
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distdet.data import build_index  # noqa: E402 - the repository is on sys.path when run as a script

CUE_CLASSES = ("with_mask", "without_mask")


def box_colours(data_dir: str) -> dict[str, np.ndarray]:
    """Class name -> ``[N, 3]`` mean RGB of the central half of each of its boxes."""
    index = build_index(data_dir)
    colours: dict[str, list[np.ndarray]] = {}
    for record in index.records:
        pixels = np.asarray(Image.open(record.image_path).convert("RGB"), dtype=np.float64)
        for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist()):
            width, height = x2 - x1, y2 - y1
            left, top = int(x1 + width / 4), int(y1 + height / 4)
            patch = pixels[top:max(int(np.ceil(y2 - height / 4)), top + 1),
                           left:max(int(np.ceil(x2 - width / 4)), left + 1)]
            colours.setdefault(index.class_names[label - 1], []).append(patch.reshape(-1, 3).mean(0))
    return {name: np.array(values) for name, values in colours.items()}


def skin_ordered(rgb: np.ndarray) -> np.ndarray:
    return (rgb[:, 0] > rgb[:, 1]) & (rgb[:, 1] > rgb[:, 2])


def kept_share(colours: dict[str, np.ndarray], permutation: tuple[int, ...]) -> float:
    """Share of the cue classes' boxes, channels permuted, nearest to their own class's centroid."""
    chroma = {name: colours[name] / colours[name].sum(1, keepdims=True) for name in CUE_CLASSES}
    centroids = np.stack([chroma[name].mean(0) for name in CUE_CLASSES])
    kept = total = 0
    for own, name in enumerate(CUE_CLASSES):
        permuted = chroma[name][:, list(permutation)]
        nearest = np.argmin(((permuted[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
        kept, total = kept + int((nearest == own).sum()), total + len(permuted)
    return kept / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="VOC folder of the face-mask data")
    colours = box_colours(parser.parse_args(argv).data_dir)
    for name, rgb in colours.items():
        print(f"{name:24s} {len(rgb):5d} boxes, mean RGB {np.round(rgb.mean(0)).astype(int).tolist()}, "
              f"red > green > blue {skin_ordered(rgb).mean():.1%}, blue > red {(rgb[:, 2] > rgb[:, 0]).mean():.1%}")
    for permutation in itertools.permutations(range(3)):
        print(f"channels {''.join('RGB'[c] for c in permutation)}: nearest-colour class kept "
              f"{kept_share(colours, permutation):.1%}; without_mask still red > green > blue "
              f"{skin_ordered(colours['without_mask'][:, list(permutation)]).mean():.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
