"""lungtf.export: signatures read from saved_model.pb, outputs equal to Keras, warmup, versioning,
a portable graph (float32, no XLA-must-compile function) from mixed-precision/GPU builds, and the
``explain`` signatures equal to ``lungtf.evaluate.gradcam`` for every registered backbone."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import png_bomb
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2
from test_models import HARNESS_VARIANT
from test_models import SIZE as HARNESS_SIZE

from lungtf import export, export_signatures
from lungtf.config import ModelConfig
from lungtf.constants import CLASS_NAMES, MAX_BATCH_IMAGES
from lungtf.data.hostile import png_header
from lungtf.data.ingest import Record
from lungtf.data.pipeline import make_dataset
from lungtf.evaluate import gradcam
from lungtf.evaluate.calibration import apply_temperature
from lungtf.models import build_model, list_backbones
from lungtf.models.portable import dtype_policy, portable_copy
from lungtf.models.regnet import GroupedConv2D
from lungtf.serving.models import load_servable
from lungtf.serving.server import replay_warmup

SIZE = 32
EXPLAIN_SIGNATURES = ("explain", "explain_class")
HALF_TYPES = {tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum}


def graph_problems(version_dir: Path) -> dict[str, list[str]]:
    """What would stop stock TF Serving on a CPU from running a SavedModel as float32.

    Walks every node of the graph and of every function in its library: ``xla_must_compile``
    lists the functions and nodes carrying ``_XlaMustCompile``, ``half_ops`` the ops with a
    float16/bfloat16 type attribute (compute, casts to it, or constants of it).
    """
    saved = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
    xla, half = [], set()
    for graph in (meta.graph_def for meta in saved.meta_graphs):
        functions = list(graph.library.function)
        xla += [f.signature.name for f in functions if "_XlaMustCompile" in f.attr]
        for node in [*graph.node, *(n for f in functions for n in f.node_def)]:
            if "_XlaMustCompile" in node.attr:
                xla.append(node.name)
            for value in node.attr.values():
                if value.type in HALF_TYPES or HALF_TYPES & set(value.list.type):
                    half.add(node.op)
    return {"xla_must_compile": sorted(set(xla)), "half_ops": sorted(half)}


def make_tiny_model(seed: int = 0, size: int = SIZE) -> keras.Model:
    """A small model on the lungtf contract (raw 0-255 pixels in, softmax ``probabilities`` out),
    trained for a few steps on class-coloured noise so its outputs are not uniform."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="backbone")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    x = keras.layers.Dense(len(CLASS_NAMES), name="logits")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    labels = np.arange(24) % 3
    pixels = rng.normal(60, 30, (24, size, size, 3)).astype("float32")
    pixels[np.arange(24), :, :, labels] += 120
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(np.clip(pixels, 0, 255), labels, batch_size=8, epochs=2, verbose=0)
    return model


def jpeg_tiles(count: int, size: int = 40, seed: int = 1) -> list[bytes]:
    """Encoded JPEG tiles, not at the model size, so the resize path is exercised."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        img = rng.normal(80, 40, (size, size + 8 * i, 3))
        img[..., i % 3] += 100
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def tiny_model() -> keras.Model:
    return make_tiny_model()


@pytest.fixture(scope="module")
def exported(tiny_model: keras.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("models") / "lungtf"
    meta = {"split_protocol": "grouped", "val_metrics": {"accuracy": 0.9, "n": 3}}
    return export.export_model(tiny_model, base, meta)


def test_signatures_read_from_saved_model_pb(exported: Path) -> None:
    saved = saved_model_pb2.SavedModel.FromString((exported / "saved_model.pb").read_bytes())
    defs = saved.meta_graphs[0].signature_def
    keys = ("serving_default", "predict_pixels", "metadata", *EXPLAIN_SIGNATURES)
    assert set(keys) <= set(defs)
    for key in keys:
        assert defs[key].method_name == "tensorflow/serving/predict"
    assert {k: v.dtype for k, v in defs["serving_default"].inputs.items()} == {
        "image_bytes": tf.string.as_datatype_enum
    }
    pixels = defs["predict_pixels"].inputs["pixels"]
    assert pixels.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in pixels.tensor_shape.dim] == [-1, SIZE, SIZE, 3]
    for key in ("serving_default", "predict_pixels"):
        outs = {k: v.dtype for k, v in defs[key].outputs.items()}
        assert outs == {
            "probabilities": tf.float32.as_datatype_enum,
            "class_id": tf.int64.as_datatype_enum,
            "class_name": tf.string.as_datatype_enum,
        }
    assert {k: v.dtype for k, v in defs["metadata"].outputs.items()} == {
        "json": tf.string.as_datatype_enum
    }
    assert dict(defs["metadata"].inputs) == {}
    assert {k: v.dtype for k, v in defs["explain_class"].inputs.items()} == {
        "image_bytes": tf.string.as_datatype_enum, "class_id": tf.int64.as_datatype_enum
    }
    assert list(defs["explain"].inputs) == ["image_bytes"]
    for key in EXPLAIN_SIGNATURES:
        outs = defs[key].outputs
        assert {k: v.dtype for k, v in outs.items()} == {
            "probabilities": tf.float32.as_datatype_enum,
            "class_id": tf.int64.as_datatype_enum,
            "heatmap": tf.float32.as_datatype_enum,
        }
        # the tiny model's "backbone" is one stride-2 convolution: a 15 x 15 map at 32 px
        assert [d.size for d in outs["heatmap"].tensor_shape.dim] == [-1, 15, 15]


def test_reloaded_savedmodel_equals_keras(tiny_model: keras.Model, exported: Path) -> None:
    loaded = tf.saved_model.load(str(exported))
    tiles = jpeg_tiles(4)
    pixels = export.decode_and_resize(tf.constant(tiles), SIZE)
    expected = tiny_model(pixels, training=False).numpy()
    assert expected.std() > 1e-3  # trained: not a constant output
    by_pixels = loaded.signatures["predict_pixels"](pixels=pixels)
    by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(tiles))
    for out in (by_pixels, by_bytes):
        np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
        ids = expected.argmax(axis=1)
        np.testing.assert_array_equal(out["class_id"].numpy(), ids)
        assert [n.decode() for n in out["class_name"].numpy()] == [CLASS_NAMES[i] for i in ids]


def test_bytes_signature_matches_the_training_pipeline(
    tiny_model: keras.Model, exported: Path, tmp_path: Path
) -> None:
    files = []
    for i, data in enumerate(jpeg_tiles(3, size=50)):
        files.append(tmp_path / f"{i}.jpeg")
        files[-1].write_bytes(data)
    records = [Record(str(f), CLASS_NAMES[0]) for f in files]
    pixels, _ = next(iter(make_dataset(records, SIZE, batch_size=3, training=False)))
    served = tf.saved_model.load(str(exported)).signatures["serving_default"](
        image_bytes=tf.constant([f.read_bytes() for f in files])
    )
    expected = tiny_model(pixels, training=False).numpy()
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)


def test_metadata_signature_and_asset(exported: Path) -> None:
    loaded = tf.saved_model.load(str(exported))
    meta = json.loads(loaded.signatures["metadata"]()["json"].numpy().decode())
    assert meta == json.loads((exported / "assets" / "lungtf.json").read_text())
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["image_size"] == SIZE and meta["split_protocol"] == "grouped"
    assert meta["val_metrics"]["accuracy"] == 0.9
    assert set(meta["versions"]) == {"lungtf", "tensorflow", "keras"}


def test_temperature_scales_probabilities(tiny_model: keras.Model, tmp_path: Path) -> None:
    out = export.export_model(tiny_model, tmp_path, {"temperature": 2.0})
    tiles = tf.constant(jpeg_tiles(3))
    pixels = export.decode_and_resize(tiles, SIZE)
    probs = tiny_model(pixels, training=False).numpy()
    scaled = tf.nn.softmax(np.log(probs) / 2.0).numpy()
    signatures = tf.saved_model.load(str(out)).signatures
    got = signatures["predict_pixels"](pixels=pixels)
    np.testing.assert_allclose(got["probabilities"].numpy(), scaled, atol=1e-5)
    assert not np.allclose(scaled, probs, atol=1e-3)
    served = signatures["serving_default"](image_bytes=tiles)
    explained = signatures["explain"](image_bytes=tiles)  # calibrated as serving_default is
    np.testing.assert_allclose(explained["probabilities"], served["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(explained["class_id"], served["class_id"])


def test_warmup_records_parse_and_replay(exported: Path) -> None:
    path = exported / "assets.extra" / export.WARMUP_FILE
    logs = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(str(path))
    ]
    assert [log.predict_log.request.model_spec.signature_name for log in logs] == [
        "serving_default",
        "serving_default",
        "predict_pixels",
        *EXPLAIN_SIGNATURES,
    ]
    assert tf.make_ndarray(logs[1].predict_log.request.inputs["image_bytes"]).shape == (3,)
    assert tf.make_ndarray(logs[4].predict_log.request.inputs["class_id"]).dtype == np.int64
    assert replay_warmup(load_servable("lungtf", 1, exported)) == 5


def test_versions_are_atomic_and_sequential(tiny_model: keras.Model, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()  # non-numeric folders are not versions
    first = export.export_model(tiny_model, tmp_path)
    second = export.export_model(tiny_model, tmp_path)
    assert (first.name, second.name) == ("1", "2")
    with pytest.raises(FileExistsError, match="version 2 already exists"):
        export.export_model(tiny_model, tmp_path, version=2)
    assert export.export_model(tiny_model, tmp_path, version=7).name == "7"
    assert export.numeric_versions(tmp_path) == [1, 2, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "7", "notes"]  # no temp left


def test_export_traces_each_graph_once(
    tiny_model: keras.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each signature's graph is built once per export: the image-bytes signatures
    (serving_default, explain, explain_class) decode once each and the two explain signatures
    share one Grad-CAM graph. Through ``keras.export.ExportArchive`` every one was traced twice
    (outside ``tf.saved_model.save``'s save context and inside it): 6 decodes, 2 Grad-CAMs."""
    calls = {"decode": 0, "gradcam": 0}

    def counting(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(  # where build_signatures looks it up
        export_signatures, "decode_and_resize", counting("decode", export.decode_and_resize)
    )
    monkeypatch.setattr(
        gradcam, "gradcam_tensors", counting("gradcam", gradcam.gradcam_tensors)
    )
    version = export.export_model(tiny_model, tmp_path)
    assert calls == {"decode": 3, "gradcam": 1}
    signatures = tf.saved_model.load(str(version)).signatures
    assert set(signatures) == {"serving_default", "predict_pixels", "metadata",
                               *EXPLAIN_SIGNATURES}  # fmt: skip


def test_metadata_that_disagrees_with_the_model_is_refused(
    tiny_model: keras.Model, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="image_size 64 != model input 32"):
        export.export_model(tiny_model, tmp_path, {"image_size": 64})
    with pytest.raises(ValueError, match="class_names"):
        export.export_model(tiny_model, tmp_path, {"class_names": ["a", "b", "c"]})
    assert export.numeric_versions(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_command_line_exports_a_run_dir_and_a_keras_file(
    tiny_model: keras.Model, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "runs" / "20261127-tiny"
    (run / "best").mkdir(parents=True)
    tiny_model.save(run / "best" / "model.keras")
    meta = {"backbone": "tiny", "image_size": SIZE, "split_protocol": "grouped", "temperature": 1.0}
    (run / "best" / "lungtf.json").write_text(json.dumps(meta))
    base = tmp_path / "models" / "lungtf"
    assert export.main([str(run), "--base-path", str(base)]) == 0
    assert capsys.readouterr().out.strip() == str(base / "1")
    written = json.loads((base / "1" / "assets" / "lungtf.json").read_text())
    assert written["backbone"] == "tiny" and written["split_protocol"] == "grouped"
    lone = tmp_path / "lone.keras"  # a .keras file without lungtf.json: metadata from the model
    tiny_model.save(lone)
    assert export.main([str(lone), "--base-path", str(base), "--version", "5"]) == 0
    assert json.loads((base / "5" / "assets" / "lungtf.json").read_text())["image_size"] == SIZE
    assert export.numeric_versions(base) == [1, 5]
    assert export.main([str(lone), "--base-path", str(base), "--version", "5"]) == 2
    assert "version 5 already exists" in capsys.readouterr().err
    assert export.main([str(tmp_path / "nothing"), "--base-path", str(base)]) == 2
    assert "expected a run directory" in capsys.readouterr().err


def test_signatures_refuse_hostile_batches_before_decoding(exported: Path) -> None:
    """The caps live in the SavedModel itself, so stock tensorflow_model_server applies them."""
    signatures = tf.saved_model.load(str(exported)).signatures
    serve, pixels = signatures["serving_default"], signatures["predict_pixels"]
    tile = jpeg_tiles(1)[0]
    refused = {
        "bomb": ([tile, png_bomb()], "image 1 of the batch is 20000 x 20000 pixels"),
        "too many": ([tile] * (MAX_BATCH_IMAGES + 1), f"at most {MAX_BATCH_IMAGES} per request"),
        "too many pixels together": ([png_bomb(4096)] * 5, "at most 67108864 per request"),
        "not JPEG/PNG": ([tile, b"GIF89a" + bytes(40)], "not a JPEG or PNG image"),
    }
    for case, (batch, message) in refused.items():
        start = time.monotonic()
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
            serve(image_bytes=tf.constant(batch))
        assert time.monotonic() - start < 2, case  # refused from the headers
    with pytest.raises(tf.errors.InvalidArgumentError, match="a batch of 65 images"):
        pixels(pixels=tf.zeros([MAX_BATCH_IMAGES + 1, SIZE, SIZE, 3]))
    explain, explain_class = (signatures[key] for key in EXPLAIN_SIGNATURES)
    for batch, message in refused.values():  # the same checked decode path
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
            explain(image_bytes=tf.constant(batch))
    bad_ids = {
        "one id for two images": ([0], "class_id holds 1 ids for 2 images"),
        "unknown class": ([0, 3], "class_id [0 3] out of range; ids are 0-2 for lung_aca"),
        "negative": ([-1, 0], "class_id [-1 0] out of range"),
    }
    for case, (ids, message) in bad_ids.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
            explain_class(image_bytes=tf.constant([tile] * 2), class_id=tf.constant(ids, tf.int64))
    assert serve(image_bytes=tf.constant([tile] * MAX_BATCH_IMAGES))["class_id"].shape == (64,)
    assert serve(image_bytes=tf.constant([png_bomb(4096)]))["class_id"].shape == (1,)  # at the cap


def test_an_overflowing_png_header_cannot_lower_the_batch_pixel_budget(exported: Path) -> None:
    """0xFFFFFFFF x 0xFFFFFFFF wraps to a negative int64 product: before the fix it passed the
    per-image check and lowered the batch total, so five real 4096 x 4096 PNGs (above
    MAX_BATCH_PIXELS together) reached the decoder behind it. The exported signature, as TF
    Serving runs it, must refuse the batch from the headers, naming the overflowing image."""
    serve = tf.saved_model.load(str(exported)).signatures["serving_default"]
    side = 2**32 - 1
    batch = [png_bomb(4096)] * 5 + [png_header(side, side)]
    start = time.monotonic()
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"image 5 of the batch is {side} x "):
        serve(image_bytes=tf.constant(batch))
    assert time.monotonic() - start < 2  # refused from the headers, nothing decoded
    with pytest.raises(tf.errors.InvalidArgumentError, match="image 1 of the batch is 0 x 16"):
        serve(image_bytes=tf.constant([jpeg_tiles(1)[0], png_header(0, 16)]))


@pytest.mark.parametrize("backbone", list_backbones())
def test_every_backbone_serves_keras_probabilities_and_gradcam(backbone: str, tmp_path) -> None:
    """Round trip of every registered backbone (untrained, 64 px, calibrated): the SavedModel's
    ``serving_default`` answers what Keras computes, and its ``explain`` / ``explain_class``
    heatmaps are ``lungtf.evaluate.gradcam``'s on the same model and tiles."""
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(backbone=backbone, variant=HARNESS_VARIANT.get(backbone), weights="none",
                      image_size=HARNESS_SIZE)  # fmt: skip
    model = build_model(cfg)
    version = export.export_model(model, tmp_path / "lungtf", {"temperature": 1.5})
    signatures = load_servable("lungtf", 1, version).function
    tiles = tf.constant(jpeg_tiles(2))
    pixels = export.decode_and_resize(tiles, HARNESS_SIZE)
    expected = apply_temperature(model(pixels, training=False).numpy(), 1.5)
    served = signatures("serving_default")(image_bytes=tiles)
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)

    explained = signatures("explain")(image_bytes=tiles)
    heat, ids, _ = gradcam.gradcam(model, pixels)
    features = model.get_layer("backbone")(model.get_layer("preprocess")(pixels))
    assert explained["heatmap"].shape == (2, *features.shape[1:3])
    np.testing.assert_allclose(explained["heatmap"], heat, atol=1e-4, rtol=0)
    assert heat.max() == 1.0  # not a blank map
    np.testing.assert_array_equal(explained["class_id"], ids)
    np.testing.assert_array_equal(explained["class_id"], served["class_id"])
    np.testing.assert_allclose(explained["probabilities"], served["probabilities"], atol=1e-6)

    others = (ids + 1) % 3  # explain a class the model did not predict
    by_class = signatures("explain_class")(image_bytes=tiles, class_id=tf.constant(others))
    other_heat, _, _ = gradcam.gradcam(model, pixels, class_ids=others)
    np.testing.assert_allclose(by_class["heatmap"], other_heat, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(by_class["class_id"], others)
    np.testing.assert_allclose(by_class["probabilities"], served["probabilities"], atol=1e-6)


def grouped_regnet(policy: str, size: int = SIZE) -> keras.Model:
    """A RegNetY-200MF classifier built under ``policy`` as a GPU host builds it: every
    ``GroupedConv2D`` takes the grouped (XLA-compiled) path."""
    keras.utils.set_random_seed(3)
    with dtype_policy(policy):
        model = build_model(ModelConfig("regnet", "200mf", weights="none", image_size=size))
        config = keras.saving.serialize_keras_object(model)

        def as_gpu(c):
            if isinstance(c, list):
                return [as_gpu(v) for v in c]
            if not isinstance(c, dict):
                return c
            c = {k: as_gpu(v) for k, v in c.items()}
            if c.get("class_name") == "GroupedConv2D":
                c["config"]["implementation"] = "grouped"
            return c

        gpu_built = keras.saving.deserialize_keras_object(as_gpu(config))
    gpu_built.set_weights(model.get_weights())
    return gpu_built


def test_mixed_precision_gpu_build_exports_a_portable_float32_graph(tmp_path: Path) -> None:
    model = grouped_regnet("mixed_float16")
    convs = [la for la in model.get_layer("backbone").layers if isinstance(la, GroupedConv2D)]
    assert {c.resolved for c in convs} == {"grouped"}
    assert model.get_layer("logits").compute_dtype == "float16"
    version = export.export_model(model, tmp_path)
    assert graph_problems(version) == {"xla_must_compile": [], "half_ops": []}
    pixels = export.decode_and_resize(tf.constant(jpeg_tiles(3)), SIZE)
    served = tf.saved_model.load(str(version)).signatures["predict_pixels"](pixels=pixels)
    copy = portable_copy(model)
    assert copy.get_layer("logits").compute_dtype == "float32"
    assert {la.resolved for la in copy.get_layer("backbone").layers
            if isinstance(la, GroupedConv2D)} == {"depthwise"}  # fmt: skip
    np.testing.assert_allclose(served["probabilities"], copy(pixels, training=False), atol=1e-5)
    np.testing.assert_allclose(served["probabilities"], model(pixels, training=False), atol=1e-2)
    for a, b in zip(model.weights, copy.weights):  # the same weights, float32 either way
        assert a.dtype == b.dtype == "float32"
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_gpu_reload_before_export_is_portable(tmp_path: Path, monkeypatch) -> None:
    """``implementation=auto`` takes the grouped path when a GPU is visible at build time, so a
    checkpoint reloaded on a GPU host for export is a grouped model; the export is portable."""
    keras.utils.set_random_seed(4)
    saved = build_model(ModelConfig("regnet", "200mf", weights="none", image_size=SIZE))
    saved.save(tmp_path / "best.keras")
    real = tf.config.list_physical_devices
    monkeypatch.setattr(  # a GPU host, as GroupedConv2D.build sees it
        tf.config, "list_physical_devices",
        lambda kind=None: [*real(kind), "GPU:0"] if kind == "GPU" else real(kind),
    )  # fmt: skip
    reloaded = keras.models.load_model(tmp_path / "best.keras", compile=False)
    monkeypatch.undo()
    assert {la.resolved for la in reloaded.get_layer("backbone").layers
            if isinstance(la, GroupedConv2D)} == {"grouped"}  # fmt: skip
    version = export.export_model(reloaded, tmp_path / "models")
    assert graph_problems(version)["xla_must_compile"] == []
    pixels = export.decode_and_resize(tf.constant(jpeg_tiles(2)), SIZE)
    served = tf.saved_model.load(str(version)).signatures["predict_pixels"](pixels=pixels)
    np.testing.assert_allclose(served["probabilities"], saved(pixels, training=False), atol=1e-5)

