"""Grad-CAM (Selvaraju et al. 2017) on the last convolutional feature map of a lungtf model.

The model is split with ``lungtf.models.model_parts`` into its ``preprocess`` layer and its
``backbone`` (whose output is the last convolutional block, ``[B, h, w, C]``). The class score
is the pre-softmax output of the ``logits`` layer (after ``pool``; ``dropout`` is the identity at
inference), as in the paper: the softmax probability saturates for confident tiles and its
gradient vanishes there. Each channel is weighted by the spatial mean of the score's gradient,
the weighted sum goes through a ReLU and is scaled to [0, 1] per tile.

``gradcam_tensors`` is the one implementation and ``explainer`` its graph: ``gradcam``
(evaluation reports, notebooks) runs it, and ``lungtf.export`` traces the same function into the
SavedModel's ``explain`` signatures, so the served heatmap is this map. It runs as a graph in
both places because eager and graph execution round differently (fused kernels), and in an
untrained deep network such differences grow to percents of the feature map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

PREDICTED = -1
"""A ``class_ids`` value meaning: explain the class the model predicts for this tile."""


def gradcam_tensors(
    model: Any,
    pixels: Any,
    class_ids: Any,
    calibrate: Callable[[Any], Any] | None = None,
) -> tuple[Any, Any, Any]:
    """Grad-CAM of a batch as TensorFlow tensors (eager or inside a ``tf.function``).

    Args:
        model: a model from ``lungtf.models.build_model`` (or loaded from its ``.keras`` file).
        pixels: float32 ``[B, S, S, 3]`` raw 0-255 pixels at the model's input size.
        class_ids: int64 ``[B]``, the class to explain per tile; ``PREDICTED`` (any negative
            value) for the argmax of the (calibrated) probabilities, the predicted class.
        calibrate: maps the model's float32 probabilities ``[B, C]`` to the reported ones
            (``lungtf.export`` passes its temperature scaling); identity when ``None``.

    Returns:
        ``(heatmaps float32 [B, h, w] in [0, 1], class_ids int64 [B], probabilities float32
        [B, C])``, the probabilities as ``model(pixels)`` (then ``calibrate``) gives them. A tile
        whose weighted map is all negative gets an all-zero heatmap.
    """
    import tensorflow as tf

    from lungtf.models import model_parts

    preprocess, backbone, _ = model_parts(model)
    pool, logits_layer = model.get_layer("pool"), model.get_layer("logits")
    softmax = model.get_layer("probabilities")
    features = backbone(preprocess(pixels), training=False)
    with tf.GradientTape() as tape:
        tape.watch(features)
        logits = logits_layer(pool(features))
        probs = tf.cast(softmax(logits), tf.float32)
        if calibrate is not None:
            probs = calibrate(probs)
        class_ids = tf.cast(class_ids, tf.int64)
        predicted = tf.argmax(probs, axis=1, output_type=tf.int64)
        ids = tf.where(class_ids < 0, predicted, class_ids)
        score = tf.gather(tf.cast(logits, tf.float32), ids, axis=1, batch_dims=1)
    grads = tf.cast(tape.gradient(score, features), tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1))
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    return tf.math.divide_no_nan(cam, peak), ids, probs


def explainer(model: Any, calibrate: Callable[[Any], Any] | None = None) -> Any:
    """``gradcam_tensors`` on ``model`` as a ``tf.function(pixels, class_ids)``.

    ``lungtf.export`` calls it from the ``explain`` and ``explain_class`` signatures (one traced
    graph for both) and ``gradcam`` runs it, so both compute the same graph.
    """
    import tensorflow as tf

    return tf.function(
        lambda pixels, class_ids: gradcam_tensors(model, pixels, class_ids, calibrate),
        autograph=False,
    )


def gradcam(
    model, pixels: np.ndarray, class_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps of a batch of tiles (``explainer``, as numpy).

    Args:
        model: a model from ``lungtf.models.build_model`` (or loaded from its ``.keras`` file).
        pixels: ``[B, S, S, 3]`` raw 0-255 pixels at the model's input size.
        class_ids: the class to explain per tile; the model's own prediction when ``None``.

    Returns:
        ``(heatmaps [B, h, w] in [0, 1], class_ids [B], probability of that class [B])``; a tile
        whose weighted map is all negative gets an all-zero heatmap.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(np.asarray(pixels, np.float32))
    wanted = np.full(len(x), PREDICTED) if class_ids is None else np.asarray(class_ids)
    cam, ids, probs = explainer(model)(x, tf.constant(wanted, tf.int64))
    ids, probs = ids.numpy(), probs.numpy()
    return cam.numpy(), ids, probs[np.arange(len(ids)), ids]


def upsample(heatmaps: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[B, h, w]`` heatmaps to ``[B, size, size]`` for drawing over tiles."""
    import tensorflow as tf

    resized = tf.image.resize(np.asarray(heatmaps, np.float32)[..., None], (size, size))
    return np.clip(resized.numpy()[..., 0], 0.0, 1.0)
