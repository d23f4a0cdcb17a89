"""The face-mask class table, and the drawing colours of any class list.

torchvision's detection models reserve label 0 for background, so a dataset's classes are
numbered from 1. The face-mask table below is the default class list (the face-mask data and
the synthetic default set); a run on other data carries its own list (see
:mod:`distdet.data.class_list`), recorded in its model card, and every picture takes its
colours from :func:`class_colours` of that list.
"""
from __future__ import annotations

import colorsys
from collections.abc import Sequence

#: Dataset class names in label order: ``CLASS_NAMES[i]`` has label ``i + 1``.
CLASS_NAMES: tuple[str, ...] = ("with_mask", "without_mask", "mask_weared_incorrect")

#: RGB drawing colours by class name (the tutorial's: green, red, orange).
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "with_mask": (0, 170, 0),
    "without_mask": (220, 0, 0),
    "mask_weared_incorrect": (255, 140, 0),
}

#: Colours of other class lists, by position in the list: the Okabe-Ito palette (chosen for
#: staying distinguishable under the common colour-vision deficiencies), its black replaced by
#: a dark grey so that boxes remain visible on dark images.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167),
    (213, 94, 0), (86, 180, 233), (240, 228, 66), (90, 90, 90),
)


def label_of(name: str, class_names: tuple[str, ...] = CLASS_NAMES) -> int:
    """Return the label id (1-based) of ``name``; raise KeyError naming the known classes."""
    try:
        return class_names.index(name) + 1
    except ValueError:
        raise KeyError(f"unknown class {name!r}; known classes: {', '.join(class_names)}") from None


def palette_colour(position: int) -> tuple[int, int, int]:
    """The colour of the class at 0-based ``position`` of a non-face-mask list.

    The first ``len(PALETTE)`` positions take the palette; later ones step the hue by the
    golden angle (saturated, fairly dark, so white captions stay readable), which keeps every
    new colour far from its neighbours. Pure function of ``position``.
    """
    if position < len(PALETTE):
        return PALETTE[position]
    hue = ((position - len(PALETTE)) * 0.618033988749895) % 1.0
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.8))


def class_colours(class_names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """Drawing colour of each class of ``class_names``.

    A list made only of face-mask names keeps the face-mask colours (green, red, orange);
    any other list is coloured by position with :func:`palette_colour`, so one run's class
    has the same colour in every picture (renders, legends, PR curves) drawn from its card.
    """
    if set(class_names) <= CLASS_COLOURS.keys():
        return {name: CLASS_COLOURS[name] for name in class_names}
    return {name: palette_colour(i) for i, name in enumerate(class_names)}
