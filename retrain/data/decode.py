"""Decoding image files into RGB pixels, robust to the photos real folders contain.

Pillow decodes (it copes with more than TensorFlow's decoders: CMYK and progressive JPEGs, 16-bit
and palette PNGs, WebP, EXIF orientation) and guards memory with a decompression-bomb limit.
This module imports no TensorFlow, so label-image can use it for a fast cold start.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrain.config import DEFAULT_MAX_IMAGE_PIXELS
from retrain.errors import setting_name

# Truncated files must fail, not come back with a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(Exception):
    """An image file that cannot be used; the message says why, without the path."""


def decode_image(
    path: str | os.PathLike,
    min_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode an image file into a uint8 array [height, width, 3], upright per its EXIF.

    `min_size` (height, width) lets JPEG decoding scale down by DCT (much faster for large
    photos) while keeping at least that many pixels in each direction. Animated images give
    their first frame; transparency is composited on white. Raises ImageDecodeError.
    """
    try:
        with open(path, "rb") as handle:
            return _decode(handle, min_size, max_pixels)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"image too large ({err}); see {_max_pixels_setting()}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image file, or an unsupported format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err) or type(err).__name__
        if "truncated" in text.lower() or isinstance(err, EOFError):
            text = "truncated image file"
        raise ImageDecodeError(f"cannot decode: {text}") from None
    except MemoryError:
        raise ImageDecodeError("not enough memory to decode") from None


def skip_reason(err: BaseException) -> str:
    """Why an image is skipped, in one line without its path, given the error that reading or
    decoding it raised: an ImageDecodeError's own message; ``cannot read: <why>`` for an
    OSError (decode_image turns its own into ImageDecodeErrors, so this is from reading the
    file elsewhere); ``cannot decode: <type>: <message>`` for anything else (a decoder's bug).
    """
    if isinstance(err, ImageDecodeError):
        return str(err)
    if isinstance(err, OSError):
        return f"cannot read: {err.strerror or err}"
    return f"cannot decode: {type(err).__name__}: {err}"


def _max_pixels_setting() -> str:
    """The setting that raises the pixel limit, as this process names it (see retrain.errors)."""
    return setting_name("data.max_image_pixels")


def _decode(handle, min_size, max_pixels: int) -> np.ndarray:
    if os.fstat(handle.fileno()).st_size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            image = Image.open(handle)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large ({width}x{height} pixels > {max_pixels}); "
                    f"see {_max_pixels_setting()}"
                )
            if width < 1 or height < 1:
                raise ImageDecodeError(f"image has no pixels ({width}x{height})")
            if min_size is not None and image.format == "JPEG":
                # draft() picks the largest DCT scale that keeps both sides >= the request;
                # the request is in (width, height) and must account for a 90-degree EXIF turn.
                h, w = min_size
                side = max(h, w)
                image.draft("RGB", (side, side))
            image.load()
        except Image.DecompressionBombWarning as err:
            raise Image.DecompressionBombError(str(err)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    ImageOps.exif_transpose(image, in_place=True)  # not a copy of every upright photo
    return to_rgb_array(image)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any Pillow image mode to an RGB uint8 array."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.uint32 if mode == "I" else np.uint16)
        top = max(int(array.max()), 1)
        # 16-bit data spans 0..65535; 32-bit 'I' images carry their own range.
        scale = 65535 if mode != "I" and top > 255 else max(top, 255)
        gray = (array.astype(np.float64) * (255.0 / scale)).round().clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        gray = np.clip(array, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)
