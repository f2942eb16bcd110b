"""The tf.data input pipeline and ``show_batch``.

``make_dataset`` reads files in parallel, decodes JPEG/PNG (gray and alpha converted to RGB),
squish-resizes to a square without cropping (as the study), and yields 8-bit RGB batches of raw
0-255 pixels: the models take float32 pixels and cast on the device, and each does its own
preprocessing. Casting on the host would cost a third of the pipeline's CPU time and four times
the bytes in caches, shuffle buffers and host-to-device copies. Every image's header is checked
before it is decoded (JPEG or PNG, at most ``MAX_IMAGE_PIXELS``). A file that fails to decode at run
time is skipped with a warning, never stopping the epoch.

Training batches are augmented on the host with the layers of ``lungtf.data.augment`` (the
same layers run inside the training step when augmenting on an accelerator). Their random draws
come from Keras seed generators, whose state must advance in a fixed order, so draws happen in a
sequential map and a run is deterministic given ``seed``; the flip/rotation warp itself, the
costly part, then runs in parallel on the 8-bit batch with OpenCV (``warp_host``), and colour
layers, if any are chosen, run compiled with XLA on float32 and are rounded back to 8 bits.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from lungtf.constants import CLASS_NAMES, MAX_IMAGE_PIXELS, class_index
from lungtf.data.augment import RandomFlipRotate, warp_host
from lungtf.data.ingest import Record, within_pixel_cap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_HEADER_BYTES = 24  # PNG: 8-byte signature, IHDR length and type, then width and height


def header_size(image_bytes: tf.Tensor) -> tf.Tensor:
    """``int64 [height, width]`` of one JPEG or PNG, read from its header without decoding.

    JPEG: ``tf.io.extract_jpeg_shape`` (the SOF marker). PNG: the big-endian width and height
    of the IHDR chunk, bytes 16-23. Anything else fails with ``InvalidArgumentError``, so a
    caller can refuse an image by its declared size before a decoder allocates it.
    """
    head = tf.strings.substr(image_bytes, 0, _HEADER_BYTES)
    head = tf.strings.substr(tf.strings.join([head, b"\0" * _HEADER_BYTES]), 0, _HEADER_BYTES)
    raw = tf.io.decode_raw(head, tf.uint8)
    is_png = tf.reduce_all(raw[:8] == tf.constant(list(PNG_SIGNATURE), tf.uint8)) & tf.reduce_all(
        raw[12:16] == tf.constant(list(b"IHDR"), tf.uint8)
    )
    is_jpeg = tf.reduce_all(raw[:3] == tf.constant(list(JPEG_SIGNATURE), tf.uint8))

    def png() -> tf.Tensor:
        b = tf.cast(raw, tf.int64)
        width = b[16] * 2**24 + b[17] * 2**16 + b[18] * 2**8 + b[19]
        height = b[20] * 2**24 + b[21] * 2**16 + b[22] * 2**8 + b[23]
        return tf.stack([height, width])

    def jpeg() -> tf.Tensor:
        return tf.cast(tf.io.extract_jpeg_shape(image_bytes)[:2], tf.int64)

    def other() -> tf.Tensor:
        refuse = tf.debugging.Assert(
            False, [tf.strings.format("not a JPEG or PNG image ({} bytes)", tf.strings.length(
                image_bytes))], name="not_jpeg_or_png")
        with tf.control_dependencies([refuse]):
            return tf.zeros([2], tf.int64)

    return tf.case([(is_png, png), (is_jpeg, jpeg)], default=other, exclusive=False)


def checked_size(
    image_bytes: tf.Tensor, max_pixels: int = MAX_IMAGE_PIXELS, index: tf.Tensor | None = None
) -> tf.Tensor:
    """``header_size`` that fails with ``InvalidArgumentError`` above ``max_pixels``.

    The rule is ``lungtf.data.ingest.within_pixel_cap``, shared with ingest and the demo: each
    side must lie in ``1..max_pixels`` and their product at most ``max_pixels``, so a PNG header
    declaring 0xFFFFFFFF x 0xFFFFFFFF (whose int64 product wraps negative) is refused too, and
    the sizes this returns are each at most ``max_pixels``, so summing a batch's cannot wrap.

    Args:
        image_bytes: one encoded image (string scalar).
        max_pixels: the most width x height allowed (``lungtf.constants.MAX_IMAGE_PIXELS``).
        index: the image's position in its batch, named in the message when given.
    """
    size = header_size(image_bytes)
    what = "image" if index is None else tf.strings.format("image {} of the batch", (index,))
    refuse = tf.debugging.Assert(
        within_pixel_cap(size[1], size[0], max_pixels),
        [tf.strings.join([what, tf.strings.format(
            " is {} x {} pixels (width x height); at most {} pixels are decoded "
            "(MAX_IMAGE_PIXELS); resize it first", (size[1], size[0], max_pixels))])],
        name="too_many_pixels",
    )
    with tf.control_dependencies([refuse]):
        return tf.identity(size)


def decode_resize(
    image_bytes: tf.Tensor, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS
) -> tf.Tensor:
    """Decode one JPEG/PNG to RGB and squish-resize it to ``image_size`` square (no crop).

    The header is checked first (``checked_size``): other formats and images above
    ``max_pixels`` fail with ``InvalidArgumentError`` before anything is decoded, so a small
    file declaring a huge image (a decompression bomb) costs nothing.

    Returns:
        ``uint8 [image_size, image_size, 3]``, rounded. Shrinking averages pixel areas (a box
        filter, about twice as fast as antialiased bilinear at the same quality); any other
        change of size is antialiased bilinear; an image already at size is left as it is.
    """
    with tf.control_dependencies([checked_size(image_bytes, max_pixels)]):
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
        augmenter: a ``keras.Sequential`` from ``lungtf.data.augment.build_augmenter``, training
            only.
        seed: shuffle seed; with a seeded augmenter the whole stream is reproducible.
        cache: keep the decoded, resized 8-bit tiles in memory after the first epoch.
        jit_compile: compile the colour augmentation layers with XLA (about twice as fast on
            CPU; each new batch shape costs a few seconds of compilation once).

    Returns:
        A dataset of ``(uint8 [B, S, S, 3] pixels, int32 [B] class ids)``; ``S`` is the
        augmenter's crop size when it crops (training), else ``image_size``.

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
    layers = list(augmenter.layers) if training and augmenter is not None else []
    if layers and isinstance(layers[0], RandomFlipRotate):
        ds = _warp_on_host(ds, layers.pop(0), image_size)
    if layers:
        def colour(x: tf.Tensor) -> tf.Tensor:
            x = tf.cast(x, tf.float32)
            for layer in layers:
                x = layer(x, training=True)
            return tf.saturate_cast(tf.round(x), tf.uint8)

        augment = tf.function(colour, jit_compile=jit_compile)
        ds = ds.map(lambda x, y: (augment(x), y))  # sequential: seed state advances in order
    if not training:
        # Keras iterates evaluation data afresh every epoch, and destroying an iterator waits
        # for tf.data's autotuning thread, which wakes only on its own timer (stalls of about
        # 35 s were measured here). These short pipelines run at full parallelism without it.
        options = tf.data.Options()
        options.autotune.enabled = False
        ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


@contextlib.contextmanager
def length_found_at_end() -> Iterator[None]:
    """Silence Keras's "Your input ran out of data" warning while it reads these pipelines.

    ``make_dataset`` skips files that fail to decode, so tf.data cannot know a pipeline's length
    in advance; Keras then learns it by reaching the end of the first pass and warns, as if the
    data had been too short. For an evaluation pass that end is the normal one. ``fit`` repeats
    the training data, so in training only the validation pass ends (or a training set whose
    every file failed, each failure logged by ``ignore_errors``).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
        yield


def _warp_on_host(
    ds: tf.data.Dataset, geometry: RandomFlipRotate, image_size: int
) -> tf.data.Dataset:
    """Flip/rotate (and crop) 8-bit batches: draw the maps in order, warp in parallel with OpenCV."""

    out_h, out_w = geometry.output_size(image_size, image_size)

    def draw(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return x, geometry.transforms(tf.shape(x)[0], image_size, image_size), y

    def warp(x: tf.Tensor, maps: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        out = tf.numpy_function(
            lambda images, m: warp_host(images, m, geometry.crop_size), [x, maps], tf.uint8,
            stateful=False,
        )
        return tf.ensure_shape(out, (x.shape[0], out_h, out_w, x.shape[3])), y

    ds = ds.map(draw)  # sequential: the seed generator's state advances in a fixed order
    return ds.map(warp, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


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
