"""The files of a checkpoint folder: their checksums, and reading them without unpickling.

The completion marker ``COMPLETE`` is JSON: ``format``, ``time``, ``pieces`` (each named state
piece and the files holding it, e.g. ``"optimizer": ["optimizer.bin"]``) and ``files`` (every
other file of the folder with its size and SHA-256). A new kind of state (an EMA copy, say) is
one more entry in ``pieces``; :func:`verify_checkpoint` checks every listed file, whatever it holds.

Nothing in a checkpoint is unpickled: weights are safetensors, distdet's own state is JSON,
and the two files Accelerate writes with ``torch.save`` (``optimizer.bin``, the per-rank
``random_states_<rank>.pkl``, ``scaler.pt`` under fp16) are read with ``weights_only=True``
and an allow-list of exactly the numpy types Python's and numpy's RNG states need.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from distdet.io_utils import atomic_write_json, read_json

COMPLETE_MARKER = "COMPLETE"
MARKER_FORMAT = 2

#: What ``np.random.get_state()`` pickles into: an ndarray of uint32 and its dtype.
RNG_SAFE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read; the message names the checkpoint and the file."""


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_marker(folder: Path, pieces: dict[str, list[str]], **extra: Any) -> None:
    """Write ``COMPLETE`` with the size and SHA-256 of every other file in ``folder``."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE_MARKER}
    unknown = sorted({name for names in pieces.values() for name in names} - set(files))
    if unknown:
        raise CheckpointError(f"checkpoint {folder}: pieces name missing files {unknown}")
    atomic_write_json(folder / COMPLETE_MARKER, {"format": MARKER_FORMAT, **extra, "pieces": pieces, "files": files})


def read_marker(folder: Path) -> dict[str, Any]:
    """The parsed marker; CheckpointError when it is not one this version writes."""
    try:
        marker = read_json(folder / COMPLETE_MARKER, "checkpoint marker")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict) or not isinstance(
            marker.get("pieces"), dict):
        raise CheckpointError(f"checkpoint {folder}: {COMPLETE_MARKER} lists no file checksums (written by an older "
                              f"distdet, or altered); it cannot be verified, so it is not loaded")
    return marker


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Check every file the marker lists (present, same size, same SHA-256); return the marker.

    Raises CheckpointError naming the checkpoint and the first file that does not match.
    """
    marker = read_marker(folder)
    for name, expected in marker["files"].items():
        path = folder / name
        if Path(name).name != name or not isinstance(expected, dict):
            raise CheckpointError(f"checkpoint {folder}: {COMPLETE_MARKER} has a malformed entry {name!r}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(f"checkpoint {folder}: {name} has {size} bytes, the marker says "
                                  f"{expected.get('bytes')} (truncated or replaced)")
        if file_digest(path) != expected.get("sha256"):
            raise CheckpointError(f"checkpoint {folder}: {name} fails its SHA-256 check (corrupt or altered)")
    return marker


def piece_files(marker: dict[str, Any], piece: str) -> list[str]:
    files = marker["pieces"].get(piece)
    return list(files) if isinstance(files, list) else []


def load_tensor_file(path: Path) -> Any:
    """``torch.load`` of an Accelerate state file with ``weights_only=True`` and the RNG allow-list."""
    try:
        with torch.serialization.safe_globals(RNG_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling refusal or format error is reported alike
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {path.name} safely: {first_line}") from exc


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {path.name}: {exc}") from exc


def load_json_piece(path: Path, what: str) -> dict[str, Any]:
    try:
        data = read_json(path, what)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path.parent}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} holds {type(data).__name__}, not an object")
    return data


def first_nonfinite(named_tensors: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating-point tensor (or float) that holds NaN or infinity, or None."""
    for name, value in named_tensors:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
        if isinstance(value, float) and not math.isfinite(value):
            return name
    return None


def optimizer_tensors(state_dict: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    """(name, value) of every per-parameter state entry and hyperparameter of an optimizer state dict."""
    for param_id, entries in state_dict.get("state", {}).items():
        for key, value in entries.items():
            yield f"optimizer state {param_id}.{key}", value
    for index, group in enumerate(state_dict.get("param_groups", [])):
        for key, value in group.items():
            if key != "params":
                yield f"optimizer param_groups[{index}].{key}", value
