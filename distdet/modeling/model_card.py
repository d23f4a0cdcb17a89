"""Final weights plus a small JSON card, loadable without repeating training flags.

A model folder holds ``model.pt`` (the detector's state dict) and ``model_card.json``::

    {"format": 1, "model": "fasterrcnn_resnet50_fpn", "class_names": [...],
     "build": {"min_size": 800, "max_size": 1333, ...}, "info": {...}}

``build`` holds the keyword arguments of :func:`distdet.modeling.models.build_model` other than the
weights choices; ``info`` is free-form (training summary, metrics, versions).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distdet.io_utils import atomic_write, atomic_write_json, read_json
from distdet.modeling.models import build_model
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
        return cls(data["model"], list(data["class_names"]), dict(data.get("build", {})), dict(data.get("info", {})))


def save_detector(model: nn.Module, card: ModelCard, out_dir: str | Path, weights_name: str = WEIGHTS_NAME) -> Path:
    """Write ``weights_name`` and the card into ``out_dir`` atomically; return the weights path."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
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
    """Rebuild the detector described by the card at ``path`` and load its weights, in eval mode."""
    weights, card_path = resolve_weights_path(path)
    card = ModelCard.from_file(card_path)
    model = build_model(card.model, len(card.class_names), weights="none", backbone_weights="none", **card.build)
    state = load_state_dict_file(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"weights {weights} do not fit model {card.model!r}: {exc}") from exc
    return model.to(device).eval(), card
