"""Where the real data is (the one place tests look for it), and tmp copies of it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

def _find_shared() -> Path:
    """The ``shared`` folder next to the checkout (or inside it, or next to any parent folder)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "facemask-original-sample").is_dir() or (parent / "shared" / "facemask").is_dir():
            return parent / "shared"
    return Path(__file__).resolve().parents[2].parent / "shared"


SHARED = _find_shared()
FACEMASK = Path(os.environ.get("DISTDET_FACEMASK_DIR", SHARED / "facemask"))
ORIGINALS = Path(os.environ.get("DISTDET_FACEMASK_ORIGINALS_DIR") or os.environ.get("DISTDET_SAMPLE_DIR")
                 or FACEMASK.parent / "facemask-original-sample")


def facemask_dir() -> Path | None:
    """The real dataset (``$DISTDET_FACEMASK_DIR``, else ``shared/facemask`` beside the checkout
    or a folder above it), or None when this machine has no copy."""
    return FACEMASK if (FACEMASK / "annotations").is_dir() else None


def original_sample_dir() -> Path | None:
    """The untouched original images (RGB, RGBA, 16-bit RGBA), or None when absent."""
    return ORIGINALS if (ORIGINALS / "images").is_dir() else None

needs_facemask = pytest.mark.skipif(not (FACEMASK / "annotations").is_dir(), reason=f"real dataset not at {FACEMASK}")
needs_originals = pytest.mark.skipif(not (ORIGINALS / "annotations").is_dir(), reason=f"original sample not at {ORIGINALS}")


def copy_sample(dst: Path, stems: tuple[str, ...] = ("maksssksksss0", "maksssksksss5", "maksssksksss10")) -> Path:
    """Copy image/annotation pairs of the original sample into ``dst`` (Kaggle layout)."""
    (dst / "images").mkdir(parents=True)
    (dst / "annotations").mkdir()
    for stem in stems:
        shutil.copyfile(ORIGINALS / "images" / f"{stem}.png", dst / "images" / f"{stem}.png")
        shutil.copyfile(ORIGINALS / "annotations" / f"{stem}.xml", dst / "annotations" / f"{stem}.xml")
    return dst


def xml_path(root: Path, stem: str) -> Path:
    return root / "annotations" / f"{stem}.xml"


def image_path(root: Path, stem: str) -> Path:
    return root / "images" / f"{stem}.png"


def edit_xml(root: Path, stem: str, old: str, new: str, count: int = 1) -> Path:
    """Replace ``old`` by ``new`` in an annotation (``count`` occurrences, -1 for all)."""
    path = xml_path(root, stem)
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))
    return path
