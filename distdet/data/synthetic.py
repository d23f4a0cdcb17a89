"""Synthetic face-mask data in the Kaggle VOC layout: the embedded default dataset.

:func:`make_synthetic_dataset` draws cartoon faces with Pillow on cluttered backgrounds and
writes ``images/synth_NNNN.png`` plus ``annotations/synth_NNNN.xml`` (the same tags as the
real Face Mask Detection annotations). The three classes differ in what covers the face:

- ``with_mask``: a mask from just below the eyes to the chin hides nose and mouth;
- ``without_mask``: no mask, nose and a red mouth are visible;
- ``mask_weared_incorrect``: the mask sits below the nose, covering mouth and chin, so the
  dark nose shows between the eyes and the mask.

With another class list (``class_names``, e.g. for testing a run on one's own classes) the
class at position ``i`` is drawn like face-mask class ``i % 3`` and the classes are equally
likely; the names are written into the XML files and ``synthetic.json``.

Output is a pure function of the parameters: image ``i`` is drawn from its own random stream
seeded by ``(seed, i)``, so the same parameters give byte-identical files (with the same
Pillow/zlib build). The folder is filled under a temporary name and renamed into place, with
``synthetic.json`` (the parameters and object counts) written last, so a folder holding the
marker is complete.

:func:`default_data_dir` generates the default set once into a cache folder and returns it;
concurrent callers (e.g. the ranks of one job) serialise on a file lock and share one folder.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lxml import etree
from PIL import Image, ImageDraw

from distdet.classes import CLASS_NAMES

logger = logging.getLogger(__name__)

#: Bump whenever the drawing or the file layout changes: cached folders are keyed on it.
SYNTHETIC_VERSION = 1
MARKER_NAME = "synthetic.json"
MARKER_FORMAT = "distdet-synthetic"

DEFAULT_NUM_IMAGES = 240
DEFAULT_IMAGE_SIZE = (320, 240)
DEFAULT_MAX_OBJECTS = 4
DEFAULT_FACE_SIZE = (30, 90)
#: Class probabilities in ``CLASS_NAMES`` order: the real data's order of frequency, with the
#: rare class boosted so a small model sees enough of it.
CLASS_PROBABILITIES = (0.5, 0.3, 0.2)

_SKIN_TONES = np.array(
    [(255, 224, 196), (241, 194, 150), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 38)]
)
_MASK_COLOURS = np.array(
    [(150, 200, 240), (245, 245, 245), (35, 35, 40), (40, 55, 120), (60, 165, 165), (120, 190, 120)]
)
_HAIR_COLOURS = np.array([(20, 15, 10), (70, 40, 20), (140, 90, 40), (210, 180, 110), (120, 120, 120)])
_MOUTH_COLOUR = np.array((170, 20, 40))
_NOSE_COLOUR = np.array((70, 35, 20))


@dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines a synthetic dataset's bytes (written to the marker)."""

    num_images: int
    seed: int
    image_size: tuple[int, int]
    max_objects_per_image: int
    face_size: tuple[int, int]
    class_names: tuple[str, ...] = CLASS_NAMES

    def validate(self) -> None:
        """Raise ValueError naming the offending parameter."""
        width, height = self.image_size
        min_face, max_face = self.face_size
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_objects_per_image < 1:
            raise ValueError(f"max_objects_per_image must be >= 1, got {self.max_objects_per_image}")
        if not 12 <= min_face <= max_face:
            raise ValueError(f"face_size must satisfy 12 <= min <= max, got {self.face_size}")
        if max_face > min(width, height):
            raise ValueError(
                f"image_size {width}x{height} is too small for faces up to {max_face} px; "
                f"both sides must be >= {max_face}"
            )

    def to_json(self) -> dict:
        return {
            "num_images": self.num_images,
            "seed": self.seed,
            "image_size": list(self.image_size),
            "max_objects_per_image": self.max_objects_per_image,
            "face_size": list(self.face_size),
            # only when not the default, so the cached default datasets keep their key
            **({"class_names": list(self.class_names)} if self.class_names != CLASS_NAMES else {}),
        }


def make_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    num_images: int = DEFAULT_NUM_IMAGES,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    max_objects_per_image: int = DEFAULT_MAX_OBJECTS,
    face_size: tuple[int, int] = DEFAULT_FACE_SIZE,
    overwrite: bool = False,
    class_names: tuple[str, ...] = CLASS_NAMES,
) -> Path:
    """Write a synthetic VOC dataset to ``out_dir`` and return its path.

    ``image_size`` is ``(width, height)``; each image holds 1..``max_objects_per_image``
    non-overlapping faces whose height is drawn from ``face_size`` (min, max) in pixels.
    ``out_dir`` must be absent or an empty folder; with ``overwrite=True`` an existing
    non-empty folder is replaced as a whole. The folder appears atomically (built under a
    temporary sibling name, then renamed), its last-written file being ``synthetic.json``.
    Raises FileExistsError for a non-empty ``out_dir`` without ``overwrite``, ValueError for
    bad parameters.
    """
    params = SyntheticParams(
        num_images=int(num_images),
        seed=int(seed),
        image_size=(int(image_size[0]), int(image_size[1])),
        max_objects_per_image=int(max_objects_per_image),
        face_size=(int(face_size[0]), int(face_size[1])),
        class_names=tuple(class_names),
    )
    params.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_dataset(tmp, params)
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def read_marker(data_dir: str | os.PathLike[str]) -> dict | None:
    """Return the parsed ``synthetic.json`` of ``data_dir``, or None when there is no valid one."""
    path = Path(data_dir) / MARKER_NAME
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    return marker


def default_cache_root() -> Path:
    """``$DISTDET_CACHE`` if set, else ``$XDG_CACHE_HOME/distdet``, else ``~/.cache/distdet``."""
    if os.environ.get("DISTDET_CACHE"):
        return Path(os.environ["DISTDET_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "distdet"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The absolute ``--data-dir``, or the synthetic default dataset when it is None.

    Raises FileNotFoundError naming the flag when ``data_dir`` is not a folder. Safe to call
    from every process of a launch at once (see :func:`default_data_dir`).
    """
    if data_dir is None:
        return default_data_dir().resolve()
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--data-dir {path} is not a folder")
    return path.resolve()


def default_data_dir(
    num_images: int = DEFAULT_NUM_IMAGES,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    cache_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Return the embedded default dataset, generating it once into the cache.

    The folder is ``<cache_root>/synthetic-v<version>-seed<seed>-n<num_images>-<W>x<H>``
    (``cache_root`` defaults to :func:`default_cache_root`). A folder whose marker matches
    the parameters and whose files are all present is reused; anything else under that name
    (an older or damaged copy, temporary folders left by a killed process) is removed and
    regenerated. Safe to call from several processes at once: they serialise on an
    exclusive ``flock`` of ``<folder>.lock`` and all return the same folder.
    """
    params = SyntheticParams(
        num_images=int(num_images),
        seed=int(seed),
        image_size=(int(image_size[0]), int(image_size[1])),
        max_objects_per_image=DEFAULT_MAX_OBJECTS,
        face_size=DEFAULT_FACE_SIZE,
    )
    params.validate()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    width, height = params.image_size
    target = root / f"synthetic-v{SYNTHETIC_VERSION}-seed{params.seed}-n{params.num_images}-{width}x{height}"
    if _is_complete(target, params):
        logger.info("using the synthetic default dataset at %s", target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if not _is_complete(target, params):
            for stale in root.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists():
                logger.warning("%s is incomplete or stale; regenerating it", target)
            logger.info("generating the synthetic default dataset (%d images) at %s", params.num_images, target)
            make_synthetic_dataset(
                target,
                num_images=params.num_images,
                seed=params.seed,
                image_size=params.image_size,
                max_objects_per_image=params.max_objects_per_image,
                face_size=params.face_size,
                overwrite=True,
            )
    logger.info("using the synthetic default dataset at %s", target)
    return target


# --------------------------------------------------------------------------- internals


def _is_complete(data_dir: Path, params: SyntheticParams) -> bool:
    marker = read_marker(data_dir)
    if marker is None or marker.get("version") != SYNTHETIC_VERSION or marker.get("params") != params.to_json():
        return False
    stems = [_stem(i) for i in range(params.num_images)]
    return all(
        (data_dir / "images" / f"{s}.png").is_file() and (data_dir / "annotations" / f"{s}.xml").is_file()
        for s in stems
    )


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # replaces an absent or empty folder atomically
        return
    trash = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(out, trash)
    os.replace(tmp, out)
    shutil.rmtree(trash)


def _stem(index: int) -> str:
    return f"synth_{index:04d}"


def _write_dataset(root: Path, params: SyntheticParams) -> None:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    counts = dict.fromkeys(params.class_names, 0)
    for index in range(params.num_images):
        stem = _stem(index)
        image, objects = _draw_image(np.random.default_rng([params.seed, index]), params)
        image.save(root / "images" / f"{stem}.png", format="PNG", compress_level=6)
        (root / "annotations" / f"{stem}.xml").write_bytes(_voc_xml(f"{stem}.png", params.image_size, objects))
        for name, _ in objects:
            counts[name] += 1
    marker = {
        "format": MARKER_FORMAT,
        "version": SYNTHETIC_VERSION,
        "params": params.to_json(),
        "class_names": list(params.class_names),
        "num_objects": sum(counts.values()),
        "objects_per_class": counts,
    }
    (root / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


Box = tuple[int, int, int, int]


def _draw_image(rng: np.random.Generator, params: SyntheticParams) -> tuple[Image.Image, list[tuple[str, Box]]]:
    """Draw one image; return it and its objects as ``(class name, (x1, y1, x2, y2))``.

    Boxes are in continuous pixel coordinates: a face drawn on pixel columns ``x1..x2-1``
    has ``xmin=x1, xmax=x2``, so every box lies inside ``[0, W] x [0, H]``.
    """
    width, height = params.image_size
    image = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, width, height)
    objects: list[tuple[str, Box]] = []
    for _ in range(int(rng.integers(1, params.max_objects_per_image + 1))):
        box = _place_face(rng, params, [b for _, b in objects])
        if box is None:
            continue
        names = params.class_names
        if names == CLASS_NAMES:
            position = int(rng.choice(len(CLASS_NAMES), p=CLASS_PROBABILITIES))
        else:
            position = int(rng.choice(len(names)))
        _draw_face(rng, draw, box, CLASS_NAMES[position % len(CLASS_NAMES)])
        objects.append((names[position], box))
    return image, objects


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(colour + rng.integers(-amount, amount + 1, size=3), 0, 255))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A two-colour linear gradient in a random direction plus blotchy (cell-wise) noise."""
    start, end = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    pixels = start + (end - start) * t[..., None]
    cell = int(rng.integers(8, 33))
    coarse = rng.normal(0, 18, size=(height // cell + 1, width // cell + 1, 3)).astype(np.float32)
    pixels += np.kron(coarse, np.ones((cell, cell, 1), dtype=np.float32))[:height, :width]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """Random rectangles, ellipses, polygons and lines in random colours."""
    for _ in range(int(rng.integers(3, 11))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, y0 = int(rng.integers(-20, width)), int(rng.integers(-20, height))
        x1, y1 = x0 + int(rng.integers(8, 120)), y0 + int(rng.integers(8, 120))
        kind = int(rng.integers(4))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 2:
            points = [(int(rng.integers(x0, x1)), int(rng.integers(y0, y1))) for _ in range(3)]
            draw.polygon(points, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 6)))


def _place_face(rng: np.random.Generator, params: SyntheticParams, taken: list[Box]) -> Box | None:
    """A face box that keeps a 4 px gap to every box in ``taken``; None after 50 failed tries."""
    width, height = params.image_size
    min_face, max_face = params.face_size
    gap = 4
    for _ in range(50):
        h = int(rng.integers(min_face, max_face + 1))
        w = max(8, round(h * rng.uniform(0.72, 0.86)))
        x1, y1 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        box = (x1, y1, x1 + w, y1 + h)
        if all(
            box[2] + gap <= b[0] or b[2] + gap <= box[0] or box[3] + gap <= b[1] or b[3] + gap <= box[1]
            for b in taken
        ):
            return box
    return None


def _draw_face(rng: np.random.Generator, draw: ImageDraw.ImageDraw, box: Box, name: str) -> None:
    """Draw a face filling ``box``; ``name`` decides whether and where the mask sits."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx = x1 + w / 2

    def fx(u: float) -> int:  # fraction of the width -> pixel column inside the box
        return int(round(x1 + u * (w - 1)))

    def fy(v: float) -> int:  # fraction of the height -> pixel row inside the box
        return int(round(y1 + v * (h - 1)))

    skin = _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))]
    skin_rgb = _jitter(rng, skin, 10)
    outline = tuple(int(c * 0.55) for c in skin_rgb)
    draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=skin_rgb, outline=outline, width=max(1, h // 40))
    if rng.random() < 0.8:  # hair: the top cap of the face ellipse
        hair = _jitter(rng, _HAIR_COLOURS[int(rng.integers(len(_HAIR_COLOURS)))], 12)
        draw.chord((x1, y1, x2 - 1, fy(rng.uniform(0.45, 0.6))), 180, 360, fill=hair)

    eye_y, eye_r = fy(0.38), max(2, round(0.065 * h))
    for u in (0.3, 0.7):
        ex = fx(u)
        draw.ellipse((ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r), fill=(250, 250, 250), outline=(20, 20, 20))
        pr = max(1, round(eye_r * 0.55))
        draw.ellipse((ex - pr, eye_y - pr, ex + pr, eye_y + pr), fill=(15, 15, 25))

    nose_half = max(2, round(0.1 * w))
    draw.polygon([(round(cx), fy(0.47)), (round(cx) - nose_half, fy(0.62)), (round(cx) + nose_half, fy(0.62))],
                 fill=_jitter(rng, _NOSE_COLOUR, 10))
    mouth_h = max(2, round(0.06 * h))
    draw.ellipse((fx(0.3), fy(0.76) - mouth_h, fx(0.7), fy(0.76) + mouth_h), fill=_jitter(rng, _MOUTH_COLOUR, 15))

    if name == "without_mask":
        return
    top = 0.46 if name == "with_mask" else 0.66
    top += rng.uniform(-0.015, 0.015)
    mask_rgb = _jitter(rng, _MASK_COLOURS[int(rng.integers(len(_MASK_COLOURS)))], 12)
    edge = tuple(int(c * 0.6) for c in mask_rgb)
    mask = (fx(0.1), fy(top), fx(0.9), fy(0.96))
    for ear, corner in ((0.0, 0.1), (1.0, 0.9)):  # ear straps
        draw.line((fx(ear), fy(0.42), fx(corner), fy(top + 0.05)), fill=edge, width=max(1, h // 30))
    draw.rounded_rectangle(mask, radius=max(2, round(0.12 * h)), fill=mask_rgb, outline=edge, width=max(1, h // 40))
    for v in np.linspace(top + 0.08, 0.88, 3):  # pleats
        draw.line((fx(0.16), fy(v), fx(0.84), fy(v)), fill=edge, width=1)


def _voc_xml(filename: str, image_size: tuple[int, int], objects: list[tuple[str, Box]]) -> bytes:
    """The annotation in the Kaggle file's tag layout (integers; xmax/ymax exclusive edges)."""
    root = etree.Element("annotation")
    etree.SubElement(root, "folder").text = "images"
    etree.SubElement(root, "filename").text = filename
    size = etree.SubElement(root, "size")
    for tag, value in (("width", image_size[0]), ("height", image_size[1]), ("depth", 3)):
        etree.SubElement(size, tag).text = str(value)
    etree.SubElement(root, "segmented").text = "0"
    for name, (x1, y1, x2, y2) in objects:
        obj = etree.SubElement(root, "object")
        etree.SubElement(obj, "name").text = name
        etree.SubElement(obj, "pose").text = "Unspecified"
        for tag in ("truncated", "occluded", "difficult"):
            etree.SubElement(obj, tag).text = "0"
        bndbox = etree.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x1), ("ymin", y1), ("xmax", x2), ("ymax", y2)):
            etree.SubElement(bndbox, tag).text = str(value)
    return etree.tostring(root, pretty_print=True)
