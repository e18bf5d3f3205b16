"""The SavedModel's in-graph decoding (retrain.export.graph_decode) against Pillow's
(retrain.data.decode):
the same module input, bit for bit, for JPEG (at every DCT scale draft mode picks), PNG, GIF and
BMP made from a real photo."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from retrain.data.decode import decode_image
from retrain.data.preprocess import to_module_input
from retrain.export import graph_decode
from tests.conftest import EXAMPLE_DIR

SIZE = (224, 224)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(sorted((EXAMPLE_DIR / "roses").glob("*.jpg"))[0]).convert("RGB")


@pytest.mark.parametrize(
    ("fmt", "size"),
    [
        ("JPEG", None),  # the photo as it is: no DCT scaling
        ("JPEG", (500, 460)),  # 1/2
        ("JPEG", (1000, 900)),  # 1/4
        ("JPEG", (2000, 1800)),  # 1/8
        ("JPEG", (700, 230)),  # one side too short to scale
        ("PNG", None),
        ("GIF", None),
        ("BMP", None),
    ],
)
def test_in_graph_decoding_matches_pillow(photo, tmp_path, fmt, size):
    path = tmp_path / f"photo.{fmt.lower()}"
    (photo.resize(size, Image.BICUBIC) if size else photo).save(path, format=fmt)
    expected = to_module_input(decode_image(path, SIZE)[None], SIZE).numpy()[0]
    got = graph_decode.decode_to_input(tf.constant(path.read_bytes()), SIZE).numpy()
    assert got.shape == (*SIZE, 3)
    np.testing.assert_array_equal(got, expected)


def test_bytes_that_do_not_decode_raise():
    with pytest.raises(tf.errors.InvalidArgumentError):
        graph_decode.decode_to_input(tf.constant(b"not an image"), SIZE)
