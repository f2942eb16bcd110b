"""The SavedModel's signatures, traced from a Keras model: its interface to every server.

``lungtf.export`` writes what ``build_signatures`` returns; TensorFlow Serving (production) and
``lungtf.serving`` (development) answer through them, so the interface is fixed here and nowhere
else:

- ``serving_default(image_bytes: string [N])`` decodes JPEG/PNG to 3 channels and squish-resizes
  them to the model's size with the training pipeline's own function
  (``lungtf.data.pipeline.decode_resize``), then runs ``model(x, training=False)`` (the model
  holds its own preprocessing).
- ``predict_pixels(pixels: float32 [N, S, S, 3])`` takes raw 0-255 pixels already at the size.
- Hostile input is refused inside the signatures (TF Serving runs them as they are), before any
  decoding, with ``InvalidArgumentError``: more than ``MAX_BATCH_IMAGES`` (64) images, an image
  that is not JPEG/PNG or whose header declares more than ``MAX_IMAGE_PIXELS`` (4096 x 4096), a
  batch above ``MAX_BATCH_PIXELS`` (4 x 4096 x 4096) in total (``lungtf.constants``).
- Both answer ``probabilities`` float32 [N, 3], ``class_id`` int64 [N] and ``class_name`` string
  [N] (``lungtf.constants.CLASS_NAMES``); when ``lungtf.json`` holds a ``temperature`` other than 1
  the probabilities are temperature-scaled, ``softmax(log p / T)``.
- ``metadata()`` answers ``json``: the ``lungtf.json`` contents as one string.
- ``explain(image_bytes: string [N])`` takes the images as ``serving_default`` does (same checks,
  same decode) and answers ``probabilities`` (equal to ``serving_default``'s, calibrated),
  ``class_id`` int64 [N] and ``heatmap`` float32 [N, h, w] in [0, 1]: the Grad-CAM of the
  predicted class on the backbone's output feature map, computed in the graph with
  ``tf.GradientTape`` by ``lungtf.evaluate.gradcam.gradcam_tensors`` (the map the evaluation
  report draws). ``explain_class(image_bytes, class_id: int64 [N])`` explains the given class of
  each image instead; ``class_id`` must hold one id in ``[0, 3)`` per image.
- The graph computes in float32 and holds no XLA-must-compile function whatever dtype policy and
  device the model was trained under: what is written is ``lungtf.models.portable.portable_copy``
  of the model (float32 policies, ``GroupedConv2D`` as its depthwise rewrite, the same weights).
"""

from __future__ import annotations

import json
from typing import Any

from lungtf.constants import (
    CLASS_NAMES,
    MAX_BATCH_IMAGES,
    MAX_BATCH_PIXELS,
    MAX_IMAGE_PIXELS,
)

SERVING_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "predict_pixels"
METADATA_SIGNATURE = "metadata"
EXPLAIN_SIGNATURE = "explain"
EXPLAIN_CLASS_SIGNATURE = "explain_class"
OUTPUT_KEYS: tuple[str, ...] = ("probabilities", "class_id", "class_name")
EXPLAIN_KEYS: tuple[str, ...] = ("probabilities", "class_id", "heatmap")


def check_batch(batch: Any, max_images: int = MAX_BATCH_IMAGES) -> Any:
    """``batch`` unchanged, failing with ``InvalidArgumentError`` when its first dimension is
    above ``max_images``.

    TensorFlow (and so TensorFlow Serving) fills a request tensor up to its declared shape from
    the values sent, so a few bytes can declare a batch of 100,000 images; the signatures
    refuse such a batch before any per-image work.
    """
    import tensorflow as tf

    count = tf.shape(batch)[0]
    refuse = tf.debugging.Assert(
        count <= max_images,
        [tf.strings.format(
            "a batch of {} images; at most {} per request (MAX_BATCH_IMAGES): split it",
            (count, max_images))],
        name="too_many_images",
    )
    with tf.control_dependencies([refuse]):
        return tf.identity(batch)


def decode_and_resize(image_bytes: Any, size: int) -> Any:
    """Decode a batch of JPEG/PNG strings to float32 ``[N, size, size, 3]`` 0-255 pixels.

    Before anything is decoded the batch is checked from the image headers alone: at most
    ``MAX_BATCH_IMAGES`` images, each JPEG or PNG of at most ``MAX_IMAGE_PIXELS``, together at
    most ``MAX_BATCH_PIXELS``; otherwise ``InvalidArgumentError`` names the image and the limit
    (TF Serving answers INVALID_ARGUMENT). Each image then goes through
    ``lungtf.data.pipeline.decode_resize``, the training pipeline's own decode and squish-resize
    (antialiased bilinear, rounded to 8 bits), so served tiles are preprocessed exactly as
    training tiles were. Tests and benchmarks call this too.
    """
    import tensorflow as tf

    from lungtf.data.pipeline import checked_size, decode_resize

    image_bytes = check_batch(image_bytes)
    sizes = tf.map_fn(
        lambda i: checked_size(image_bytes[i], MAX_IMAGE_PIXELS, i),
        tf.range(tf.shape(image_bytes)[0]),
        fn_output_signature=tf.TensorSpec([2], tf.int64),
    )
    # checked_size holds each side to 1..MAX_IMAGE_PIXELS first: no product or sum can wrap
    total = tf.reduce_sum(sizes[:, 0] * sizes[:, 1])
    refuse = tf.debugging.Assert(
        total <= MAX_BATCH_PIXELS,
        [tf.strings.format(
            "the images of the batch hold {} pixels together; at most {} per request "
            "(MAX_BATCH_PIXELS): send fewer or smaller images", (total, MAX_BATCH_PIXELS))],
        name="too_many_batch_pixels",
    )

    def one(data: Any) -> Any:
        return tf.cast(decode_resize(data, size), tf.float32)

    spec = tf.TensorSpec((size, size, 3), tf.float32)
    with tf.control_dependencies([refuse]):
        return tf.map_fn(one, tf.identity(image_bytes), fn_output_signature=spec)


def check_class_ids(class_ids: Any, image_bytes: Any) -> Any:
    """``class_ids`` unchanged, failing with ``InvalidArgumentError`` unless it holds one id in
    ``[0, len(CLASS_NAMES))`` per image of ``image_bytes`` (``explain_class``'s input)."""
    import tensorflow as tf

    count, n_classes = tf.shape(image_bytes, out_type=tf.int64)[0], len(CLASS_NAMES)
    one_each = tf.debugging.Assert(
        tf.shape(class_ids, out_type=tf.int64)[0] == count,
        [tf.strings.format("class_id holds {} ids for {} images; send one class id per image",
                           (tf.shape(class_ids)[0], count))],
        name="class_id_per_image",
    )
    known = tf.debugging.Assert(
        tf.reduce_all((class_ids >= 0) & (class_ids < n_classes)),
        [tf.strings.format(
            "class_id {} out of range; ids are 0-{} for " + ", ".join(CLASS_NAMES),
            (class_ids, n_classes - 1))],
        name="class_id_in_range",
    )
    with tf.control_dependencies([one_each, known]):
        return tf.identity(class_ids)


def build_signatures(model: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """The lungtf signatures (see module docstring) as traced concrete functions, by name.

    Each is traced once here and saved as traced: ``keras.export.ExportArchive.write_out``
    traced every endpoint outside ``tf.saved_model.save``'s save context and again inside it
    (the context is part of TensorFlow's trace cache key), so every export built each graph
    twice (``tests/test_export.py::test_export_traces_each_graph_once``).
    """
    import tensorflow as tf

    from lungtf.evaluate.gradcam import PREDICTED, explainer

    size = int(metadata["image_size"])
    temperature = float(metadata["temperature"])
    meta_json = json.dumps(metadata, sort_keys=True)

    def calibrate(probs: Any) -> Any:
        if temperature == 1.0:
            return probs
        return tf.nn.softmax(tf.math.log(tf.maximum(probs, 1e-12)) / temperature, axis=-1)

    @tf.function(autograph=False)  # one traced graph for both predict signatures
    def predict(pixels: Any) -> dict[str, Any]:
        probs = calibrate(tf.cast(model(pixels, training=False), tf.float32))
        class_id = tf.argmax(probs, axis=-1, output_type=tf.int64)
        names = tf.gather(tf.constant(list(CLASS_NAMES)), class_id)
        return {"probabilities": probs, "class_id": class_id, "class_name": names}

    gradcam = explainer(model, calibrate)  # the graph lungtf.evaluate.gradcam runs

    def explain(image_bytes: Any, class_ids: Any) -> dict[str, Any]:
        pixels = decode_and_resize(image_bytes, size)
        heatmap, class_id, probs = gradcam(pixels, class_ids)
        return {"probabilities": probs, "class_id": class_id, "heatmap": heatmap}

    image_spec = tf.TensorSpec([None], tf.string, name="image_bytes")
    endpoints = {
        SERVING_SIGNATURE: (
            lambda image_bytes: predict(decode_and_resize(image_bytes, size)), [image_spec]
        ),
        PIXELS_SIGNATURE: (
            lambda pixels: predict(check_batch(pixels)),
            [tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")],
        ),
        METADATA_SIGNATURE: (lambda: {"json": tf.constant(meta_json)}, []),
        EXPLAIN_SIGNATURE: (
            lambda image_bytes: explain(
                image_bytes, tf.fill(tf.shape(image_bytes), tf.constant(PREDICTED, tf.int64))
            ),
            [image_spec],
        ),
        EXPLAIN_CLASS_SIGNATURE: (
            lambda image_bytes, class_id: explain(
                image_bytes, check_class_ids(class_id, image_bytes)
            ),
            [image_spec, tf.TensorSpec([None], tf.int64, name="class_id")],
        ),
    }
    return {
        name: tf.function(fn, input_signature=spec, autograph=False).get_concrete_function()
        for name, (fn, spec) in endpoints.items()
    }
