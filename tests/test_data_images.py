"""Every pixel flavour decodes to 8-bit RGB with the expected values."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distdet.data import DataError, load_rgb, read_image_size

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (6, 5), dtype=np.uint8)


def check(path: Path, expected: np.ndarray) -> None:
    image = load_rgb(path)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.dtype == np.uint8 and pixels.shape == (6, 5, 3)
    np.testing.assert_array_equal(pixels, expected)
    assert read_image_size(path) == (5, 6)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    alpha = RNG.integers(0, 256, (6, 5, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([RGB, alpha], axis=2), "RGBA").save(tmp_path / "a.png")
    check(tmp_path / "a.png", RGB)


def test_sixteen_bit_rgba_keeps_the_high_byte(tmp_path: Path) -> None:
    # A 16-bit RGBA PNG written by hand (Pillow cannot write one): samples v * 257 + 3.
    wide = (np.concatenate([RGB, np.full((6, 5, 1), 255, np.uint8)], axis=2).astype(np.uint16) * 257 + 3).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in wide)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    (tmp_path / "w.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 6, 16, 6, 0, 0, 0))
                                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    check(tmp_path / "w.png", RGB)


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.fromarray(RGB).quantize(16)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    check(tmp_path / "p.png", np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey(tmp_path: Path, mode: str) -> None:
    image = Image.fromarray(GREY, "L")
    if mode == "LA":
        image = Image.merge("LA", [image, Image.fromarray(GREY[::-1].copy(), "L")])
    image.save(tmp_path / "g.png")
    check(tmp_path / "g.png", np.repeat(GREY[:, :, None], 3, axis=2))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    wide = GREY.astype(np.uint16) * 257 + 100  # full 16-bit range
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    check(tmp_path / "g16.png", np.repeat((wide >> 8).astype(np.uint8)[:, :, None], 3, axis=2))


def test_jpeg_cmyk(tmp_path: Path) -> None:
    image = Image.fromarray(RGB).convert("CMYK")
    image.save(tmp_path / "c.jpg", quality=95)
    check(tmp_path / "c.jpg", np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")))


def test_other_formats_are_not_decoded(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "x.png", format="BMP")  # a BMP named .png
    with pytest.raises(DataError, match="not a readable PNG/JPEG image"):
        load_rgb(tmp_path / "x.png")
