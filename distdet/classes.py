"""The one class table of distdet.

torchvision's detection models reserve label 0 for background, so the dataset's
classes are numbered from 1. Every module that needs a class id, a name or a colour
reads it from here.
"""
from __future__ import annotations

#: Dataset class names in label order: ``CLASS_NAMES[i]`` has label ``i + 1``.
CLASS_NAMES: tuple[str, ...] = ("with_mask", "without_mask", "mask_weared_incorrect")

#: RGB drawing colours by class name (the tutorial's: green, red, orange).
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "with_mask": (0, 170, 0),
    "without_mask": (220, 0, 0),
    "mask_weared_incorrect": (255, 140, 0),
}


def label_of(name: str, class_names: tuple[str, ...] = CLASS_NAMES) -> int:
    """Return the label id (1-based) of ``name``; raise KeyError naming the known classes."""
    try:
        return class_names.index(name) + 1
    except ValueError:
        raise KeyError(f"unknown class {name!r}; known classes: {', '.join(class_names)}") from None

