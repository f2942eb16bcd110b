"""Two independently augmented views of every tile, for self-supervised pretraining.

Built on the project's input pipeline and augmentation: ``lungtf.data.pipeline.make_dataset``
reads, decodes, squish-resizes and caches the tiles (8-bit, shuffled every epoch); each batch is
then augmented twice, independently, with views stronger than the supervised recipe's, as
SimSiam needs (Chen & He 2021 use random resized crops, flips, colour jitter, grey scale and
blur):

- geometry: a random resized crop (a share ``scale`` of the tile's area, aspect ratio in
  ``ratio``) rotated by any angle and flipped, cut and resized to ``crop_size`` in one OpenCV
  warp (``RandomResizedCrop`` draws the maps in order from its seeded stream,
  ``lungtf.data.augment.warp_host`` applies them in parallel, mirrored border);
- colour: H&E stain jitter and HSV jitter (``lungtf.data.augment``'s layers, at larger
  strengths) and a Gaussian blur of random strength on half the views (``RandomBlur``),
  compiled with XLA on float32 and rounded back to 8 bits.

The default ``scale`` (0.1-0.6 of the tile's area) is centred on the scale the supervised
``--preset cpu`` trains at (64 px crops of 128 px tiles: 0.25 of the area at one input pixel
per output pixel), so the pretrained features are learnt at about the magnification they are
fine-tuned at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from lungtf.data.augment import (
    AUGMENT_DTYPE,
    RandomFlipRotate,
    RandomHEDJitter,
    RandomHSVJitter,
    warp_host,
)
from lungtf.data.ingest import Record
from lungtf.data.pipeline import make_dataset

DEFAULT_SCALE = (0.1, 0.6)
"""Share of the tile's area a view is cut from (random resized crop)."""

DEFAULT_RATIO = (3 / 4, 4 / 3)
"""Aspect ratios (width / height) of the cut region, drawn log-uniformly."""


class RandomResizedCrop(RandomFlipRotate):
    """``RandomFlipRotate`` that also zooms: a random resized crop, rotated and flipped.

    Each view is cut from a region covering ``U(scale)`` of the input's area with aspect ratio
    ``exp(U(log ratio))``, placed uniformly inside the input, rotated by ``U(-180, 180)`` degrees
    about its centre and flipped at random, and resampled to ``crop_size`` square. The maps have
    ``RandomFlipRotate.transforms``'s form, so ``warp`` (on a device) and ``warp_host`` (OpenCV on
    the host) both apply them.

    Args:
        crop_size: side of the output square.
        scale: ``(low, high)`` share of the input's area the region covers, in ``(0, 1]``.
        ratio: ``(low, high)`` aspect ratio of the region.
        seed: seed of the layer's random stream.
    """

    def __init__(self, crop_size: int, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO, seed=None,
                 **kwargs):
        super().__init__(max_degrees=180.0, probability=1.0, crop_size=crop_size, seed=seed,
                         **kwargs)
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1 and ratio 0 < low <= "
                             f"high; got scale={scale}, ratio={ratio}")
        self.scale, self.ratio = tuple(map(float, scale)), tuple(map(float, ratio))

    def transforms(self, batch, height, width):
        """Draw one inverse map per image: float32 ``[batch, 6]``, see ``RandomFlipRotate``."""
        size = float(self.crop_size)
        if size > min(height, width):
            raise ValueError(f"crop_size {self.crop_size} is larger than the {height}x{width} input")

        def uniform(low, high):
            return keras.random.uniform((batch,), low, high, seed=self.generator)

        def sign():
            return ops.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)

        area = uniform(*self.scale) * (height * width)
        aspect = ops.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        region_w = ops.minimum(ops.sqrt(area * aspect), float(width))
        region_h = ops.minimum(ops.sqrt(area / aspect), float(height))
        angle = uniform(-math.pi, math.pi)
        cos, sin = ops.cos(angle), ops.sin(angle)
        zx, zy = sign() * region_w / size, sign() * region_h / size  # input px per output px
        # Centre of the region, so that the unrotated region lies inside the input.
        cx = uniform(0.0, 1.0) * (width - region_w) + region_w / 2 - 0.5
        cy = uniform(0.0, 1.0) * (height - region_h) + region_h / 2 - 0.5
        a0, a1, b0, b1 = cos * zx, -sin * zy, sin * zx, cos * zy  # rotation @ diag(zx, zy)
        mid = (size - 1) / 2
        return ops.stack([a0, a1, cx - (a0 + a1) * mid, b0, b1, cy - (b0 + b1) * mid], axis=1)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "ratio": self.ratio}


class RandomBlur(keras.layers.Layer):
    """Gaussian blur of random strength on a share of the images (mirrored border).

    Each chosen image becomes ``x + w (blur(x) - x)`` with ``w ~ U(0, 1)`` and ``blur`` a
    separable Gaussian of standard deviation ``sigma``: one convolution for the whole batch,
    cheaper than a kernel per image.

    Args:
        sigma: standard deviation of the strongest blur, in pixels.
        probability: share of images blurred.
        seed: seed of the layer's random stream.
    """

    def __init__(self, sigma: float = 1.0, probability: float = 0.5, seed=None, **kwargs):
        kwargs.setdefault("dtype", AUGMENT_DTYPE)
        super().__init__(**kwargs)
        self.sigma, self.probability, self.seed = float(sigma), float(probability), seed
        self.generator = keras.random.SeedGenerator(seed)
        radius = max(1, math.ceil(2 * self.sigma))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / self.sigma) ** 2)
        self.taps = (taps / taps.sum()).astype(np.float32)

    def call(self, images, training=True):
        if not training:
            return images
        r = len(self.taps) // 2
        channels = images.shape[-1]
        blurred = ops.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
        for shape in ((len(self.taps), 1), (1, len(self.taps))):
            kernel = np.tile(self.taps.reshape(*shape, 1, 1), (1, 1, channels, 1))
            blurred = ops.depthwise_conv(blurred, kernel, padding="valid")
        batch = ops.shape(images)[0]
        weight = keras.random.uniform((batch, 1, 1, 1), seed=self.generator)
        chosen = keras.random.uniform((batch, 1, 1, 1), seed=self.generator) < self.probability
        return images + ops.where(chosen, weight, 0.0) * (blurred - images)

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "probability": self.probability,
                "seed": self.seed}


def make_views(
    records: Sequence[Record],
    image_size: int,
    crop_size: int,
    batch_size: int,
    seed: int = 42,
    scale: tuple[float, float] = DEFAULT_SCALE,
    cache: bool = True,
    jit_compile: bool = True,
) -> tf.data.Dataset:
    """An endless dataset of view pairs ``(uint8 [B, c, c, 3], uint8 [B, c, c, 3])``.

    Every batch holds exactly ``batch_size`` tiles (the short last batch of each pass is left
    out: a pass is reshuffled, so no tile is always left out), so BatchNorm never sees a batch
    of one. Labels are dropped: pretraining never reads them.

    Args:
        records: the tiles (labels ignored).
        image_size: side the tiles are squish-resized (and cached) at.
        crop_size: side of each view (``c``).
        batch_size: tiles per batch.
        seed: shuffle and augmentation seed; the stream is reproducible given it.
        scale: share of the tile's area a view is cut from.
        cache: keep the decoded tiles in memory after the first pass.
        jit_compile: compile the colour augmentation with XLA.

    Raises:
        ValueError: fewer records than ``batch_size``, or ``crop_size`` above ``image_size``.
    """
    if len(records) < batch_size:
        raise ValueError(f"pretraining needs at least batch_size ({batch_size}) tiles; got "
                         f"{len(records)}: lower --batch-size")
    if not 16 <= crop_size <= image_size:
        raise ValueError(f"crop_size must be in 16..image_size ({image_size}); got {crop_size}")
    geometry = RandomResizedCrop(crop_size, scale, seed=seed, name="resized_crop")
    colour = [
        RandomHEDJitter(alpha=0.1, beta=0.05, seed=seed + 1, name="hed_jitter"),
        RandomHSVJitter(hue=0.04, saturation=0.25, value=0.25, seed=seed + 2, name="hsv_jitter"),
        RandomBlur(seed=seed + 3, name="blur"),
    ]
    ds = make_dataset(records, image_size, batch_size, training=True, seed=seed, cache=cache)
    ds = ds.filter(lambda x, y: tf.shape(x)[0] == batch_size).repeat()
    shape = (batch_size, crop_size, crop_size, 3)

    def draw(x, y):
        return (x, geometry.transforms(batch_size, image_size, image_size),
                geometry.transforms(batch_size, image_size, image_size))

    def warp(x, first, second):
        return tuple(
            tf.ensure_shape(tf.numpy_function(lambda i, m: warp_host(i, m, crop_size), [x, maps],
                                              tf.uint8, stateful=False), shape)
            for maps in (first, second)
        )

    @tf.function(jit_compile=jit_compile)
    def jitter(view):
        x = tf.cast(view, tf.float32)
        for layer in colour:
            x = layer(x, training=True)
        return tf.saturate_cast(tf.round(x), tf.uint8)

    ds = ds.map(draw)  # sequential: the seed generator's state advances in a fixed order
    ds = ds.map(warp, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(lambda a, b: (jitter(a), jitter(b)))  # sequential, seeded
    return ds.prefetch(tf.data.AUTOTUNE)
