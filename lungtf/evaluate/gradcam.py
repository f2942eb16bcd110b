"""Grad-CAM (Selvaraju et al. 2017) on the last convolutional feature map of a lungtf model.

The model is split with ``lungtf.models.model_parts`` into its ``preprocess`` layer and its
``backbone`` (whose output is the last convolutional block, ``[B, h, w, C]``). The class score
is the pre-softmax output of the ``logits`` layer (after ``pool``; ``dropout`` is the identity at
inference), as in the paper: the softmax probability saturates for confident tiles and its
gradient vanishes there. Each channel is weighted by the spatial mean of the score's gradient,
the weighted sum goes through a ReLU and is scaled to [0, 1] per tile.
"""

from __future__ import annotations

import numpy as np


def gradcam(
    model, pixels: np.ndarray, class_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps of a batch of tiles.

    Args:
        model: a model from ``lungtf.models.build_model`` (or loaded from its ``.keras`` file).
        pixels: ``[B, S, S, 3]`` raw 0-255 pixels at the model's input size.
        class_ids: the class to explain per tile; the model's own prediction when ``None``.

    Returns:
        ``(heatmaps [B, h, w] in [0, 1], class_ids [B], probability of that class [B])``; a tile
        whose weighted map is all negative gets an all-zero heatmap.
    """
    import tensorflow as tf

    from lungtf.models import model_parts

    preprocess, backbone, _ = model_parts(model)
    pool, logits_layer = model.get_layer("pool"), model.get_layer("logits")
    x = tf.convert_to_tensor(np.asarray(pixels, np.float32))
    features = backbone(preprocess(x), training=False)
    with tf.GradientTape() as tape:
        tape.watch(features)
        logits = tf.cast(logits_layer(pool(features)), tf.float32)
        ids = (tf.argmax(logits, axis=1, output_type=tf.int32) if class_ids is None
               else tf.constant(np.asarray(class_ids), tf.int32))
        score = tf.gather(logits, ids, axis=1, batch_dims=1)
    grads = tf.cast(tape.gradient(score, features), tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1))
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    probs = tf.nn.softmax(logits).numpy()
    ids = ids.numpy()
    return cam.numpy(), ids, probs[np.arange(len(ids)), ids]


def upsample(heatmaps: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[B, h, w]`` heatmaps to ``[B, size, size]`` for drawing over tiles."""
    import tensorflow as tf

    resized = tf.image.resize(np.asarray(heatmaps, np.float32)[..., None], (size, size))
    return np.clip(resized.numpy()[..., 0], 0.0, 1.0)
