"""Backbone registry: one harness over every registered backbone, plus counts, weights and errors."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from lungtf.config import ModelConfig
from lungtf.models import (
    build_model,
    freeze_backbone,
    get_spec,
    list_backbones,
    model_parts,
    training_view,
    unfreeze_backbone,
)
from lungtf.models.portable import dtype_policy
from lungtf.models.regnet import REGNETY, GroupedConv2D, stage_plan

SIZE = 64
HARNESS_VARIANT = {"regnet": "200mf"}
"""Small variants where the default is heavy; every other backbone is built at its default."""
HEAD_LAYERS = ("pixels", "preprocess", "backbone", "pool", "dropout", "logits", "probabilities")


def pixels(n: int = 2, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def batchnorms(backbone: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNorm of the backbone, also those inside custom blocks (KerasHub's MBConv)."""
    nested = backbone._flatten_layers(include_self=False)
    return [layer for layer in nested if isinstance(layer, keras.layers.BatchNormalization)]


@pytest.fixture(scope="module", params=list_backbones())
def model(request) -> keras.Model:
    cfg = ModelConfig(
        backbone=request.param, variant=HARNESS_VARIANT.get(request.param), weights="none",
        image_size=SIZE,
    )
    return build_model(cfg)


def test_contract_layers_and_forward_batch_of_two(model):
    assert [layer.name for layer in model.layers] == list(HEAD_LAYERS)
    assert model.input.shape == (None, SIZE, SIZE, 3) and model.input.dtype == "float32"
    assert len(model.get_layer("backbone").output.shape) == 4
    probs = keras.ops.convert_to_numpy(model(pixels()))
    assert probs.shape == (2, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_one_fit_step_changes_the_weights(model):
    # Eager: tracing a graph train step costs ~30 s per backbone on a contended CPU; the graph path
    # is exercised once, in the mixed-precision test.
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", run_eagerly=True
    )
    before = [w.numpy().copy() for w in model.get_layer("logits").weights]
    history = model.fit(pixels(), np.array([0, 2]), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = model.get_layer("logits").weights
    assert any(not np.allclose(b, a.numpy()) for b, a in zip(before, after))


def test_get_config_round_trip_gives_equal_outputs(model):
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = pixels(seed=1)
    np.testing.assert_allclose(clone(x, training=False), model(x, training=False), atol=1e-6)


def test_model_parts_compose_to_the_model(model):
    preprocess, backbone, head = model_parts(model)
    x = pixels(seed=2)
    composed = head(backbone(preprocess(x), training=False))
    np.testing.assert_allclose(composed, model(x, training=False), atol=1e-6)


def test_training_view_shares_weights_and_takes_any_size(model):
    """``fit`` trains a size-free view of the model: same layers, so same outputs and weights."""
    view = training_view(model)
    assert view.input.shape == (None, None, None, 3)
    x = pixels(seed=3)
    np.testing.assert_allclose(view(x, training=False), model(x, training=False), atol=1e-6)
    assert {id(w) for w in view.weights} == {id(w) for w in model.weights}
    crops = keras.ops.convert_to_numpy(view(pixels(size=SIZE // 2), training=False))
    assert crops.shape == (2, 3) and np.all(np.isfinite(crops))


def assert_batchnorm_inference_mode(backbone: keras.Model, x: np.ndarray) -> None:
    """A training-mode pass neither uses batch statistics nor moves the moving statistics."""
    bns = batchnorms(backbone)
    moving = [bn.moving_mean.numpy().copy() for bn in bns]
    backbone(x, training=True)
    assert all(np.array_equal(m, bn.moving_mean.numpy()) for m, bn in zip(moving, bns))
    z = np.random.default_rng(4).normal(3.0, 2.0, (2, 4, 4, bns[0].moving_mean.shape[0]))
    np.testing.assert_allclose(bns[0](z, training=True), bns[0](z, training=False))


def test_freeze_and_unfreeze_trainable_counts_and_batchnorm_mode(model):
    backbone = model.get_layer("backbone")
    n_all, n_bn = len(model.trainable_weights), len(batchnorms(backbone))
    assert n_bn > 0
    x = pixels(seed=3)
    try:
        freeze_backbone(model)
        assert len(model.trainable_weights) == 2  # logits kernel + bias
        assert_batchnorm_inference_mode(backbone, x)
        unfreeze_backbone(model)  # fine-tuning: BatchNorm keeps its statistics (gamma, beta frozen)
        assert len(model.trainable_weights) == n_all - 2 * n_bn
        assert_batchnorm_inference_mode(backbone, x)
    finally:
        unfreeze_backbone(model, train_batchnorm=True)
    assert len(model.trainable_weights) == n_all
    moving = batchnorms(backbone)[0].moving_mean.numpy().copy()
    backbone(x, training=True)
    assert not np.array_equal(moving, batchnorms(backbone)[0].moving_mean.numpy())


def trainable_count(model: keras.Model) -> int:
    """Trainable parameters: what papers and torchvision count (BN statistics are buffers)."""
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_resnet34_parameter_count_matches_reference():
    model = build_model(ModelConfig(backbone="resnet34", weights="none", image_size=32, num_classes=1000))
    assert trainable_count(model) == 21_797_672  # torchvision resnet34


def test_regnety_default_parameter_count_matches_the_paper():
    model = build_model(ModelConfig(backbone="regnet", weights="none", image_size=32, num_classes=1000))
    assert model.name == "regnet_1.6gf"
    assert trainable_count(model) == pytest.approx(11.2e6, rel=0.02)  # pycls RegNetY-1.6GF: 11.2 M


@pytest.mark.parametrize(
    "variant, widths, depths",
    [
        ("200mf", [24, 56, 152, 368], [1, 1, 4, 7]),
        ("800mf", [64, 128, 320, 768], [1, 3, 8, 2]),
        ("1.6gf", [48, 120, 336, 888], [2, 6, 17, 2]),
        ("3.2gf", [72, 216, 576, 1512], [2, 5, 13, 1]),
    ],
)
def test_regnety_stage_widths_match_published_models(variant, widths, depths):
    plan = stage_plan(REGNETY[variant])
    assert [w for w, _, _ in plan] == widths and [d for _, d, _ in plan] == depths
    assert all(w % g == 0 for w, _, g in plan)


def test_unknown_backbone_and_variant_list_the_valid_names():
    with pytest.raises(ValueError, match="resnet50, efficientnetv2") as err:
        build_model(ModelConfig(backbone="vgg16", weights="none"))
    assert "vgg16" in str(err.value)
    with pytest.raises(ValueError, match="b0, b1, b2, b3, s, m, l"):
        get_spec("efficientnetv2").resolve_variant("b7")


def test_imagenet_refused_for_from_scratch_backbones():
    for name in list_backbones():
        spec = get_spec(name)
        if not spec.imagenet:
            assert spec.from_scratch
            with pytest.raises(ValueError, match="--weights none"):
                build_model(ModelConfig(backbone=name, weights="imagenet", image_size=32))


def test_imagenet_fetch_fails_fast_when_unreachable(offline):
    cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    if any(cached.glob("resnet50*notop*.h5")):
        pytest.skip(f"ResNet50 ImageNet weights already cached in {cached}: no fetch to fail")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"resnet50.*--weights PATH.*resnet50=PATH.*--weights none"):
        build_model(ModelConfig(backbone="resnet50", weights="imagenet", image_size=32))
    assert time.monotonic() - start < 30


def test_backbone_weights_file_round_trip(tmp_path):
    cfg = ModelConfig(backbone="regnet", variant="200mf", weights="none", image_size=32)
    source = build_model(cfg)
    path = tmp_path / "backbone.weights.h5"
    source.get_layer("backbone").save_weights(path)
    loaded = build_model(replace(cfg, weights=str(path)))
    for a, b in zip(source.get_layer("backbone").weights, loaded.get_layer("backbone").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    features = pixels(size=32)
    np.testing.assert_allclose(
        source.get_layer("backbone")(features), loaded.get_layer("backbone")(features), atol=1e-6
    )
    wrong = replace(cfg, variant="400mf", weights=str(path))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="does not fit regnet variant 400mf"):
        warnings.simplefilter("ignore")  # Keras warns once per layer it cannot match
        build_model(wrong)


def test_keras_file_reloads_with_custom_layers(tmp_path):
    model = build_model(ModelConfig(backbone="resnet34", weights="none", image_size=32, dropout=0.0))
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert reloaded.get_layer("preprocess").get_config() == model.get_layer("preprocess").get_config()
    x = pixels(size=32)
    np.testing.assert_allclose(reloaded(x, training=False), model(x, training=False), atol=1e-6)


def test_mixed_precision_keeps_probabilities_float32():
    with dtype_policy("mixed_bfloat16"):
        model = build_model(
            ModelConfig(backbone="regnet", variant="200mf", weights="none", image_size=32)
        )
    assert model.get_layer("logits").compute_dtype == "bfloat16"
    assert model.get_layer("backbone").layers[1].compute_dtype == "bfloat16"
    assert model.get_layer("preprocess").compute_dtype == "float32"
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
    history = model.fit(pixels(size=32), np.array([1, 2]), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    probs = model(pixels(size=32))
    assert probs.dtype == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(probs).sum(axis=1), 1.0, rtol=1e-5)


def test_grouped_conv_depthwise_rewrite_equals_grouped_convolution():
    x = np.random.default_rng(5).normal(size=(2, 9, 9, 48)).astype("float32")
    fast = GroupedConv2D(48, 3, strides=2, group_width=8, implementation="depthwise")
    y = fast(x)
    reference = keras.layers.Conv2D(48, 3, strides=2, padding="same", groups=6, use_bias=False)
    reference.build(x.shape)
    reference.set_weights(fast.get_weights())
    np.testing.assert_allclose(y, reference(x), atol=1e-5)
    assert tuple(y.shape) == fast.compute_output_shape(x.shape) == (2, 5, 5, 48)
    clone = GroupedConv2D.from_config(fast.get_config())
    assert clone.get_config() == fast.get_config()
    traced = tf.function(fast, input_signature=[tf.TensorSpec([None, None, None, 48])])
    np.testing.assert_allclose(traced(x), y, atol=1e-6)  # dynamic shapes in a graph (export)
    with pytest.raises(ValueError, match="multiple of group_width"):
        GroupedConv2D(48, 3, group_width=7)(x)


def test_caffe_preprocess_equals_keras_preprocess_input():
    model = build_model(ModelConfig(backbone="resnet50", weights="none", image_size=32))
    x = pixels(size=32)
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(model.get_layer("preprocess")(x), expected, atol=1e-4)


def test_readme_backbone_table_is_the_registrys():
    from lungtf.models.__main__ import BEGIN, END, backbone_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    shown = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert shown == backbone_table().strip(), "run: python -m lungtf.models --update README.md"


def _scratch_digest(backbone: str) -> tuple[str, list[np.ndarray]]:
    keras.utils.set_random_seed(0)
    built = build_model(ModelConfig(backbone=backbone, variant=HARNESS_VARIANT.get(backbone),
                                    weights="none", image_size=SIZE))
    weights = [np.asarray(w) for w in built.weights]
    kernels = [w for w, v in zip(weights, built.weights) if v.path.endswith("kernel")]
    return hashlib.md5(b"".join(w.tobytes() for w in weights)).hexdigest(), kernels


def test_from_scratch_kernels_are_independent_and_seeded():
    """Built from scratch (resnet34, regnet), no two kernels start equal, and the same seed gives
    the same weights in another process. Checked: with one shared initialiser instance (its seed
    drawn at import), every same-shaped kernel started equal (e.g. regnet's s1_b1_a_conv and
    s1_b1_proj_conv), and the test_export round trip's untrained RegNet differed from process
    to process (it now and then gave a blank Grad-CAM map)."""
    import subprocess
    import sys

    backbones = ("resnet34", "regnet")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from test_models import "
              "_scratch_digest\nfor b in sys.argv[2:]: print(_scratch_digest(b)[0])")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    other = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), *backbones],
                           capture_output=True, text=True, env=env, check=True, timeout=180)
    here = [_scratch_digest(b) for b in backbones]
    assert other.stdout.split()[-2:] == [digest for digest, _ in here]
    for kernels in (k for _, k in here):
        same = [(i, j) for i in range(len(kernels)) for j in range(i)
                if kernels[i].shape == kernels[j].shape and np.array_equal(kernels[i], kernels[j])]
        assert not same, same
