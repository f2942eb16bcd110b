"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning") in Keras 3.

Two augmented views ``x1, x2`` of a tile pass through the same encoder ``f`` (the project's
headless backbone with its own input preprocessing, global average pooling and a projection
MLP), giving ``z1, z2``; a prediction MLP ``h`` maps each to ``p1, p2``. The loss is the
symmetrised negative cosine similarity with a stop-gradient on the target::

    D(p, z) = -cos(p, stopgrad(z))        L = D(p1, z2) / 2 + D(p2, z1) / 2

The stop-gradient is what keeps SimSiam from collapsing to a constant output without negative
pairs, a momentum encoder or large batches, so it works at the batch sizes a 2-core CPU affords
(32-64), where SimCLR's contrastive loss needs thousands of negatives. ``embedding_std`` watches
for collapse: the standard deviation over the batch of the l2-normalised ``z``, averaged over its
dimensions, is 0 for a collapsed encoder and about ``1 / sqrt(dim)`` for a healthy one.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

PROJECTION_DIM = 512
"""Width of the projection MLP (the paper's CIFAR setting; 2048 on ImageNet)."""

PREDICTION_DIM = 128
"""Hidden width of the prediction MLP (a bottleneck of a quarter of ``PROJECTION_DIM``)."""


def negative_cosine(p, z):
    """``D(p, z) = -cos(p, stopgrad(z))``, averaged over the batch; in ``[-1, 1]``.

    No gradient flows into ``z``: it is the target, treated as a constant.
    """
    p = ops.cast(p, "float32")
    z = ops.stop_gradient(ops.cast(z, "float32"))
    p = p / ops.maximum(ops.norm(p, axis=-1, keepdims=True), 1e-12)
    z = z / ops.maximum(ops.norm(z, axis=-1, keepdims=True), 1e-12)
    return -ops.mean(ops.sum(p * z, axis=-1))


def simsiam_loss(p1, p2, z1, z2):
    """The symmetric SimSiam loss ``D(p1, z2) / 2 + D(p2, z1) / 2``; -1 at perfect agreement."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def embedding_std(z):
    """Mean over dimensions of the batch standard deviation of the l2-normalised ``z``.

    0 means collapse (every tile gets the same embedding); ``1 / sqrt(dim)`` is what spread-out
    embeddings give.
    """
    z = ops.cast(z, "float32")
    z = z / ops.maximum(ops.norm(z, axis=-1, keepdims=True), 1e-12)
    return ops.mean(ops.std(z, axis=0))


def projection_mlp(dim: int = PROJECTION_DIM) -> keras.Sequential:
    """Projection MLP: (linear, BN, ReLU), then (linear, BN); the paper's 2-layer CIFAR variant."""
    return keras.Sequential([
        keras.layers.Dense(dim, use_bias=False), keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dense(dim, use_bias=False), keras.layers.BatchNormalization(),
    ], name="projector")


def prediction_mlp(dim: int = PROJECTION_DIM, hidden: int = PREDICTION_DIM) -> keras.Sequential:
    """Prediction MLP: (linear, BN, ReLU) to a ``hidden`` bottleneck, then linear back to ``dim``."""
    return keras.Sequential([
        keras.layers.Dense(hidden, use_bias=False), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.Dense(dim),
    ], name="predictor")


class SimSiam(keras.Model):
    """Encoder (``preprocess`` -> ``backbone`` -> pooling -> projector) + predictor.

    ``call(pixels)`` returns ``(z, p)`` for one view of raw 0-255 pixels (any numeric dtype);
    ``fit`` takes a dataset of view pairs ``(x1, x2)`` (``lungtf.pretrain.views.make_views``)
    and reports ``loss`` and ``z_std`` (``embedding_std``) per epoch. Compile it with an
    optimizer only. The backbone is the project's registry layer named ``backbone``: its weights
    are saved with ``backbone.save_weights``, the form ``--weights PATH`` loads.

    Args:
        preprocess: the backbone's input preprocessing layer (``build_model``'s ``preprocess``).
        backbone: the headless backbone (``build_model``'s ``backbone``).
        dim: width of the projection MLP (``z`` and ``p``).
        hidden: hidden width of the prediction MLP.
    """

    def __init__(self, preprocess, backbone, dim: int = PROJECTION_DIM,
                 hidden: int = PREDICTION_DIM, **kwargs):
        super().__init__(**kwargs)
        self.preprocess, self.backbone = preprocess, backbone
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.projector = projection_mlp(dim)
        self.predictor = prediction_mlp(dim, hidden)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.std_tracker = keras.metrics.Mean(name="z_std")

    def call(self, pixels, training=False):
        x = self.preprocess(ops.cast(pixels, "float32"))
        z = self.projector(self.pool(self.backbone(x, training=training)), training=training)
        return z, self.predictor(z, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.std_tracker]

    def train_step(self, data):
        x1, x2 = data
        with tf.GradientTape() as tape:
            # One pass over both views (one graph to trace, larger matrix products); BatchNorm
            # then normalises with statistics of both views together.
            z, p = self(ops.concatenate([x1, x2], axis=0), training=True)
            (z1, z2), (p1, p2) = ops.split(z, 2), ops.split(p, 2)
            loss = simsiam_loss(p1, p2, z1, z2)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        self.loss_tracker.update_state(loss)
        self.std_tracker.update_state(0.5 * embedding_std(z1) + 0.5 * embedding_std(z2))
        return {m.name: m.result() for m in self.metrics}
