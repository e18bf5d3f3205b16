import struct

import numpy as np
import pytest
from PIL import Image

from retrain.data.decode import ImageDecodeError, decode_image, skip_reason
from tests.bad_images import make_bad_files, png_header_only
from tests.conftest import write_image


def test_every_bad_kind_is_decoded_or_rejected_with_a_reason(tmp_path):
    expected = make_bad_files(tmp_path)
    for name, outcome in expected.items():
        if outcome == "ok":
            pixels = decode_image(tmp_path / name)
            assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, name
        else:
            with pytest.raises(ImageDecodeError) as err:
                decode_image(tmp_path / name)
            assert str(err.value), name


def test_reasons_name_the_problem(tmp_path):
    make_bad_files(tmp_path)
    reasons = {}
    for name in ("zero_bytes.jpg", "truncated.jpg", "text_file.jpg", "bomb.png"):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(tmp_path / name)
        reasons[name] = str(err.value)
    assert "empty" in reasons["zero_bytes.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["text_file.jpg"]
    assert "too large" in reasons["bomb.png"] and "max_image_pixels" in reasons["bomb.png"]


def test_pixel_limit_is_configurable(tmp_path):
    path = write_image(tmp_path / "a.png", size=(100, 100))
    assert decode_image(path, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(path, max_pixels=9_999)
    (tmp_path / "big.png").write_bytes(png_header_only(30000, 30000))
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(tmp_path / "big.png")  # rejected from its header, before any allocation


def test_exif_orientation_is_applied(tmp_path):
    make_bad_files(tmp_path)
    assert decode_image(tmp_path / "exif_rotated.jpg").shape[:2] == (40, 20)


def test_transparency_composited_on_white_and_first_gif_frame(tmp_path):
    make_bad_files(tmp_path)
    pixels = decode_image(tmp_path / "palette_transparent.png")
    assert tuple(pixels[0, 0]) == (0, 255, 0)  # opaque palette entry 1
    assert tuple(pixels[-1, -1]) == (255, 255, 255)  # transparent -> white
    first = decode_image(tmp_path / "animated.gif")
    assert first[0, 0, 0] > 200 and first[0, 0, 2] < 50  # red frame, not blue


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    make_bad_files(tmp_path)
    pixels = decode_image(tmp_path / "sixteen_bit.png")
    assert pixels.max() > 200 and pixels.min() == 0


def test_jpeg_draft_keeps_at_least_the_requested_size(tmp_path):
    Image.fromarray(np.zeros((1200, 1600, 3), np.uint8)).save(tmp_path / "big.jpg")
    pixels = decode_image(tmp_path / "big.jpg", min_size=(224, 224))
    assert min(pixels.shape[:2]) >= 224 and pixels.shape[0] < 1200


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ImageDecodeError("empty file (0 bytes)"), "empty file (0 bytes)"),
        (
            FileNotFoundError(2, "No such file or directory", "a.jpg"),
            "cannot read: No such file or directory",
        ),
        (PermissionError(13, "Permission denied"), "cannot read: Permission denied"),
        (OSError("disk on fire"), "cannot read: disk on fire"),
        (
            struct.error("unpack requires a buffer"),
            "cannot decode: error: unpack requires a buffer",
        ),
        (KeyError("mode"), "cannot decode: KeyError: 'mode'"),
    ],
)
def test_skip_reasons(error, reason):
    assert skip_reason(error) == reason


def test_skip_reason_of_a_bad_file_is_decode_images_message(tmp_path):
    for name, outcome in make_bad_files(tmp_path).items():
        if outcome == "skip":
            with pytest.raises(ImageDecodeError) as err:
                decode_image(tmp_path / name)
            assert skip_reason(err.value) == str(err.value)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(tmp_path / "missing.jpg")  # decode_image's own OSErrors are decode errors
    assert skip_reason(err.value).startswith("cannot decode: ")
