"""Optimizers and learning-rate schedules, shared by head training and fine-tuning.

They are Keras' own (tf_keras: its optimizers take plain and distributed variables and run
inside XLA-compiled loops): SGD, SGD with momentum 0.9, Adam and RMSprop; a cosine decay over the
run; and `Plateau`, Keras' ReduceLROnPlateau as graph ops, so head training can lower its rate
between evaluations without leaving its compiled loop.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from retrain.utils.runtime import UNUSED_BY_TF_KERAS, hidden_modules

MOMENTUM = 0.9


def make_optimizer(
    name: str,
    learning_rate: float,
    schedule: str = "constant",
    total_steps: int = 1,
    weight_decay: float = 0.0,
) -> Any:
    """A tf_keras optimizer `name` (config.OPTIMIZERS) at `learning_rate`, decayed along a
    cosine over `total_steps` if `schedule` is "cosine" ("constant" and "plateau" start
    constant). `weight_decay` is Keras' decoupled decay (each step, w -= rate * decay * w);
    call `exclude_from_weight_decay` for the variables it must spare. Plain "sgd" at a
    constant or plateau rate without decay (the default) is `GradientDescent`, which makes the
    same steps without importing tf_keras."""
    if name == "sgd" and schedule != "cosine" and not weight_decay:
        return GradientDescent(learning_rate)
    with hidden_modules(*UNUSED_BY_TF_KERAS):
        import tf_keras  # Keras 2's optimizers take plain and distributed tf.Variables

    rate: Any = learning_rate
    if schedule == "cosine":
        rate = tf_keras.optimizers.schedules.CosineDecay(learning_rate, max(1, total_steps))
    options = {"weight_decay": weight_decay} if weight_decay else {}
    if name == "sgd":
        return tf_keras.optimizers.SGD(rate, **options)
    if name == "momentum":
        return tf_keras.optimizers.SGD(rate, momentum=MOMENTUM, **options)
    if name == "adam":
        return tf_keras.optimizers.Adam(rate, **options)
    if name == "rmsprop":
        return tf_keras.optimizers.RMSprop(rate, **options)
    raise ValueError(f"unknown optimizer {name!r}")


class GradientDescent(tf.Module):
    """w -= rate * gradient, by TensorFlow's own kernel (ResourceApplyGradientDescent), the
    same steps as tf_keras' SGD without its import (0.4 s of a default run's 11 s, 2 cores).
    Its variables carry tf_keras' checkpoint names, so a checkpoint of either resumes in the
    other. Takes plain variables only (head training), not distributed ones."""

    def __init__(self, learning_rate: float):
        super().__init__(name="SGD")
        self._learning_rate = tf.Variable(
            learning_rate, dtype=tf.float32, trainable=False, name="learning_rate"
        )
        self._iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iteration")

    @property
    def learning_rate(self) -> tf.Variable:
        return self._learning_rate

    @property
    def iterations(self) -> tf.Variable:
        return self._iterations

    def build(self, var_list: list) -> None:
        """Nothing to build: plain gradient descent keeps no slots (tf_keras' interface)."""

    def exclude_from_weight_decay(self, var_list: list | None = None) -> None:
        """Nothing to exclude: no weight decay (tf_keras' interface)."""

    def apply_gradients(self, grads_and_vars) -> None:
        """One step for each (gradient, variable) pair."""
        for gradient, variable in grads_and_vars:
            tf.raw_ops.ResourceApplyGradientDescent(
                var=variable.handle,
                alpha=tf.cast(self._learning_rate, variable.dtype),
                delta=gradient,
            )
        self._iterations.assign_add(1)


def current_learning_rate(optimizer: Any) -> tf.Tensor:
    """The rate the optimizer's last step used (or will use, before the first)."""
    return tf.cast(optimizer.learning_rate, tf.float32)


class Plateau(tf.Module):
    """Keras' ReduceLROnPlateau as graph ops: after `patience` evaluations in a row whose loss
    did not beat the best by `min_delta`, the optimizer's rate is multiplied by `factor`."""

    def __init__(self, optimizer: Any, factor: float, patience: int, min_delta: float = 1e-4):
        super().__init__(name="plateau")
        self.optimizer = optimizer
        self.factor, self.patience, self.min_delta = factor, patience, min_delta
        self.best = tf.Variable(float("inf"), name="best_loss")
        self.wait = tf.Variable(0, name="evaluations_without_improvement")

    def update(self, loss: tf.Tensor) -> None:
        """Note one evaluation's loss (NaN is ignored); lower the rate if it is time. Plain
        tensor ops, so it runs alike eagerly and inside a compiled loop."""
        loss = tf.cast(loss, tf.float32)
        valid = tf.logical_not(tf.math.is_nan(loss))
        improved = valid & (loss < self.best - self.min_delta)
        self.best.assign(tf.where(improved, loss, self.best))
        wait = tf.where(improved, 0, self.wait + tf.cast(valid, tf.int32))
        lower = wait >= self.patience
        self.wait.assign(tf.where(lower, 0, wait))
        rate = self.optimizer.learning_rate
        rate.assign(tf.where(lower, rate * self.factor, rate))
