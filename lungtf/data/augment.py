"""Training augmentation: Keras 3 layers that take and return float32 0-255 batches.

The layers are written with ``keras.ops`` and act on whole batches, so they run wherever the
caller puts them: inside the training step on an accelerator (``--device-augment``), or in the
``tf.data`` pipeline on the host (``make_dataset``). Which ones run is chosen in the config
(``DataConfig.augment``), never in code: ``build_augmenter`` turns the names into layers.

Geometry (flips, rotation and an optional random crop) is one warp, ``RandomFlipRotate``, whose
random draw and pixel work are separate so that the pipeline can draw in order (reproducible) and
warp in parallel with OpenCV (``warp_host``). Colour layers (HED stain jitter, HSV jitter,
brightness, contrast) are plain batch layers.

Every layer computes in float32 whatever the global dtype policy (``AUGMENT_DTYPE``): under
``mixed_float16`` (the GPU recipe) a float16 pixel has a step of 0.125 grey levels above 128 and
a float16 sampling position one of 0.03 pixels above 32, so the warp and the colour maths would
round visibly; and mixing float16 pixels with float32 random draws does not even run. Inputs of
any float dtype are cast to float32 on the way in; outputs are float32 0-255 pixels, which is what
the model's float32 ``preprocess`` layer takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import keras
import numpy as np
from keras import ops

from lungtf.config import AUGMENTATIONS

AUGMENT_DTYPE = "float32"
"""Dtype policy of every augmentation layer (and of the ``augment`` Sequential around them)."""

RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
"""Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density."""


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

    Each output pixel ``p`` samples the input at ``A p + t``, the image's inverse affine map
    (flips times rotation about the centre); the border is mirrored (``d c b a | a b c d``), so no
    black corners reach the model, and flips alone are exact. The work is split in two so that
    the random draw and the pixel work can run in different places:

    - ``transforms(batch)`` draws the maps from the layer's seeded stream (cheap; sequential, so
      a run is reproducible given ``seed``);
    - ``warp(images, maps)`` applies them with four gathers in ``keras.ops`` (any backend or
      device, XLA-compilable), and ``warp_host`` applies the same maps with OpenCV on a host CPU,
      where it is several times faster than gathers.

    ``call`` is ``warp(images, transforms(batch))``; ``make_dataset`` uses ``warp_host``.

    With ``crop_size`` the output is a ``crop_size`` square cut from a random whole-pixel position
    of the input and flipped/rotated about its own centre: training on crops of finer-scale tiles
    shows the network many different views of each source tile, while evaluation and serving use
    whole tiles (the models pool globally, so they take any size).

    Args:
        horizontal: flip left-right with probability 0.5.
        vertical: flip top-bottom with probability 0.5.
        max_degrees: rotate by an angle drawn uniformly from ``[-max_degrees, max_degrees]``.
        probability: share of images that are rotated; the others are only flipped (exactly).
            fastai's ``aug_transforms`` rotates with ``p_affine=0.75``.
        crop_size: side of the random square crop; ``None`` keeps the input size.
        seed: seed of the layer's random stream.
    """

    def __init__(self, horizontal=True, vertical=True, max_degrees=10.0, probability=1.0,
                 crop_size=None, seed=None, **kwargs):
        kwargs.setdefault("dtype", AUGMENT_DTYPE)
        super().__init__(**kwargs)
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be None or >= 1; got {crop_size}")
        self.horizontal, self.vertical = bool(horizontal), bool(vertical)
        self.max_degrees, self.probability, self.seed = float(max_degrees), float(probability), seed
        self.crop_size = None if crop_size is None else int(crop_size)
        self.generator = keras.random.SeedGenerator(seed)

    def output_size(self, height, width):
        """``(height, width)`` of the output for an input of ``height`` x ``width``."""
        return (height, width) if self.crop_size is None else (self.crop_size, self.crop_size)

    def transforms(self, batch, height, width):
        """Draw one inverse map per image for ``[batch, height, width, C]`` images.

        Returns:
            float32 ``[batch, 6]`` rows ``(a0, a1, a2, b0, b1, b2)``: output pixel ``(x, y)``
            samples the input at ``(a0 x + a1 y + a2, b0 x + b1 y + b2)`` (pixel centres at
            integer coordinates, OpenCV's ``WARP_INVERSE_MAP`` convention).

        Raises:
            ValueError: ``crop_size`` larger than the input.
        """

        def sign(enabled):
            if not enabled:
                return ops.ones((batch,))
            draw = keras.random.uniform((batch,), seed=self.generator)
            return ops.where(draw < 0.5, -1.0, 1.0)

        sx, sy = sign(self.horizontal), sign(self.vertical)
        limit = self.max_degrees * math.pi / 180.0
        angle = keras.random.uniform((batch,), -limit, limit, seed=self.generator)
        rotate = keras.random.uniform((batch,), seed=self.generator) < self.probability
        angle = ops.where(rotate, angle, 0.0)
        cos, sin = ops.cos(angle), ops.sin(angle)
        out_h, out_w = self.output_size(height, width)
        if out_h > height or out_w > width:
            raise ValueError(f"crop_size {self.crop_size} is larger than the {height}x{width} input")
        cx, cy = (out_w - 1) / 2.0, (out_h - 1) / 2.0  # the output centre ...
        x0 = y0 = 0.0  # ... sits over the centre of the crop whose top-left input pixel is (x0, y0)
        if self.crop_size is not None:
            x0 = ops.floor(keras.random.uniform((batch,), 0, width - out_w + 1, seed=self.generator))
            y0 = ops.floor(keras.random.uniform((batch,), 0, height - out_h + 1, seed=self.generator))
        return ops.stack([
            sx * cos, -sx * sin, x0 + cx - sx * (cos * cx - sin * cy),
            sy * sin, sy * cos, y0 + cy - sy * (sin * cx + cos * cy),
        ], axis=1)

    def warp(self, images, maps):
        """Apply ``maps`` (see ``transforms``) to ``[B, H, W, C]`` images by bilinear gathers.

        Computes in float32 (images of another dtype are cast first) and returns float32.
        """
        images, maps = ops.cast(images, "float32"), ops.cast(maps, "float32")
        batch, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
        out_h, out_w = self.output_size(height, width)
        y, x = ops.meshgrid(ops.arange(out_h, dtype="float32"), ops.arange(out_w, dtype="float32"),
                            indexing="ij")
        a0, a1, a2, b0, b1, b2 = (ops.reshape(maps[:, i], (-1, 1, 1)) for i in range(6))
        src_x = _reflect(a0 * x + a1 * y + a2, width)
        src_y = _reflect(b0 * x + b1 * y + b2, height)
        x0, y0 = ops.floor(src_x), ops.floor(src_y)
        fx, fy = ops.expand_dims(src_x - x0, -1), ops.expand_dims(src_y - y0, -1)
        x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
        x1, y1 = ops.clip(x0 + 1, 0, width - 1), ops.clip(y0 + 1, 0, height - 1)
        x0, y0 = ops.clip(x0, 0, width - 1), ops.clip(y0, 0, height - 1)
        pixels = ops.reshape(images, (-1, ops.shape(images)[3]))
        offset = ops.reshape(ops.arange(batch, dtype="int32") * (height * width), (-1, 1, 1))

        def at(row, col):
            return ops.take(pixels, offset + row * width + col, axis=0)

        top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx
        bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx
        return top * (1.0 - fy) + bottom * fy

    def call(self, images, training=True):
        if not training:
            return images
        maps = self.transforms(ops.shape(images)[0], images.shape[1], images.shape[2])
        return self.warp(images, maps)

    def compute_output_shape(self, input_shape):
        if self.crop_size is None:
            return input_shape
        return (input_shape[0], self.crop_size, self.crop_size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "horizontal": self.horizontal, "vertical": self.vertical,
                "max_degrees": self.max_degrees, "probability": self.probability,
                "crop_size": self.crop_size, "seed": self.seed}


def warp_host(images: np.ndarray, maps: np.ndarray, size: int | None = None) -> np.ndarray:
    """``RandomFlipRotate.warp`` on the host CPU with OpenCV: the same maps, bilinear, mirrored border.

    OpenCV interpolates 8-bit images in fixed point (1/32-pixel positions), so results differ from
    ``warp`` by at most a few grey levels where the image has sharp edges. A map that is only a
    flip and a whole-pixel shift (no rotation) is applied exactly, by slicing, several times
    faster than a warp.

    Args:
        images: ``uint8 [B, H, W, C]``.
        maps: ``[B, 6]`` from ``RandomFlipRotate.transforms``.
        size: side of the square output (the layer's ``crop_size``); ``None`` keeps ``H x W``.

    Returns:
        ``uint8 [B, size, size, C]`` (``[B, H, W, C]`` without ``size``).
    """
    height, width = images.shape[1:3]
    out_h, out_w = (height, width) if size is None else (int(size), int(size))
    out = np.empty((len(images), out_h, out_w, images.shape[3]), images.dtype)
    for i, (image, row) in enumerate(zip(images, np.asarray(maps, np.float64))):
        a0, a1, a2, b0, b1, b2 = row
        if a1 == 0 and b0 == 0 and abs(a0) == 1 and abs(b1) == 1:  # flips and a shift only
            cols, rows = _exact_slice(a2, a0, out_w, width), _exact_slice(b2, b1, out_h, height)
            if cols is not None and rows is not None:
                out[i] = image[rows, cols]
                continue
        cv2.warpAffine(image, row.reshape(2, 3), (out_w, out_h), dst=out[i],
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)
    return out


def _exact_slice(first: float, step: float, count: int, limit: int) -> slice | None:
    """The slice of positions ``first + step * k`` (k < count, step +-1) when all are whole and
    inside ``[0, limit)``, else ``None``."""
    last = first + step * (count - 1)
    if first != int(first) or min(first, last) < 0 or max(first, last) >= limit:
        return None
    first, last = int(first), int(last)
    return slice(first, last + 1) if step > 0 else slice(first, last - 1 if last else None, -1)


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
        kwargs.setdefault("dtype", AUGMENT_DTYPE)
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
        kwargs.setdefault("dtype", AUGMENT_DTYPE)
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
    names: Sequence[str],
    rotation_degrees: float = 10.0,
    rotation_probability: float = 0.75,
    seed: int = 42,
    crop_size: int | None = None,
) -> keras.Sequential | None:
    """Build the training augmentation from names in ``lungtf.config.AUGMENTATIONS``.

    Flips and rotation share one warp (``RandomFlipRotate``); colour layers follow in a fixed
    order (stain, HSV, brightness, contrast) whatever the order of ``names``. All layers take and
    return float32 0-255 batches ``[B, H, W, 3]`` and compute in float32 whatever the global
    dtype policy (Keras's own ``RandomBrightness``/``RandomContrast`` would follow the policy and
    compute in float16 under ``mixed_float16``; they get ``dtype="float32"`` here).

    Args:
        names: augmentation names, e.g. ``lungtf.config.DEFAULT_AUGMENT``; empty means none.
        rotation_degrees: the largest rotation of ``rotate``.
        rotation_probability: share of images ``rotate`` rotates (fastai's ``p_affine``).
        seed: base seed; each layer gets its own stream derived from it.
        crop_size: cut a random square of this side from every image (with the flips and
            rotation, in the same warp); ``None`` or 0 keeps whole images.

    Returns:
        A ``keras.Sequential`` named ``augment``, or ``None`` when ``names`` is empty and there is
        no crop.

    Raises:
        ValueError: an unknown name (the message lists the allowed ones).
    """
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; allowed are {', '.join(AUGMENTATIONS)}")
    chosen = set(names)
    layers: list[keras.Layer] = []
    if crop_size or chosen & {"flip_horizontal", "flip_vertical", "rotate"}:
        layers.append(RandomFlipRotate(
            "flip_horizontal" in chosen, "flip_vertical" in chosen,
            rotation_degrees if "rotate" in chosen else 0.0, rotation_probability,
            crop_size=crop_size or None, seed=seed, name="flip_rotate",
        ))
    if "hed_jitter" in chosen:
        layers.append(RandomHEDJitter(seed=seed + 1, name="hed_jitter"))
    if "hsv_jitter" in chosen:
        layers.append(RandomHSVJitter(seed=seed + 2, name="hsv_jitter"))
    if "brightness" in chosen:
        layers.append(keras.layers.RandomBrightness(
            0.1, (0, 255), seed=seed + 3, name="brightness", dtype=AUGMENT_DTYPE))
    if "contrast" in chosen:
        layers.append(keras.layers.RandomContrast(
            0.1, (0, 255), seed=seed + 4, name="contrast", dtype=AUGMENT_DTYPE))
    if not layers:
        return None
    augmenter = keras.Sequential(layers, name="augment")
    augmenter.dtype_policy = AUGMENT_DTYPE  # else it casts its input to float16 under mixed_float16
    return augmenter
