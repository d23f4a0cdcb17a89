"""Final weights plus a small JSON card, loadable without repeating training flags.

A model folder holds ``model.pt`` (the detector's state dict) and ``model_card.json``::

    {"format": 1, "model": "fasterrcnn_resnet50_fpn", "class_names": [...],
     "build": {"min_size": 800, "max_size": 1333, ...}, "info": {...}}

``build`` holds the keyword arguments of :func:`distdet.modeling.models.build_model` other than the
weights choices; ``info`` is free-form (training summary, metrics, versions). A multi-scale
detector's card keeps its training sizes (``"min_size": [384, 448, 512]``) and its evaluation
size (``"eval_min_size": 512``); loading rebuilds it at the evaluation size (cards without
``eval_min_size``, written before it existed, load at their one ``min_size``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distdet.io_utils import atomic_write, atomic_write_json, read_json
from distdet.modeling.models import build_model
from distdet.modeling.multiscale import inference_build
from distdet.modeling.weights import load_state_dict_file

CARD_NAME = "model_card.json"
WEIGHTS_NAME = "model.pt"
CARD_FORMAT = 1


@dataclass
class ModelCard:
    """What is needed to rebuild a trained detector, and what is known about it."""

    model: str
    class_names: list[str]
    build: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": CARD_FORMAT, **asdict(self)}

    @classmethod
    def from_file(cls, path: Path) -> "ModelCard":
        data = read_json(path, "model card")
        if not isinstance(data, dict) or data.get("format") != CARD_FORMAT:
            raise ValueError(f"model card {path} is not a distdet model card (format {CARD_FORMAT})")
        missing = [key for key in ("model", "class_names") if key not in data]
        if missing:
            raise ValueError(f"model card {path} lacks {', '.join(missing)}")
        names, build, info = data["class_names"], data.get("build", {}), data.get("info", {})
        if not isinstance(data["model"], str):
            raise ValueError(f"model card {path}: 'model' must be a model name, got {data['model']!r}")
        if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
                or len(set(names)) != len(names)):
            raise ValueError(f"model card {path}: 'class_names' must be a list of distinct non-empty names, "
                             f"got {names!r}")
        if not isinstance(build, dict) or not isinstance(info, dict):
            raise ValueError(f"model card {path}: 'build' and 'info' must be objects")
        for key, value in build.items():
            _check_build_value(path, key, value)
        return cls(data["model"], list(names), dict(build), dict(info))


#: The ``build`` keys a card may hold: (type, smallest value, largest value or None).
BUILD_KEYS: dict[str, tuple[type, float, float | None]] = {
    "min_size": (int, 1, None), "eval_min_size": (int, 1, None), "max_size": (int, 1, None),
    "trainable_backbone_layers": (int, 0, 5),
    "box_score_thresh": (float, 0.0, 1.0), "box_detections_per_img": (int, 1, None),
    "box_batch_size_per_image": (int, 1, None), "rpn_batch_size_per_image": (int, 1, None),
    "frozen_batchnorm": (bool, 0, 1),
}


def _check_build_value(path: Path, key: str, value: Any) -> None:
    """Raise ValueError naming the card and the key for an unknown key or a value of the wrong type or range."""
    if key not in BUILD_KEYS:
        raise ValueError(f"model card {path}: unknown build key {key!r} (known: {', '.join(BUILD_KEYS)})")
    kind, low, high = BUILD_KEYS[key]
    if key == "trainable_backbone_layers" and value is None:
        return
    if key == "min_size" and isinstance(value, list):  # the training sizes of a multi-scale detector
        if not value or any(isinstance(size, list) for size in value):
            raise ValueError(f"model card {path}: build 'min_size' must be an integer or a non-empty list of "
                             f"integers, got {value!r}")
        for size in value:
            _check_build_value(path, key, size)
        return
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (kind is not bool and (value < low or (high is not None and value > high))):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        wanted = {bool: "true or false", int: f"an integer {bounds}", float: f"a number {bounds}"}[kind]
        raise ValueError(f"model card {path}: build {key!r} must be {wanted}, got {value!r}")


def save_detector(model: nn.Module, card: ModelCard, out_dir: str | Path, weights_name: str = WEIGHTS_NAME) -> Path:
    """Write ``weights_name`` and the card into ``out_dir`` atomically; return the weights path.

    Refuses (ValueError naming the tensor) weights that hold NaN or infinity.
    """
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"not writing {out_dir / weights_name}: the weights hold NaN or infinity ({bad})")
    weights_path = atomic_write(out_dir / weights_name, lambda tmp: torch.save(state, tmp))
    atomic_write_json(out_dir / CARD_NAME, card.to_json())
    return weights_path


def resolve_weights_path(path: str | Path) -> tuple[Path, Path]:
    """Return (weights file, card file) for a model folder or a weights file with a sibling card."""
    path = Path(path)
    if path.is_dir():
        weights, card = path / WEIGHTS_NAME, path / CARD_NAME
    else:
        weights, card = path, path.parent / CARD_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no model weights at {weights}")
    if not card.is_file():
        raise FileNotFoundError(f"no {CARD_NAME} next to {weights}: cannot tell which model to build")
    return weights, card


def load_detector_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the detector described by the card at ``path`` and load its weights, in eval mode,
    resizing to the card's evaluation size."""
    weights, card_path = resolve_weights_path(path)
    card = ModelCard.from_file(card_path)
    model = build_model(card.model, len(card.class_names), weights="none", backbone_weights="none",
                        **inference_build(card.build))
    state = load_state_dict_file(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"weights {weights} do not fit model {card.model!r}: {exc}") from exc
    return model.to(device).eval(), card
