"""Fuzzed images: a seeded corpus of mutated real JPEG, PNG, GIF, WebP and BMP files (see
tests/fuzz_images.py) through scanning, decoding and extraction. No file crashes or hangs a
run or blows up its memory; every file is used or skipped with a reason.

The default suite runs 100 files (every format and mutation); the slow suite 1,000. Set
RETRAIN_FUZZ_SEED to replay another corpus.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from tests.conftest import EXAMPLE_DIR
from tests.fuzz_images import FORMATS, MUTATIONS, decode_in_child, make_corpus, write_corpus

SEED = int(os.environ.get("RETRAIN_FUZZ_SEED", "20261201"))
# Each file's decoding: the largest declared size the default limit lets through (90 MP of
# blank GIF) takes about 2 s on a loaded 2-core machine.
SECONDS_PER_FILE = 10.0
# Peak memory of the decoding process: 100 MP (--max_image_pixels) in RGB and its copies.
PEAK_MB = 1500
COUNTS = [100, pytest.param(1000, marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=COUNTS, ids=lambda n: f"{n}_files")
def corpus(request, tmp_path_factory):
    photos = sorted(EXAMPLE_DIR.glob("*/*.jpg"))[::4]  # 20 photos of all five classes
    files = make_corpus(photos, request.param, SEED)
    folder = tmp_path_factory.mktemp("fuzz")
    paths = write_corpus(files, folder / "corpus")
    report = decode_in_child(paths, folder, timeout=60 + request.param * 0.5)
    return files, paths, report


def test_every_format_and_mutation_is_in_the_corpus(corpus):
    files, _, report = corpus
    kinds = Counter((f.fmt, f.mutation) for f in files)
    assert set(kinds) == {(fmt, m) for fmt in FORMATS for m in MUTATIONS}
    assert min(kinds.values()) >= len(files) // 25
    decoded = {files[o["i"]].fmt for o in report.outcomes if o["ok"]}
    assert decoded == set(FORMATS)  # the mutations leave some of each format usable


def test_fuzzed_files_decode_or_fail_with_a_reason_in_bounded_time_and_memory(corpus):
    files, _, report = corpus
    print(f"seed {SEED}, peak {report.peak_mb:.0f} MB")
    assert [o["i"] for o in report.outcomes] == list(range(len(files)))
    for outcome in report.outcomes:
        name = files[outcome["i"]].name
        assert outcome["seconds"] < SECONDS_PER_FILE, (name, outcome)
        if outcome["ok"]:
            height, width, channels = outcome["shape"]
            assert height >= 1 and width >= 1 and channels == 3, (name, outcome)
        else:
            assert outcome["type"] == "ImageDecodeError", (name, outcome)
            assert outcome["reason"].strip() and "\n" not in outcome["reason"], (name, outcome)
    assert report.peak_mb < PEAK_MB


def test_fuzzed_files_are_scanned_and_extracted_or_skipped_with_their_reason(corpus, tmp_path):
    from retrain.bottlenecks import extract
    from retrain.bottlenecks.cache import BottleneckCache
    from retrain.data import scan

    files, paths, report = corpus
    image_set = scan.scan_image_dir(paths[0].parent.parent, 10, 10)
    assert sorted(image_set.labels) == sorted(FORMATS)
    assert sorted(image_set.paths) == sorted(str(p) for p in paths)

    cache = BottleneckCache(tmp_path, "m", 3)
    found = extract.lookup(image_set.paths, cache)
    assert not found.skipped  # every file can be read and hashed
    stats = extract.extract_missing(
        image_set.paths,
        found,
        cache,
        lambda images: images.numpy().mean(axis=(1, 2)),  # cheap: the pipeline is under test
        extract.DecodedBatches((32, 32), batch_size=64),
    )
    failed = {str(paths[o["i"]]) for o in report.outcomes if not o["ok"]}
    skipped = {image_set.paths[i]: reason for i, reason in found.skipped.items()}
    assert set(skipped) == failed  # exactly the files the decoder rejects, each with a reason
    assert all(reason.strip() for reason in skipped.values())
    assert stats.computed == len(paths) - len(failed)
    kept = np.flatnonzero(found.cached())
    assert len(kept) == stats.computed
    vectors, ok = cache.read(found.locations[kept])
    assert ok.all() and np.isfinite(vectors).all()


def test_resizing_uint8_pixels_matches_resizing_a_float_copy_bit_for_bit():
    """to_module_input resizes the decoded uint8 pixels without a full-size float32 copy (a
    90 MP image would need 1 GB more); the vectors in existing caches stay valid only if the
    result is the same to the bit as resizing a float32 copy, as it did before."""
    import tensorflow as tf

    from retrain.data.decode import decode_image
    from retrain.data.preprocess import to_module_input

    rng = np.random.default_rng(SEED)
    images = [decode_image(p, (224, 224)) for p in sorted(EXAMPLE_DIR.glob("*/*.jpg"))[:20]]
    images += [rng.integers(0, 256, (*rng.integers(1, 700, 2), 3), np.uint8) for _ in range(20)]
    for image in images:
        before = tf.image.resize(tf.cast(image, tf.float32), (224, 224), method="bilinear") / 255
        np.testing.assert_array_equal(to_module_input(image, (224, 224)).numpy(), before.numpy())
