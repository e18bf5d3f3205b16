"""Distortions (retrain.py's four flags): their geometry on batches, cached copies, on-the-fly
training, and the head-training options that come with them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

import retrain
from retrain.bottlenecks import distort
from retrain.config import (
    CacheConfig,
    DistortionConfig,
    HeadTrainingConfig,
    ModuleConfig,
    OutputsConfig,
    RetrainConfig,
)
from tests.conftest import write_image
from tests.fault_tools import save_tiny_module

SIZE = (8, 8)


def quadrants(size: int = 16) -> np.ndarray:
    """One float image [1, size, size, 3]: red, green, blue and white quadrants."""
    image = np.zeros((size, size, 3), np.float32)
    half = size // 2
    image[:half, :half] = (1, 0, 0)
    image[:half, half:] = (0, 1, 0)
    image[half:, :half] = (0, 0, 1)
    image[half:, half:] = (1, 1, 1)
    return image[None]


def params(scale=0.0, top=0.0, left=0.0, flip=0.9, brightness=0.5) -> tf.Tensor:
    return tf.constant([[scale, top, left, flip, brightness]], tf.float32)


def run(image, settings, p, size=SIZE) -> np.ndarray:
    return distort.distort_batch(tf.constant(image), p, settings, size).numpy()[0]


def test_no_distortion_is_a_plain_resize():
    image = quadrants(8)
    np.testing.assert_allclose(run(image, DistortionConfig(), params()), image[0], atol=1e-6)


def test_largest_crop_takes_a_quarter_where_the_box_says():
    settings = DistortionConfig(random_crop=100)  # scale 2: a box of half the height and width
    assert distort.source_size(settings, SIZE) == (16, 16)
    top_left = run(quadrants(), settings, params(top=0.0, left=0.0))
    bottom_right = run(quadrants(), settings, params(top=1.0, left=1.0))
    np.testing.assert_allclose(top_left, np.broadcast_to([1, 0, 0], (*SIZE, 3)), atol=1e-6)
    np.testing.assert_allclose(bottom_right, np.ones((*SIZE, 3)), atol=1e-6)


def test_scale_varies_the_box_between_its_bounds():
    settings = DistortionConfig(random_scale=100)  # scale in [1, 2]
    whole = run(quadrants(), settings, params(scale=0.0))
    half = run(quadrants(), settings, params(scale=1.0))
    assert len(np.unique(whole.reshape(-1, 3), axis=0)) >= 4  # all four quadrants
    np.testing.assert_allclose(half, np.broadcast_to([1, 0, 0], (*SIZE, 3)), atol=1e-6)


def test_flip_and_brightness():
    image = quadrants(8)
    flipped = run(image, DistortionConfig(flip_left_right=True), params(flip=0.1))
    kept = run(image, DistortionConfig(flip_left_right=True), params(flip=0.9))
    np.testing.assert_allclose(flipped, image[0, :, ::-1], atol=1e-6)
    np.testing.assert_allclose(kept, image[0], atol=1e-6)
    darker = run(image * 0.5, DistortionConfig(random_brightness=50), params(brightness=0.0))
    brighter = run(image, DistortionConfig(random_brightness=50), params(brightness=1.0))
    np.testing.assert_allclose(darker, image[0] * 0.25, atol=1e-6)
    assert brighter.max() == 1.0  # clipped: still a valid image


def test_a_copy_does_not_depend_on_its_batch(tmp_path):
    paths = [
        write_image(tmp_path / f"{i}.png", size=(40, 30), color=(60 * i, 90, 200)) for i in range(3)
    ]
    settings = DistortionConfig(True, 20, 20, 20)
    keys = [distort.copy_key(b"k" * 16, settings, i) for i in range(3)]
    assert len(set(keys)) == 3 and all(len(key) == 16 for key in keys)
    p = distort.copy_params(keys)
    batches = [
        np.concatenate(
            [
                images.numpy()
                for _, images, _ in distort.distorted_batches(paths, p, settings, SIZE, size, {})
            ]
        )
        for size in (1, 3)
    ]
    np.testing.assert_array_equal(batches[0], batches[1])
    assert not np.array_equal(batches[0][0], batches[0][1])


def test_recipes_differ_by_every_setting():
    ids = {
        distort.distortion_id(settings)
        for settings in (
            DistortionConfig(flip_left_right=True),
            DistortionConfig(random_crop=10),
            DistortionConfig(random_scale=10),
            DistortionConfig(random_brightness=10),
            DistortionConfig(random_crop=20),
        )
    }
    assert len(ids) == 5
    assert distort.distortion_id(
        DistortionConfig(random_crop=10, copies=5)
    ) == distort.distortion_id(DistortionConfig(random_crop=10, copies=1))


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "module"
    save_tiny_module(path)
    return path


@pytest.fixture
def colours(tmp_path):
    for i in range(10):
        write_image(tmp_path / "images" / "red" / f"r{i}.png", color=(200 + i, 20, 20))
        write_image(tmp_path / "images" / "blue" / f"b{i}.png", color=(20, 20, 200 + i))
    return tmp_path / "images"


def config_for(colours, tmp_path, tiny_module, distortions, steps=20, **training):
    return RetrainConfig(
        image_dir=str(colours),
        data=retrain.DataConfig(testing_percentage=0, validation_percentage=0),
        module=ModuleConfig(handle=str(tiny_module), extraction_backend="tensorflow"),
        cache=CacheConfig(bottleneck_dir=str(tmp_path / "bottlenecks")),
        training=HeadTrainingConfig(how_many_training_steps=steps, train_batch_size=8, **training),
        distortions=distortions,
        outputs=OutputsConfig(metrics_json=str(tmp_path / "metrics.json")),
    )


def test_cached_copies_are_computed_once_per_recipe(colours, tmp_path, tiny_module):
    copies = DistortionConfig(flip_left_right=True, random_crop=10, copies=2)
    first = retrain.run(config_for(colours, tmp_path, tiny_module, copies))
    assert first.distortions == {
        "mode": "cached copies",
        "copies_per_image": 2,
        "vectors": 40,
        "computed": 40,
        "reused": 0,
        "seconds": first.distortions["seconds"],
    }
    again = retrain.run(config_for(colours, tmp_path, tiny_module, copies))
    assert (again.bottlenecks_computed, again.distortions["computed"]) == (0, 0)
    assert again.distortions["reused"] == 40
    assert json.loads((tmp_path / "metrics.json").read_text())["distortions"]["reused"] == 40
    np.testing.assert_allclose(again.head.weights, first.head.weights, rtol=1e-5, atol=1e-7)
    other = DistortionConfig(flip_left_right=True, random_crop=20, copies=3)
    third = retrain.run(config_for(colours, tmp_path, tiny_module, other))
    assert (third.distortions["computed"], third.distortions["reused"]) == (60, 0)


def test_copies_differ_from_their_original(colours, tmp_path, tiny_module):
    from retrain.bottlenecks.stage import LazyModule, compute_bottlenecks, load_module
    from retrain.data.scan import scan_image_dir

    image_set = scan_image_dir(colours, 0, 0)
    settings = ModuleConfig(handle=str(tiny_module), extraction_backend="tensorflow")
    module = load_module(settings)
    b = compute_bottlenecks(
        image_set,
        module,
        LazyModule(module),
        tmp_path / "b",
        settings,
        10**8,
        distortions=DistortionConfig(random_brightness=50, copies=1),
    )
    train = b.training()
    assert len(train) == 40
    vectors = train.load().x
    originals, copies = vectors[:20], vectors[20:]
    np.testing.assert_array_equal(train.y[20:], b.labels[b.copies.rows])
    assert np.abs(originals[b.copies.rows] - copies).max() > 1e-3  # brightness moved them


def test_training_on_the_fly(colours, tmp_path, tiny_module):
    result = retrain.run(
        config_for(colours, tmp_path, tiny_module, DistortionConfig(flip_left_right=True), steps=30)
    )
    assert result.distortions == {"mode": "on the fly", "vectors": 240, "computed": 240}
    assert result.head.history[-1]["train_accuracy"] >= 0.75


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "momentum"},
        {"optimizer": "adam", "learning_rate": 0.01, "lr_schedule": "cosine"},
        {"optimizer": "rmsprop", "learning_rate": 0.01, "lr_schedule": "plateau"},
        {"label_smoothing": 0.1, "dropout_rate": 0.3, "weight_decay": 0.01},
    ],
)
def test_head_training_options_learn(options):
    from retrain.bottlenecks.splits import Split
    from retrain.heads.head import SoftmaxHead
    from retrain.training.head import train_head

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = (rng.normal(size=(3, 16))[y] * 3 + rng.normal(size=(300, 16))).astype(np.float32)
    settings = HeadTrainingConfig(how_many_training_steps=200, **{"learning_rate": 0.1, **options})
    result = train_head(Split(x[:250], y[:250]), Split(x[250:], y[250:]), SoftmaxHead(3), settings)
    assert result.history[-1]["validation_accuracy"] >= 0.9


def test_plateau_lowers_the_rate_only_without_progress():
    from retrain.training.optim import Plateau, make_optimizer

    optimizer = make_optimizer("sgd", 1.0)
    plateau = Plateau(optimizer, factor=0.5, patience=2)
    for loss in (3.0, 2.0, 2.5, float("nan"), 2.4):
        plateau.update(loss)
    assert float(optimizer.learning_rate) == 0.5  # 2.5 and 2.4 did not beat 2.0; NaN ignored
    plateau.update(1.0)
    assert float(optimizer.learning_rate) == 0.5


def test_label_smoothing_targets():
    from retrain.heads.head import SoftmaxHead

    targets = SoftmaxHead(4).targets(tf.constant([1]), smoothing=0.2).numpy()
    np.testing.assert_allclose(targets, [[0.05, 0.85, 0.05, 0.05]])
