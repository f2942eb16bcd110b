"""lr_find: a real LR sweep on tiny real images; plot written, suggestion in range, weights restored."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import write_tile
from PIL import Image

from lungtf.train.lr_find import lr_find, smooth, suggest


def _tiny_dataset(tmp_path, n=24, size=32):
    images, labels = [], []
    for i in range(n):
        path = write_tile(tmp_path / f"t{i}.png", seed=i, size=size, cls=i % 3)
        images.append(np.asarray(Image.open(path), np.float32))
        labels.append(np.eye(3)[i % 3])
    return tf.data.Dataset.from_tensor_slices((np.stack(images), np.stack(labels))).batch(8)


def _model(size=32):
    model = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile(keras.optimizers.AdamW(1e-3), "categorical_crossentropy")
    return model


def test_lr_find_writes_plot_suggests_in_range_and_restores(tmp_path):
    keras.utils.set_random_seed(0)
    model, ds = _model(), _tiny_dataset(tmp_path)
    before = [w.copy() for w in model.get_weights()]
    result = lr_find(model, ds, steps=30, min_lr=1e-5, max_lr=10.0, png=tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 1000
    assert 1e-5 <= result.suggestion <= 10.0
    assert len(result.losses) == len(result.lrs) <= 30
    assert np.all(np.diff(result.lrs) > 0)  # exponential sweep upwards
    after = model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)


def test_suggestion_is_steepest_descent_before_minimum():
    lrs = np.logspace(-6, 0, 7)
    losses = np.array([2.0, 1.9, 1.2, 1.0, 0.9, 3.0, 9.0])
    assert suggest(lrs, losses) == pytest.approx(1e-4)  # 1.9 -> 1.2 is the steepest fall
    assert suggest(lrs, np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])) == pytest.approx(1e-7)
    np.testing.assert_allclose(smooth(np.array([1.0, 1.0, 1.0])), 1.0)


def test_lr_find_rejects_a_schedule(tmp_path):
    model = _model()
    model.compile(keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(1e-3, 10)), "mse")
    with pytest.raises(TypeError, match="CosineDecay"):
        lr_find(model, _tiny_dataset(tmp_path, n=6), steps=10)
