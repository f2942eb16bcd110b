"""lungtf.client end to end: a tiny trained model exported and served by the dev server in a
subprocess; real tiles through LungClient and the command line, compared with in-process Keras."""

from __future__ import annotations

import csv
import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2
from test_export import make_tiny_model
from test_serving import launch, wait_ready

from lungtf import export
from lungtf.client import LungClient, LungClientError, main, parse_predictions, split_batches
from lungtf.client.api import RETRIES
from lungtf.constants import CLASS_NAMES, MAX_BATCH_IMAGES, MAX_BATCH_PIXELS
from lungtf.evaluate import gradcam


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A tiny trained model, exported as version 1 and served on a free loopback port."""
    root = tmp_path_factory.mktemp("client")
    proc = launch(
        ["--model-base-path", str(root / "lungtf"), "--poll-seconds", "0.3"], root / "log"
    )
    model = make_tiny_model(seed=3)
    export.export_model(model, root / "lungtf", {"split_protocol": "grouped"})
    target = wait_ready(proc, root / "log")
    yield {"model": model, "target": target, "base": root / "lungtf"}
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture
def tiles(request: pytest.FixtureRequest, tmp_path: Path) -> list[Path]:
    """Four real LC25000 tiles per class when the shared data is present, else tiny JPEGs."""
    try:
        root = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        rng = np.random.default_rng(5)
        paths = []
        for c, name in enumerate(CLASS_NAMES):
            for i in range(4):
                img = rng.normal(70, 30, (48, 48, 3))
                img[..., c] += 120
                paths.append(tmp_path / name / f"{i}.jpeg")
                paths[-1].parent.mkdir(exist_ok=True)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(paths[-1])
        return paths
    return [p for name in CLASS_NAMES for p in sorted((root / name).glob("*.jp*g"))[:4]]


def in_process(model: object, images: list[bytes]) -> np.ndarray:
    pixels = export.decode_and_resize(tf.constant(images), 32)
    return model(pixels, training=False).numpy()


def test_predict_paths_bytes_and_pil_match_keras(served: dict, tiles: list[Path]) -> None:
    client = LungClient(served["target"], timeout=60)
    expected = in_process(served["model"], [p.read_bytes() for p in tiles])
    by_path = client.predict(tiles)
    by_bytes = client.predict([p.read_bytes() for p in tiles])
    for preds in (by_path, by_bytes):
        got = np.array([[p.probabilities[c] for c in CLASS_NAMES] for p in preds])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert [p.class_id for p in preds] == expected.argmax(axis=1).tolist()
        assert [p.label for p in preds] == [CLASS_NAMES[i] for i in expected.argmax(axis=1)]
    pil = Image.open(tiles[0]).convert("RGB")
    png = io.BytesIO()
    pil.save(png, format="PNG")
    (one,) = client.predict([pil])
    want = in_process(served["model"], [png.getvalue()])[0]
    np.testing.assert_allclose(list(one.probabilities.values()), want, atol=1e-5)
    client.close()


def test_parse_typed_fields_as_tf_serving_sends_them() -> None:
    response = predict_pb2.PredictResponse()
    probs = response.outputs["probabilities"]
    probs.dtype = tf.float32.as_datatype_enum
    probs.tensor_shape.dim.add(size=2)
    probs.tensor_shape.dim.add(size=3)
    probs.float_val.extend([0.1, 0.7, 0.2, 0.6, 0.3, 0.1])
    ids = response.outputs["class_id"]
    ids.dtype = tf.int64.as_datatype_enum
    ids.tensor_shape.dim.add(size=2)
    ids.int64_val.extend([1, 0])
    preds = parse_predictions(response, 2)
    assert [(p.label, p.class_id) for p in preds] == [("lung_n", 1), ("lung_aca", 0)]
    assert preds[0].probabilities == pytest.approx(
        {"lung_aca": 0.1, "lung_n": 0.7, "lung_scc": 0.2}
    )
    with pytest.raises(LungClientError, match=r"expected probabilities \[3, 3\]"):
        parse_predictions(response, 3)


def test_small_byte_budget_splits_into_several_requests(served: dict, tiles: list[Path]) -> None:
    data = [p.read_bytes() for p in tiles]
    budget = 2 * max(map(len, data))
    batches = list(split_batches(data, budget, 64))
    assert len(batches) > 1 and [b for batch in batches for b in batch] == data
    assert all(sum(map(len, b)) <= budget for b in batches)
    assert list(map(len, split_batches([b"x"] * 5, 100, 2))) == [2, 2, 1]
    calls = []
    client = LungClient(served["target"], max_batch_bytes=budget)
    preds = client.predict(data, progress=calls.append)
    whole = LungClient(served["target"]).predict(data)
    assert calls[-1] == len(data) and len(calls) == len(batches)
    assert [p.label for p in preds] == [p.label for p in whole]
    for split, one_call in zip(preds, whole):  # batch size changes float rounding only
        np.testing.assert_allclose(
            list(split.probabilities.values()), list(one_call.probabilities.values()), atol=1e-6
        )


def test_metadata_status_and_server_errors(served: dict) -> None:
    client = LungClient(served["target"])
    meta = client.metadata()
    assert meta["class_names"] == list(CLASS_NAMES) and meta["split_protocol"] == "grouped"
    assert client.status() == {
        "model": "lungtf",
        "versions": [{"version": 1, "state": "AVAILABLE", "error_code": 0, "error_message": ""}],
    }
    with pytest.raises(LungClientError) as err:
        client.predict([b"definitely not a picture"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_bytes string [1]" in err.value.message
    with pytest.raises(LungClientError) as err:
        LungClient(served["target"], version=5).status()
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(TypeError, match="got int"):
        client.predict([3])


def test_unavailable_is_retried_with_backoff_and_not_found_is_not(served: dict) -> None:
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = LungClient(f"127.0.0.1:{port}", timeout=5, retries=2, backoff=0.2)
    start = time.perf_counter()
    with pytest.raises(LungClientError) as err:
        client.status()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.perf_counter() - start >= 0.1 + 0.2  # two backoffs, at least half of 0.2 and 0.4
    assert err.value.attempts == 3 and "gave up after 3 attempt(s)" in err.value.message
    start = time.perf_counter()
    with pytest.raises(LungClientError) as err:
        LungClient(served["target"], retries=2, backoff=1.0, model_name="colon").status()
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert time.perf_counter() - start < 1.0  # not retried


def test_command_line_retries_is_how_many_times_a_refused_call_is_sent_again(
    capsys: pytest.CaptureFixture,
) -> None:
    """``status`` against a loopback port nobody listens on (UNAVAILABLE, retried): with
    ``--retries 0`` it gives up after one attempt, with ``--retries 1`` after two, by default
    after ``RETRIES`` + 1; a negative count is refused before any call. Fails on the CLI
    before ``--retries`` (unrecognized argument, exit 2)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    for flags, attempts in [(["--retries", "0"], 1), (["--retries", "1"], 2), ([], RETRIES + 1)]:
        assert main(["status", "--target", target, "--timeout", "10", *flags]) == 1
        err = capsys.readouterr().err
        assert "UNAVAILABLE" in err and f"gave up after {attempts} attempt(s)" in err, err
    with pytest.raises(SystemExit) as stop:
        main(["status", "--target", target, "--retries", "-1"])
    assert stop.value.code == 2
    assert "--retries must be >= 0 (0: no retry); got -1" in capsys.readouterr().err


def test_command_line_predict_and_status(
    served: dict, tiles: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "preds.csv"
    folder = tmp_path / "more" / "nested"
    folder.mkdir(parents=True)
    for p in tiles[6:9]:
        shutil.copy(p, folder / p.name)
    args = ["predict", "--target", served["target"], *map(str, tiles[:6]), str(tmp_path / "more")]
    assert main([*args, "--out", str(out), "--batch-size", "4"]) == 0
    assert "9/9 images" in capsys.readouterr().err  # progress bar
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows[:6]] == list(map(str, tiles[:6])) and len(rows) == 9
    assert set(rows[0]) == {"path", "label", "class_id", *CLASS_NAMES}
    for row in rows:
        probs = [float(row[c]) for c in CLASS_NAMES]
        assert abs(sum(probs) - 1) < 1e-4 and row["label"] == CLASS_NAMES[int(row["class_id"])]
    assert main(["status", "--target", served["target"]]) == 0
    assert '"state": "AVAILABLE"' in capsys.readouterr().out
    assert main(["predict", "--target", served["target"], str(tmp_path / "nope")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_large_images_are_split_by_declared_pixels_and_limits_come_from_the_constants(
    served: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """32 images of 1500^2 (72 M pixels, above MAX_BATCH_PIXELS, under every byte and count
    limit) are predicted in several requests instead of one the model refuses; --batch-size
    above MAX_BATCH_IMAGES is refused before any call."""
    buf = io.BytesIO()
    Image.new("RGB", (1500, 1500), (200, 90, 160)).save(buf, format="JPEG", quality=80)
    images = [buf.getvalue()] * 32
    assert 32 * 1500**2 > MAX_BATCH_PIXELS and sum(map(len, images)) < 2 * 2**20
    calls: list[int] = []
    client = LungClient(served["target"], timeout=120)
    assert client.max_batch_images == MAX_BATCH_IMAGES
    preds = client.predict(images, progress=calls.append)
    per_call = MAX_BATCH_PIXELS // 1500**2
    assert calls == list(range(per_call, 32, per_call)) + [32]
    assert len(preds) == 32 and len({p.label for p in preds}) == 1
    client.close()
    with pytest.raises(ValueError, match=f"max_batch_images in 1..{MAX_BATCH_IMAGES}"):
        LungClient(served["target"], max_batch_images=MAX_BATCH_IMAGES + 1)
    path = tmp_path / "big.jpeg"
    path.write_bytes(buf.getvalue())
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--target", served["target"], str(path), "--batch-size", "65"])
    assert stop.value.code == 2
    assert f"--batch-size must be in 1..{MAX_BATCH_IMAGES}" in capsys.readouterr().err


def test_explain_gives_predictions_heatmaps_and_overlay_pngs(
    served: dict, tiles: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    client = LungClient(served["target"], timeout=60)
    explained = client.explain(tiles)
    assert [e.prediction for e in explained] == client.predict(tiles)
    pixels = export.decode_and_resize(tf.constant([p.read_bytes() for p in tiles]), 32)
    heat, ids, _ = gradcam.gradcam(served["model"], pixels)
    np.testing.assert_allclose(np.stack([e.heatmap for e in explained]), heat, atol=1e-4)
    assert [e.prediction.class_id for e in explained] == ids.tolist()
    out, folder = tmp_path / "overlays", tmp_path / "tiles"
    for i, tile in enumerate(tiles):  # the tiles only, not the folder they come from
        (folder / str(i % 2)).mkdir(parents=True, exist_ok=True)
        shutil.copy(tile, folder / str(i % 2) / f"{i // 2}{tile.suffix}")
    assert main(["explain", "--target", served["target"], str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(tiles) == len(list(out.glob("*.png")))  # same stems get -2, -3...
    for row in rows:
        with Image.open(row["overlay"]) as png, Image.open(row["path"]) as tile:
            assert png.format == "PNG" and png.size == tile.size
            corner = np.asarray(png.convert("RGB"))[:2, :2]
            assert (corner == 0).all()  # the label box
        assert row["label"] in CLASS_NAMES and 0 < float(row["probability"]) <= 1


def test_explain_on_a_version_without_the_signature_names_it(
    served: dict, tiles: list[Path], tmp_path: Path
) -> None:
    """A version exported before ``explain`` existed: a clear FAILED_PRECONDITION. Runs last
    in this module: the new version replaces version 1 on the server."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(served["model"])
    archive.add_endpoint(
        "serving_default",
        lambda image_bytes: {"probabilities": served["model"](
            export.decode_and_resize(image_bytes, 32), training=False)},
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    archive.write_out(str(tmp_path / "2"), verbose=False)
    shutil.move(tmp_path / "2", served["base"] / "2")
    client, any_version = (LungClient(served["target"], timeout=60, version=v) for v in (2, None))
    deadline = time.monotonic() + 120
    while not any(v["version"] == 2 for v in any_version.status()["versions"]):
        assert time.monotonic() < deadline, "version 2 never loaded"
        time.sleep(0.3)
    with pytest.raises(LungClientError) as err:
        client.explain(tiles[:1])
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 2) has no 'explain' signature" in err.value.message
    assert "python -m lungtf.export" in err.value.message
