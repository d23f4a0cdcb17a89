"""Resolving pretrained weights: torchvision weight enums, their local cache, or a file.

Weights are never fetched behind the user's back on a machine without internet: when a
torchvision enum's file is not in the cache (``$TORCH_HOME/hub/checkpoints``) and the
download host cannot be reached within a few seconds, :class:`WeightsUnavailableError`
names the exact file and the folder to put it in.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum

#: Seconds to wait for the download host before declaring the machine offline.
CONNECT_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be had on this machine."""


def weights_cache_dir() -> Path:
    """The folder torchvision loads cached weight files from."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torchvision expects the file of ``weights`` to be cached."""
    return weights_cache_dir() / os.path.basename(urlparse(weights.url).path)


def _host_reachable(url: str) -> bool:
    if os.environ.get("DISTDET_OFFLINE", "") not in ("", "0"):
        return False
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def ensure_available(weights: WeightsEnum) -> WeightsEnum:
    """Return ``weights`` if its file is cached or downloadable; else raise a clear error."""
    path = cached_weights_path(weights)
    if path.is_file() or _host_reachable(weights.url):
        return weights
    raise WeightsUnavailableError(
        f"pretrained weights {weights} are not on this machine and {urlparse(weights.url).hostname} "
        f"cannot be reached. Download {weights.url} elsewhere and place the file at {path} "
        f"(set TORCH_HOME to use another cache folder), or pass a local file path instead, "
        f"or 'none' to start from random weights."
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` (a bare state dict or a dict with a 'model' entry)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    return state
