"""``model.input_norm`` (``--input-norm``): the model's ``preprocess`` layer chosen apart from the
backbone, refused where the pretrained weights expect another input, kept through save/load and
export, pretrained with (``python -m lungtf.pretrain --input-norm``) and its own recipe id."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from test_export import jpeg_tiles

from bench import cv
from lungtf import export
from lungtf.config import ModelConfig, RunConfig, resolve_run_config
from lungtf.models import build_model
from lungtf.models.registry import IMAGENET_MEAN, IMAGENET_STD
from lungtf.pretrain import main as pretrain_main
from lungtf.serving.models import load_servable
from lungtf.train.cli import _overrides, build_parser

SIZE = 32
UNIT = ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def mean_std(model: keras.Model) -> tuple[tuple, tuple]:
    layer = model.get_layer("preprocess")
    return tuple(layer.mean), tuple(layer.std)


def run(input_norm: str, weights: str, backbone: str = "regnet:200mf") -> RunConfig:
    return RunConfig(model=ModelConfig(weights=weights, input_norm=input_norm),
                     backbones=(backbone,))


def test_flag_and_yaml_resolve_and_bad_values_are_refused():
    cfg = resolve_run_config("cpu", None, _overrides(build_parser().parse_args(
        ["--input-norm", "imagenet"])))
    assert cfg.model.input_norm == "imagenet"
    cfg.validate()  # the cpu preset trains from scratch (weights none)
    assert resolve_run_config("cpu").model.input_norm == "default"
    assert resolve_run_config(None, None, {"model": {"input_norm": "unit"}}).model.input_norm \
        == "unit"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--input-norm", "caffe"])
    with pytest.raises(ValueError, match="input_norm must be one of default, unit, imagenet; "
                                         "got 'caffe'"):
        ModelConfig(input_norm="caffe").validate()


@pytest.mark.parametrize(("input_norm", "weights", "backbone", "message"), [
    # pretrained weights keep the input they were trained on: refused, naming both conventions
    ("imagenet", "imagenet", "regnet:200mf",
     r"input_norm imagenet \(imagenet, torch-style.*regnet's weights imagenet: regnet's own, x / 255"),
    ("unit", "hf://timm/resnet50d.a1_in1k", "resnet50d",
     r"input_norm unit \(unit, x / 255\).*resnet50d's own, torch-style"),
    ("unit", "imagenet", "resnet50", r"resnet50's own, caffe"),
    # a backbone that normalises inside itself takes only its own
    ("unit", "none", "efficientnetv2", "normalises its input inside the backbone"),
    # accepted: from scratch, the same convention as the weights, or the default
    ("imagenet", "none", "regnet:200mf", None),
    ("unit", "none", "resnet34", None),
    ("unit", "imagenet", "regnet:200mf", None),
    ("imagenet", "hf://timm/resnet50d.a1_in1k", "resnet50d", None),
    ("imagenet", "imagenet", "resnet34", None),  # no ImageNet weights: trains from scratch
    ("default", "imagenet", "regnet:200mf", None),
])
def test_validation_against_the_weights_convention(input_norm, weights, backbone, message):
    cfg = run(input_norm, weights, backbone)
    if message is None:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match=message):
            cfg.validate()


def test_a_weights_file_follows_its_pretraining_log(tmp_path):
    """A ``.weights.h5`` of ``lungtf.pretrain`` takes the ``input_norm`` its log records (absent:
    ``default``); a weights file without a SimSiam log is taken to follow the backbone's own."""
    path = tmp_path / "regnet-200mf.weights.h5"
    h5py.File(path, "w").close()
    run("default", str(path)).validate()
    with pytest.raises(ValueError, match="differs from the input convention"):
        run("imagenet", str(path)).validate()
    (tmp_path / "regnet-200mf.json").write_text(json.dumps(
        {"method": "SimSiam (Chen & He 2021)", "input_norm": "imagenet"}))
    run("imagenet", str(path)).validate()
    with pytest.raises(ValueError, match=r"pretrained with input_norm imagenet.*use input_norm "
                                         r"imagenet"):
        run("default", str(path)).validate()
    with pytest.raises(ValueError, match="pretrained with input_norm imagenet"):
        run("unit", str(path)).validate()


@pytest.mark.parametrize(("backbone", "input_norm", "expected"), [
    ("regnet", "default", UNIT), ("regnet", "unit", UNIT), ("regnet", "imagenet", IMAGENET),
    ("resnet34", "default", IMAGENET), ("resnet34", "unit", UNIT),
])
def test_built_model_preprocess_layer(backbone, input_norm, expected):
    variant = "200mf" if backbone == "regnet" else None
    model = build_model(ModelConfig(backbone=backbone, variant=variant, weights="none",
                                    image_size=SIZE, input_norm=input_norm))
    assert mean_std(model) == expected
    x = np.full((1, 2, 2, 3), 200.0, np.float32)
    want = (200.0 - np.array(expected[0])) / np.array(expected[1])
    np.testing.assert_allclose(model.get_layer("preprocess")(x)[0, 0, 0], want, rtol=1e-6)


def test_keras_file_and_export_keep_the_chosen_normalisation(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(backbone="regnet", variant="200mf", weights="none",
                                    image_size=SIZE, input_norm="imagenet"))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert mean_std(loaded) == IMAGENET
    tiles = tf.constant(jpeg_tiles(2))
    pixels = export.decode_and_resize(tiles, SIZE)
    expected = model(pixels, training=False).numpy()
    np.testing.assert_allclose(loaded(pixels, training=False), expected, atol=1e-6)
    version = export.export_model(loaded, tmp_path / "lungtf", {})
    served = load_servable("lungtf", 1, version).function("serving_default")(image_bytes=tiles)
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)
    unit = build_model(ModelConfig(backbone="regnet", variant="200mf", weights="none",
                                   image_size=SIZE, input_norm="unit"))
    unit.set_weights(model.get_weights())  # same weights, other input: other probabilities
    assert np.abs(unit(pixels, training=False).numpy() - expected).max() > 1e-4


def test_pretrain_with_input_norm_records_it_and_the_run_must_match(tmp_path, tiny_folder):
    out = tmp_path / "pretrained"
    assert pretrain_main(["--data", str(tiny_folder), "--backbones", "regnet:200mf",
                          "--image-size", "32", "--crop-size", "16", "--epochs", "1",
                          "--batch-size", "8", "--dim", "32", "--hidden", "8",
                          "--input-norm", "imagenet", "--out", str(out), "--verbose", "0"]) == 0
    logged = json.loads((out / "regnet-200mf.json").read_text())
    assert logged["input_norm"] == "imagenet"
    path = str(out / "regnet-200mf.weights.h5")
    run("imagenet", path).validate()
    with pytest.raises(ValueError, match="pretrained with input_norm imagenet"):
        run("default", path).validate()
    model = build_model(ModelConfig(backbone="regnet", variant="200mf", weights=path,
                                    image_size=32, input_norm="imagenet"))
    assert mean_std(model) == IMAGENET


def test_recipe_id_of_input_norm(tmp_path: Path):
    plain = cv.recipe_id("--preset cpu")[1]
    assert cv.recipe_id("--preset cpu --input-norm default")[1] == plain  # old ids kept
    ids = {cv.recipe_id(f"--preset cpu --input-norm {n}")[1] for n in ("unit", "imagenet")}
    assert len(ids) == 2 and plain not in ids
