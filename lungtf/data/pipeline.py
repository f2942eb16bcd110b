"""The tf.data input pipeline, batch augmentation layers and ``show_batch``.

``make_dataset`` reads files in parallel, decodes JPEG/PNG (gray and alpha converted to RGB),
squish-resizes to a square without cropping (as the study), and stores the tiles as 8-bit RGB so
a cache or shuffle buffer holds a quarter of the float32 bytes; batches are cast to float32 raw
0-255 pixels (each model does its own preprocessing). A file that fails to decode at run time is
skipped with a warning, never stopping the epoch.

Augmentation runs on whole batches, after batching, with Keras 3 layers built from
``keras.ops``, so the same layers run on an accelerator when the caller moves them into a model;
in the pipeline they are compiled with XLA. Randomness comes from Keras seed generators, whose
state must advance in a fixed order, so the augmentation map is sequential: a run is
deterministic given ``seed`` (XLA draws other random numbers than eager mode, but the same ones
on every run).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from lungtf.config import AUGMENTATIONS
from lungtf.constants import CLASS_NAMES, class_index
from lungtf.data.ingest import Record

RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
"""Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density."""


def decode_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode one JPEG/PNG to RGB and squish-resize it to ``image_size`` square (no crop).

    Returns:
        ``uint8 [image_size, image_size, 3]``, rounded. Shrinking averages pixel areas (a box
        filter, about twice as fast as antialiased bilinear at the same quality); any other
        change of size is antialiased bilinear; an image already at size is left as it is.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    size = (image_size, image_size)
    height_width = tf.shape(image)[:2]

    def resize() -> tf.Tensor:
        resized = tf.cond(
            tf.reduce_all(height_width >= image_size),
            lambda: tf.image.resize(image, size, method="area"),
            lambda: tf.image.resize(image, size, antialias=True),
        )
        return tf.saturate_cast(tf.round(resized), tf.uint8)

    same = tf.reduce_all(height_width == image_size)
    return tf.ensure_shape(tf.cond(same, lambda: image, resize), (image_size, image_size, 3))


def make_dataset(
    records: Sequence[Record],
    image_size: int,
    batch_size: int,
    training: bool,
    augmenter: keras.Layer | None = None,
    seed: int = 42,
    cache: bool = False,
    jit_compile: bool = True,
) -> tf.data.Dataset:
    """Build the input pipeline: list, read, decode, resize, (cache), (shuffle), batch, (augment).

    Args:
        records: images to read; labels must be in ``CLASS_NAMES``.
        image_size: side of the square the tiles are squish-resized to.
        batch_size: images per batch (the last batch may be smaller).
        training: shuffle every epoch and apply ``augmenter``; otherwise keep record order.
        augmenter: a layer (see ``build_augmenter``) called on float32 batches, training only.
        seed: shuffle seed; with a seeded augmenter the whole stream is reproducible.
        cache: keep the decoded, resized 8-bit tiles in memory after the first epoch.
        jit_compile: compile the augmentation with XLA (about twice as fast on CPU; each new
            batch shape costs a few seconds of compilation once).

    Returns:
        A dataset of ``(float32 [B, S, S, 3] pixels in 0..255, int32 [B] class ids)``.

    Raises:
        ValueError: no records, a label outside ``CLASS_NAMES``, or a non-positive size.
    """
    if not records:
        raise ValueError("make_dataset needs at least one record; got an empty list")
    if image_size < 1 or batch_size < 1:
        raise ValueError(
            f"image_size and batch_size must be >= 1; got image_size={image_size}, "
            f"batch_size={batch_size}"
        )
    labels = np.array([class_index(r.label) for r in records], np.int32)
    ds = tf.data.Dataset.from_tensor_slices(([r.path for r in records], labels))
    if training and not cache:  # shuffling names is cheap; the buffer holds every record
        ds = ds.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return decode_resize(tf.io.read_file(path), image_size), label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    if cache:
        ds = ds.cache()
        if training:
            ds = ds.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, num_parallel_calls=tf.data.AUTOTUNE)
    if training and augmenter is not None:
        augment = tf.function(lambda x: augmenter(tf.cast(x, tf.float32), training=True),
                              jit_compile=jit_compile)
        ds = ds.map(lambda x, y: (augment(x), y))
    else:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _per_image_uniform(
    images, generator: keras.random.SeedGenerator, low: float, high: float, channels: int = 1
):
    """One uniform draw per image (and channel), shaped to broadcast over ``[B, H, W, C]``."""
    batch = ops.shape(images)[0]
    return keras.random.uniform((batch, 1, 1, channels), low, high, seed=generator)


def _reflect(coord, size: int):
    """Mirror a sampling coordinate at the image border (mode ``d c b a | a b c d``).

    One reflection suffices: a flip or rotation about the centre never samples further than
    0.21 image sides outside the image.
    """
    coord = ops.where(coord < -0.5, -1.0 - coord, coord)
    return ops.where(coord > size - 0.5, 2.0 * size - 1.0 - coord, coord)


@keras.saving.register_keras_serializable(package="lungtf")
class RandomFlipRotate(keras.layers.Layer):
    """Random horizontal/vertical flips and a rotation, as one bilinear warp of the batch.

    Each output pixel samples the input at ``M (p - c) + c`` (``M`` = flips times rotation,
    ``c`` the image centre) from four gathered neighbours; the border is mirrored, so no black
    corners reach the model, and flips alone are exact (integer coordinates, zero weights). Written
    with gathers in ``keras.ops`` rather than TensorFlow's ImageProjectiveTransform kernel so that
    XLA can compile it (``make_dataset`` does), which runs about twice as fast on CPU.

    Args:
        horizontal: flip left-right with probability 0.5.
        vertical: flip top-bottom with probability 0.5.
        max_degrees: rotate by an angle drawn uniformly from ``[-max_degrees, max_degrees]``.
        seed: seed of the layer's random stream.
    """

    def __init__(self, horizontal=True, vertical=True, max_degrees=10.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.horizontal, self.vertical = bool(horizontal), bool(vertical)
        self.max_degrees, self.seed = float(max_degrees), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        batch, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]

        def sign(enabled):
            if not enabled:
                return ops.ones((batch, 1, 1))
            draw = keras.random.uniform((batch, 1, 1), seed=self.generator)
            return ops.where(draw < 0.5, -1.0, 1.0)

        sx, sy = sign(self.horizontal), sign(self.vertical)
        limit = self.max_degrees * math.pi / 180.0
        angle = keras.random.uniform((batch, 1, 1), -limit, limit, seed=self.generator)
        cos, sin = ops.cos(angle), ops.sin(angle)
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        dy, dx = ops.meshgrid(
            ops.arange(height, dtype="float32") - cy, ops.arange(width, dtype="float32") - cx,
            indexing="ij",
        )
        src_x = _reflect(sx * (cos * dx - sin * dy) + cx, width)
        src_y = _reflect(sy * (sin * dx + cos * dy) + cy, height)
        x0, y0 = ops.floor(src_x), ops.floor(src_y)
        fx, fy = ops.expand_dims(src_x - x0, -1), ops.expand_dims(src_y - y0, -1)
        x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
        x1, y1 = ops.clip(x0 + 1, 0, width - 1), ops.clip(y0 + 1, 0, height - 1)
        x0, y0 = ops.clip(x0, 0, width - 1), ops.clip(y0, 0, height - 1)
        pixels = ops.reshape(images, (-1, ops.shape(images)[3]))
        offset = ops.reshape(ops.arange(batch, dtype="int32") * (height * width), (-1, 1, 1))

        def at(y, x):
            return ops.take(pixels, offset + y * width + x, axis=0)

        top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx
        bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx
        return top * (1.0 - fy) + bottom * fy

    def get_config(self):
        return {**super().get_config(), "horizontal": self.horizontal, "vertical": self.vertical,
                "max_degrees": self.max_degrees, "seed": self.seed}


@keras.saving.register_keras_serializable(package="lungtf")
class RandomHEDJitter(keras.layers.Layer):
    """H&E stain jitter in HED colour space (Tellez et al. 2018, Ruifrok-Johnston deconvolution).

    Pixels become optical densities ``-log((x + 1) / 256)``, are unmixed into haematoxylin, eosin
    and DAB amounts, each amount is scaled by ``U(1 - alpha, 1 + alpha)`` and shifted by
    ``U(-beta, beta)`` per image, and the result is mixed back into 0-255 RGB.

    Args:
        alpha: largest relative change of a stain's amount.
        beta: largest additive change of a stain's optical density.
        seed: seed of the layer's random stream.
    """

    def __init__(self, alpha=0.05, beta=0.05, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta, self.seed = float(alpha), float(beta), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        od = -ops.log((ops.clip(images, 0.0, 255.0) + 1.0) / 256.0)
        stains = ops.einsum("bhwc,cs->bhws", od, np.linalg.inv(RGB_FROM_HED))
        scale = _per_image_uniform(images, self.generator, 1 - self.alpha, 1 + self.alpha, 3)
        shift = _per_image_uniform(images, self.generator, -self.beta, self.beta, 3)
        od = ops.einsum("bhws,sc->bhwc", stains * scale + shift, RGB_FROM_HED)
        return ops.clip(ops.exp(-od) * 256.0 - 1.0, 0.0, 255.0)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta, "seed": self.seed}


@keras.saving.register_keras_serializable(package="lungtf")
class RandomHSVJitter(keras.layers.Layer):
    """Per-image jitter of hue (shift), saturation and value (scale) on 0-255 RGB batches.

    Args:
        hue: largest hue shift, as a fraction of the colour wheel.
        saturation: largest relative change of saturation.
        value: largest relative change of value (brightness).
        seed: seed of the layer's random stream.
    """

    def __init__(self, hue=0.02, saturation=0.1, value=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.hue, self.saturation, self.value = float(hue), float(saturation), float(value)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        hsv = ops.image.rgb_to_hsv(ops.clip(images, 0.0, 255.0) / 255.0)
        h, s, v = ops.split(hsv, 3, axis=-1)
        h = ops.mod(h + _per_image_uniform(images, self.generator, -self.hue, self.hue), 1.0)
        s = s * _per_image_uniform(images, self.generator, 1 - self.saturation, 1 + self.saturation)
        v = v * _per_image_uniform(images, self.generator, 1 - self.value, 1 + self.value)
        hsv = ops.clip(ops.concatenate([h, s, v], axis=-1), 0.0, 1.0)
        return ops.image.hsv_to_rgb(hsv) * 255.0

    def get_config(self):
        return {**super().get_config(), "hue": self.hue, "saturation": self.saturation,
                "value": self.value, "seed": self.seed}


def build_augmenter(
    names: Sequence[str], rotation_degrees: float = 10.0, seed: int = 42
) -> keras.Sequential | None:
    """Build the training augmentation from names in ``lungtf.config.AUGMENTATIONS``.

    Flips and rotation share one warp (``RandomFlipRotate``); colour layers follow in a fixed
    order (stain, HSV, brightness, contrast) whatever the order of ``names``. All layers take and
    return float32 0-255 batches ``[B, H, W, 3]``.

    Args:
        names: augmentation names, e.g. ``lungtf.config.DEFAULT_AUGMENT``; empty means none.
        rotation_degrees: the largest rotation of ``rotate``.
        seed: base seed; each layer gets its own stream derived from it.

    Returns:
        A ``keras.Sequential`` named ``augment``, or ``None`` when ``names`` is empty.

    Raises:
        ValueError: an unknown name (the message lists the allowed ones).
    """
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; allowed are {', '.join(AUGMENTATIONS)}")
    chosen = set(names)
    layers: list[keras.Layer] = []
    if chosen & {"flip_horizontal", "flip_vertical", "rotate"}:
        layers.append(RandomFlipRotate(
            "flip_horizontal" in chosen, "flip_vertical" in chosen,
            rotation_degrees if "rotate" in chosen else 0.0, seed=seed, name="flip_rotate",
        ))
    if "hed_jitter" in chosen:
        layers.append(RandomHEDJitter(seed=seed + 1, name="hed_jitter"))
    if "hsv_jitter" in chosen:
        layers.append(RandomHSVJitter(seed=seed + 2, name="hsv_jitter"))
    if "brightness" in chosen:
        layers.append(keras.layers.RandomBrightness(0.1, (0, 255), seed=seed + 3, name="brightness"))
    if "contrast" in chosen:
        layers.append(keras.layers.RandomContrast(0.1, (0, 255), seed=seed + 4, name="contrast"))
    return keras.Sequential(layers, name="augment") if layers else None


def show_batch(
    images,
    labels,
    path: str | os.PathLike,
    class_names: Sequence[str] = CLASS_NAMES,
    ncols: int = 8,
    title: str | None = None,
) -> None:
    """Save a PNG grid of a batch with each tile's label above it, like fastai's ``show_batch``.

    Args:
        images: ``[B, H, W, 3]`` pixels in 0..255 (tensor or array).
        labels: ``[B]`` class ids (indices into ``class_names``) or label strings (str or bytes,
            as a string tensor gives them).
        path: the PNG to write.
        class_names: names for integer labels.
        ncols: tiles per row (fewer when the batch is smaller).
        title: optional figure title.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state, works headless

    pixels = np.clip(np.asarray(images, np.float32), 0, 255).astype(np.uint8)
    names = [
        x.decode() if isinstance(x, bytes) else x if isinstance(x, str) else class_names[int(x)]
        for x in np.asarray(labels).tolist()
    ]
    if len(names) != len(pixels):
        raise ValueError(f"got {len(pixels)} images but {len(names)} labels; they must match")
    ncols = max(1, min(ncols, len(pixels)))
    nrows = math.ceil(len(pixels) / ncols)
    fig = Figure(figsize=(2 * ncols, 2.2 * nrows + (0.4 if title else 0)))
    for i, (image, name) in enumerate(zip(pixels, names)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(image)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
