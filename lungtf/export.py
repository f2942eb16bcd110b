"""Export a trained model as a TF-Serving SavedModel: ``<base>/<version>/`` with fixed signatures.

``python -m lungtf.export RUN_OR_MODEL --base-path models/lungtf [--version N]``

The SavedModel is what TensorFlow Serving (production) and ``lungtf.serving`` (development) load,
so its interface is fixed here and nowhere else:

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

A version is written into a hidden temporary folder inside the base path and renamed into place,
so a server polling the base path never sees a half-written version. ``assets/lungtf.json`` and
``assets.extra/tf_serving_warmup_requests`` (PredictionLog records TF Serving replays at load) are
written with it.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

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
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "lungtf.json"


VERSION_NAME = re.compile(r"0|[1-9][0-9]{0,17}")
"""A version folder's name: 1-18 ASCII digits (so it fits TF Serving's int64 version) without a
leading zero (so the folder is ``str(version)``). ``str.isdigit`` would take ``²``, which
``int`` refuses, and ``١٢``, which ``int`` reads as 12."""


def numeric_versions(base_path: str | Path) -> list[int]:
    """Sorted integer version folders under ``base_path`` (other names are not versions)."""
    base = Path(base_path)
    if not base.is_dir():
        return []
    return sorted(
        int(p.name) for p in base.iterdir() if VERSION_NAME.fullmatch(p.name) and p.is_dir()
    )


def load_source(source: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load the model and its ``lungtf.json`` metadata from a run directory or a ``.keras`` file.

    Args:
        source: a run directory (``best/model.keras`` + ``best/lungtf.json``, as written by
            ``python -m lungtf.train``) or a ``.keras`` file, with a ``lungtf.json`` beside it
            when there is one.

    Returns:
        ``(model, metadata)``; metadata is ``{}`` when no ``lungtf.json`` exists.

    Raises:
        FileNotFoundError: when ``source`` is neither.
    """
    import keras

    import lungtf.models  # noqa: F401  (registers the custom layers the .keras file may hold)

    src = Path(source)
    if src.is_dir():
        model_path = src / "best" / "model.keras"
    elif src.suffix == ".keras" and src.is_file():
        model_path = src
    else:
        raise FileNotFoundError(
            f"expected a run directory (with best/model.keras) or a .keras file; got {source}"
        )
    if not model_path.is_file():
        raise FileNotFoundError(f"run directory {src} has no best/model.keras")
    meta_path = model_path.parent / METADATA_FILE
    metadata = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    return keras.models.load_model(model_path, compile=False), metadata


def complete_metadata(model: Any, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Fill what export needs (image size, class names, temperature, versions) and check it.

    Raises:
        ValueError: when the model's input is not square RGB, or the metadata disagrees with the
            model or with ``CLASS_NAMES``.
    """
    import keras
    import tensorflow as tf

    import lungtf

    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or shape[1] is None:
        raise ValueError(f"model input must be [None, S, S, 3] raw pixels; got {list(shape)}")
    meta = dict(metadata or {})
    meta.setdefault("image_size", int(shape[1]))
    meta.setdefault("class_names", list(CLASS_NAMES))
    meta.setdefault("temperature", 1.0)
    meta.setdefault(
        "versions",
        {"lungtf": lungtf.__version__, "tensorflow": tf.__version__, "keras": keras.__version__},
    )
    if int(meta["image_size"]) != shape[1]:
        raise ValueError(f"lungtf.json image_size {meta['image_size']} != model input {shape[1]}")
    if list(meta["class_names"]) != list(CLASS_NAMES):
        raise ValueError(f"lungtf.json class_names {meta['class_names']} != {list(CLASS_NAMES)}")
    if not float(meta["temperature"]) > 0:
        raise ValueError(f"temperature must be > 0; got {meta['temperature']}")
    return meta


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


def save_signatures(signatures: dict[str, Any], path: Path, options: Any) -> None:
    """``tf.saved_model.save`` of ``signatures`` (concrete functions) with the variables they
    read, and nothing else: no function is traced again."""
    import tensorflow as tf

    variables = {id(v): v for fn in signatures.values() for v in fn.variables}
    holder = tf.Module()
    holder.model_variables = list(variables.values())
    tf.saved_model.save(holder, str(path), signatures=signatures, options=options)


def warmup_images(size: int, count: int = 3) -> list[bytes]:
    """Deterministic JPEG tiles of the model's size for the warmup requests."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_warmup(path: Path, model_name: str, size: int) -> int:
    """Write PredictionLog records TF Serving replays at load: ``serving_default`` (batch 1 and
    3), ``predict_pixels``, ``explain`` and ``explain_class`` (batch 1).

    Returns:
        The number of records written.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    images = warmup_images(size)
    pixels = np.zeros((1, size, size, 3), np.float32)
    requests = []
    for batch in (images[:1], images):
        req = predict_pb2.PredictRequest()
        req.model_spec.name, req.model_spec.signature_name = model_name, SERVING_SIGNATURE
        req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
        requests.append(req)
    req = predict_pb2.PredictRequest()
    req.model_spec.name, req.model_spec.signature_name = model_name, PIXELS_SIGNATURE
    req.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    requests.append(req)
    for name in (EXPLAIN_SIGNATURE, EXPLAIN_CLASS_SIGNATURE):
        req = predict_pb2.PredictRequest()
        req.model_spec.name, req.model_spec.signature_name = model_name, name
        req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images[:1], dtype=tf.string))
        if name == EXPLAIN_CLASS_SIGNATURE:
            req.inputs["class_id"].CopyFrom(tf.make_tensor_proto([0], dtype=tf.int64))
        requests.append(req)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for req in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=req)
            )
            writer.write(log.SerializeToString())
    return len(requests)


def export_model(
    model: Any,
    base_path: str | Path,
    metadata: dict[str, Any] | None = None,
    version: int | None = None,
    model_name: str = "lungtf",
) -> Path:
    """Write ``model`` as SavedModel version ``<base_path>/<version>/`` atomically.

    What is written is ``lungtf.models.portable.portable_copy(model)``: the same weights in a
    float32 graph with device-independent layers (no float16 compute, no XLA-must-compile
    function), whatever dtype policy and device ``model`` was trained under, so stock TF Serving
    on a CPU loads it; its probabilities equal a float32 model's.

    Args:
        model: a lungtf Keras model (input raw 0-255 pixels ``[None, S, S, 3]``, softmax output).
        base_path: the model's base path, as TF Serving's ``base_path``; created if missing.
        metadata: ``lungtf.json`` contents; missing fields are filled from the model.
        version: the version number; the next integer after the existing ones when ``None``.
        model_name: the model name written into the warmup requests.

    Returns:
        The version directory.

    Raises:
        FileExistsError: when ``version`` already exists (versions are immutable).
        ValueError: on a negative version or metadata that disagrees with the model.
    """
    import tensorflow as tf

    from lungtf.models.portable import portable_copy

    base = Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    existing = numeric_versions(base)
    if version is None:
        version = existing[-1] + 1 if existing else 1
    if version < 0:
        raise ValueError(f"version must be a non-negative integer; got {version}")
    target = base / str(version)
    if target.exists():
        raise FileExistsError(f"version {version} already exists at {target}; versions: {existing}")
    meta = complete_metadata(model, metadata)
    model = portable_copy(model)
    # Custom gradients (tf.nn.silu's...) are not saved: nothing differentiates a served graph
    # (``explain`` holds its gradient ops already), and tracing them took ~45 % of an export
    # (efficientnetv2_rw_t at 64 px: 40 s of CPU -> 22 s).
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tmp = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=base))
    try:
        save_signatures(build_signatures(model, meta), tmp, options)
        (tmp / "assets").mkdir(exist_ok=True)
        (tmp / "assets" / METADATA_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        write_warmup(tmp / "assets.extra" / WARMUP_FILE, model_name, int(meta["image_size"]))
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m lungtf.export RUN_OR_MODEL --base-path DIR [--version N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lungtf.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("source", help="run directory (best/model.keras) or a .keras file")
    parser.add_argument("--base-path", default="models/lungtf", help="model base path")
    parser.add_argument("--version", type=int, default=None, help="version (default: next)")
    parser.add_argument("--model-name", default="lungtf", help="name used in warmup requests")
    args = parser.parse_args(argv)
    try:
        model, metadata = load_source(args.source)
        target = export_model(model, args.base_path, metadata, args.version, args.model_name)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
