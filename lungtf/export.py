"""Export a trained model as a TF-Serving SavedModel: ``<base>/<version>/`` with fixed signatures.

``python -m lungtf.export RUN_OR_MODEL --base-path models/lungtf [--version N]``

The SavedModel is what TensorFlow Serving (production) and ``lungtf.serving`` (development) load,
so its interface is fixed, in ``lungtf.export_signatures`` (``build_signatures``; its names are
re-exported here): ``serving_default(image_bytes)``, ``predict_pixels(pixels)``, ``metadata()``,
``explain(image_bytes)`` and ``explain_class(image_bytes, class_id)``, each refusing hostile
input before any decoding, in a float32 graph without XLA-must-compile functions
(``lungtf.models.portable.portable_copy`` of the model is what is written).

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

from lungtf.constants import CLASS_NAMES
from lungtf.export_signatures import (  # noqa: F401  (re-exported: lungtf.export.<name> works)
    EXPLAIN_CLASS_SIGNATURE,
    EXPLAIN_KEYS,
    EXPLAIN_SIGNATURE,
    METADATA_SIGNATURE,
    OUTPUT_KEYS,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
    build_signatures,
    check_batch,
    check_class_ids,
    decode_and_resize,
)

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
