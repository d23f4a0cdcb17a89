"""The class table written next to an exported model: what its label ids mean.

An exported TorchScript / ONNX model returns label ids only. ``<export>.classes.json``
(beside the file) holds, from the model card: ``background_label`` (0), ``classes`` (one
entry per label 1..K with ``label``, ``name`` and the RGB ``colour`` distdet draws it in) and
``category_ids`` (the original COCO category id of each label, or null for VOC data).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from distdet.classes import class_colours
from distdet.io_utils import atomic_write_json
from distdet.modeling.model_card import ModelCard

SUFFIX = ".classes.json"


def class_table(card: ModelCard) -> dict[str, Any]:
    """The table of ``card``'s classes (see the module docstring)."""
    colours = class_colours(card.class_names)
    return {
        "model": card.model,
        "background_label": 0,  # torchvision's detectors reserve label 0
        "classes": [{"label": i + 1, "name": name, "colour": list(colours[name])}
                    for i, name in enumerate(card.class_names)],
        "category_ids": card.info.get("category_ids"),
    }


def write_class_table(export_path: str | Path, card: ModelCard) -> Path:
    """Write ``<export_path>.classes.json`` atomically; return its path."""
    export_path = Path(export_path)
    return atomic_write_json(export_path.with_name(export_path.name + SUFFIX), class_table(card))
