"""Open untrusted image files safely and convert every pixel flavour to 8-bit RGB.

Defences: only PNG and JPEG decoders are allowed; the pixel count is checked from the header
before any pixel is decoded (decompression bombs); truncated or corrupt files raise
:class:`DataError` naming the file instead of an exception from deep inside Pillow.

Conversion matches ``Image.open(p).convert("RGB")`` for the modes Pillow converts faithfully
(RGB, RGBA and 16-bit RGBA, which Pillow already reduces to 8 bits, palette, L, LA, CMYK ...);
alpha is dropped, not composited. 16-bit greyscale (``I;16*``, ``I``) is scaled by 1/256,
because Pillow's own conversion would clip every value above 255 to white. EXIF orientation
is not applied: VOC boxes refer to the pixels as stored.
"""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from distdet.data.files import stat_regular_file
from distdet.data.problems import DataError, ProblemKind

#: Pillow decoders that may open dataset images.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG")
#: File suffixes recognised as images (compared lower-case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
#: Largest image accepted, in pixels (the real images are about 0.1 megapixels).
MAX_PIXELS = 50_000_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


def _is_regular(path: Path) -> bool:
    try:
        stat_regular_file(path, "image")
    except DataError:
        return False
    return True


def _open(path: Path, max_pixels: int) -> Image.Image:
    stat_regular_file(path, "image", stat_error=ProblemKind.UNREADABLE_IMAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path, formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError.single(ProblemKind.IMAGE_TOO_LARGE, path, f"refused as a decompression bomb: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise DataError.single(ProblemKind.UNREADABLE_IMAGE, path, f"not a readable PNG/JPEG image: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        image.close()
        raise DataError.single(
            ProblemKind.IMAGE_TOO_LARGE, path,
            f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
        )
    return image


def _png_header_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR chunk (always the first chunk), or None if not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def read_image_size(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Return ``(width, height)`` from the file header without decoding pixels.

    PNG sizes come straight from the IHDR chunk (cheap: no ICC/EXIF chunk processing); other
    files are opened with Pillow, which reads only their header. Pixel data is checked later,
    by :func:`load_rgb`. Raises :class:`DataError` for unreadable files and oversized images.
    """
    path = Path(path)
    size = _png_header_size(path) if _is_regular(path) else None
    if size is None:
        with _open(path, max_pixels) as image:
            return image.size
    width, height = size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise DataError.single(
            ProblemKind.IMAGE_TOO_LARGE, path,
            f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
        )
    return size


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_GREY:
        grey = np.asarray(image).astype(np.int64)
        grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image fully and return it as an 8-bit RGB Pillow image.

    Raises :class:`DataError` (kinds ``image_too_large``, ``truncated_image``,
    ``unreadable_image``) naming the file when it cannot be decoded completely.
    """
    path = Path(path)
    with _open(path, max_pixels) as image:
        try:
            image.load()
            rgb = _to_rgb(image)
        except _DECODE_ERRORS as exc:
            text = str(exc)
            kind = ProblemKind.TRUNCATED_IMAGE if "truncated" in text.lower() else ProblemKind.UNREADABLE_IMAGE
            what = "truncated image data" if kind is ProblemKind.TRUNCATED_IMAGE else "cannot decode image"
            raise DataError.single(kind, path, f"{what} ({image.format} {image.mode}): {text}") from None
        if rgb is image:
            rgb = image.copy()
    return rgb
