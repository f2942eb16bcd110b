"""Grad-CAM on the last convolutional block of every registered backbone, after a little training."""

from __future__ import annotations

import numpy as np
import pytest

from lungtf.config import ModelConfig
from lungtf.evaluate import gradcam, plots
from lungtf.models import build_model, get_spec, list_backbones, model_parts

SIZE = 64
SMALL_VARIANT = {"regnet": "200mf"}
"""The cheapest variant where a backbone's default is heavy on 2 CPU cores."""


def colour_tiles(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiles whose class is a colour blob at a random place on noise: learnable and localised."""
    rng = np.random.default_rng(seed)
    x = rng.normal(110, 25, (n, SIZE, SIZE, 3)).clip(0, 255).astype(np.float32)
    y = np.arange(n) % 3
    for k in range(n):
        r, c = rng.integers(0, SIZE // 2, 2)
        x[k, r : r + SIZE // 2, c : c + SIZE // 2, y[k]] = 230.0
    return x, y.astype(np.int32)


@pytest.fixture(scope="module", params=list_backbones())
def trained(request):
    """A tiny model of one backbone after two eager training steps, and six tiles.

    Eager steps instead of ``fit``: tracing a training graph of a deep backbone costs far more
    CPU time than the steps themselves.
    """
    import keras
    import tensorflow as tf

    name = request.param
    variant = SMALL_VARIANT.get(name, get_spec(name).default_variant)
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(backbone=name, variant=variant, weights="none",
                                    image_size=SIZE))
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    x, y = colour_tiles(12)
    for step in range(2):
        xb, yb = x[6 * step : 6 * step + 6], y[6 * step : 6 * step + 6]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return name, model, x[:6]


def test_heatmap_on_last_conv_block_is_finite_normalised_and_not_constant(trained):
    name, model, x = trained
    heat, ids, probs = gradcam.gradcam(model, x)
    preprocess, backbone, _ = model_parts(model)
    features = backbone(preprocess(x), training=False)
    h, w = features.shape[1:3]  # the backbone is built size-free
    assert heat.shape == (len(x), h, w), name
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    # The mean of the un-rectified map is (logit - bias) / (h * w) of the explained class, so
    # where that margin is positive some cell is positive: the map peaks at 1 and varies over
    # the tile. A negative margin says nothing about single cells (the exact map is checked in
    # the CAM test below). A margin within float32 rounding of zero is left out.
    logits_layer = model.get_layer("logits")
    logits = np.asarray(logits_layer(model.get_layer("pool")(features)), np.float64)
    margin = logits[np.arange(len(x)), ids] - np.asarray(logits_layer.bias, np.float64)[ids]
    positive = margin > 1e-4
    np.testing.assert_allclose(heat[positive].max(axis=(1, 2)), 1.0, err_msg=name)
    assert (heat[positive].reshape(-1, h * w).std(axis=1) > 0).all(), "flat heatmaps"
    expected = np.asarray(model(x, training=False))
    np.testing.assert_array_equal(ids, expected.argmax(1))
    np.testing.assert_allclose(probs, expected.max(1), rtol=1e-4, atol=1e-5)
    big = gradcam.upsample(heat, SIZE)
    assert big.shape == (len(x), SIZE, SIZE) and big.min() >= 0.0 and big.max() <= 1.0


def test_gradcam_equals_cam_for_global_average_pooling(trained):
    """With global average pooling then a dense layer, the Grad-CAM weight of channel k is
    ``W[k, c] / (h * w)``, so the map is ReLU(sum_k W[k, c] A_k) (Zhou et al.'s CAM) rescaled."""
    name, model, x = trained
    preprocess, backbone, _ = model_parts(model)
    features = np.asarray(backbone(preprocess(x), training=False), np.float64)
    kernel = np.asarray(model.get_layer("logits").kernel, np.float64)
    target = np.full(len(x), 2)  # explain a class that need not be the prediction
    cam = np.maximum(features @ kernel[:, 2], 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    expected = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    heat, ids, _ = gradcam.gradcam(model, x, class_ids=target)
    assert (ids == 2).all()
    np.testing.assert_allclose(heat, expected, atol=1e-4, err_msg=name)


def test_overlay_grid_png(trained, tmp_path):
    name, model, x = trained
    heat, _, probs = gradcam.gradcam(model, x[:2])
    path = plots.tile_grid_png(x[:2], [f"{name} {p:.2f}" for p in probs], tmp_path / "cam.png",
                               heatmaps=gradcam.upsample(heat, SIZE))
    assert path.stat().st_size > 1000
