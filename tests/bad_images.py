"""Generators for every kind of awkward or broken image file a real folder may hold."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import write_image


def _jpeg_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    ).save(buffer, "JPEG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def make_bad_files(folder: Path) -> dict[str, str]:
    """Write one file per bad kind into `folder`; returns {file name: 'skip' | 'ok'}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    (folder / "zero_bytes.jpg").write_bytes(b"")
    expected["zero_bytes.jpg"] = "skip"
    (folder / "truncated.jpg").write_bytes(_jpeg_bytes()[:400])
    expected["truncated.jpg"] = "skip"
    (folder / "text_file.jpg").write_text("this is not an image\n")
    expected["text_file.jpg"] = "skip"
    (folder / "bomb.png").write_bytes(png_header_only(20000, 20000))
    expected["bomb.png"] = "skip"
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    (folder / "tiff_named.png").write_bytes(tiff.getvalue())  # a format we do not promise
    expected["tiff_named.png"] = "ok"  # Pillow reads TIFF, so it is used
    write_image(folder / "cmyk.jpg", mode="CMYK", fmt="JPEG")
    expected["cmyk.jpg"] = "ok"
    write_image(folder / "gray.jpg", mode="L", fmt="JPEG")
    expected["gray.jpg"] = "ok"
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(
        folder / "sixteen_bit.png"
    )
    expected["sixteen_bit.png"] = "ok"
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 16, 16))
    palette.info["transparency"] = 0
    palette.save(folder / "palette_transparent.png", transparency=0)
    expected["palette_transparent.png"] = "ok"
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    expected["animated.gif"] = "ok"
    rotated = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(folder / "exif_rotated.jpg", exif=exif)
    expected["exif_rotated.jpg"] = "ok"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "one_pixel.png")
    expected["one_pixel.png"] = "ok"
    write_image(folder / "rgba.webp", fmt="WEBP")
    expected["rgba.webp"] = "ok"
    return expected
