"""KerasHub backbones (resnet50d, efficientnetv2_rw_t): local presets, sizes, offline failure.

Everything runs offline: presets are written here by ``save_to_preset`` from randomly
initialised KerasHub backbones. The shared harness (tests/test_models.py, test_gradcam.py,
test_export.py) covers them like every other registered backbone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import keras
import keras_hub
import numpy as np
import pytest

from lungtf.config import ModelConfig
from lungtf.models import build_model, model_parts
from lungtf.models.hub import HUB, preset_normalisation
from lungtf.models.resnet import IMAGENET_MEAN, IMAGENET_STD

SIZE = 32
IMAGENET_SCALE = [1 / s for s in IMAGENET_STD]  # = 1 / (255 std) of std in 0-1 units
IMAGENET_OFFSET = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
"""The ImageConverter of both KerasHub ImageNet presets (on 0-255 pixels)."""


def random_hub_backbone(name: str, seed: int = 0) -> keras.Model:
    """The KerasHub backbone of ``name`` with random weights and random BatchNorm statistics."""
    keras.utils.set_random_seed(seed)
    hub = HUB[name]
    backbone = hub.cls(**hub.config)
    rng = np.random.default_rng(seed)
    for w in backbone.weights:
        if "moving_variance" in w.path:
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
        elif "moving_mean" in w.path:
            w.assign(rng.normal(0, 0.1, w.shape).astype("float32"))
    return backbone


@pytest.fixture(scope="module", params=sorted(HUB))
def saved_preset(request, tmp_path_factory):
    """``(name, KerasHub backbone, preset directory)``: a random backbone saved as a preset."""
    name = request.param
    backbone = random_hub_backbone(name)
    preset = tmp_path_factory.mktemp(f"{name}_preset")
    backbone.save_to_preset(str(preset))
    return name, backbone, preset


def test_local_preset_round_trip_gives_the_same_backbone(saved_preset):
    name, hub_backbone, preset = saved_preset
    model = build_model(ModelConfig(backbone=name, weights=str(preset), image_size=SIZE))
    preprocess, backbone, _ = model_parts(model)
    x = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    normalised = preprocess(x)
    expected = keras.ops.convert_to_numpy(hub_backbone(normalised, training=False))
    ours = keras.ops.convert_to_numpy(backbone(normalised, training=False))
    assert np.abs(expected).max() > 0.01
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    fresh = build_model(ModelConfig(backbone=name, weights="none", image_size=SIZE))
    assert not np.allclose(fresh.get_layer("backbone")(normalised, training=False), expected)


def test_preset_converter_must_normalise_as_our_preprocess_layer(saved_preset, tmp_path):
    name, _, preset = saved_preset
    converter_cls = {"resnet50d": keras_hub.layers.ResNetImageConverter,
                     "efficientnetv2_rw_t": keras_hub.layers.EfficientNetImageConverter}[name]
    task_like = tmp_path / "imagenet_converter"
    shutil.copytree(preset, task_like)
    converter = converter_cls(image_size=(224, 224), scale=IMAGENET_SCALE, offset=IMAGENET_OFFSET)
    converter.save_to_preset(str(task_like))
    mean, std = preset_normalisation(str(task_like))
    np.testing.assert_allclose(mean, IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(std, IMAGENET_STD, rtol=1e-6)
    build_model(ModelConfig(backbone=name, weights=str(task_like), image_size=SIZE))
    converter_cls(image_size=(224, 224), scale=1 / 255.0).save_to_preset(str(task_like))
    with pytest.raises(ValueError, match=r"normalises its input with mean \[0.0, 0.0, 0.0\]"):
        build_model(ModelConfig(backbone=name, weights=str(task_like), image_size=SIZE))


def test_directory_that_is_not_a_preset_of_the_backbone_is_refused(saved_preset, tmp_path):
    name, _, preset = saved_preset
    other = next(n for n in HUB if n != name)
    with pytest.raises(ValueError, match=f"not a KerasHub .* preset for {other}"):
        build_model(ModelConfig(backbone=other, weights=str(preset), image_size=SIZE))
    with pytest.raises(ValueError, match="cannot load weights from"):
        build_model(ModelConfig(backbone="resnet34", weights=str(preset), image_size=SIZE))


def test_efficientnetv2_rw_t_config_is_keras_hubs_timm_conversion():
    from keras_hub.src.utils.timm.convert_efficientnet import convert_backbone_config

    assert convert_backbone_config({"architecture": "efficientnetv2_rw_t"}) == (
        HUB["efficientnetv2_rw_t"].config
    )


@pytest.mark.parametrize(
    "name, timm_params", [("resnet50d", 25_576_264), ("efficientnetv2_rw_t", 13_649_388)]
)
def test_parameter_counts_match_timm(name, timm_params):
    """timm's ``resnet50d`` and ``efficientnetv2_rw_t`` (1,000-class heads) have these counts."""
    model = build_model(ModelConfig(backbone=name, weights="none", image_size=SIZE, num_classes=1000))
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == timm_params


def test_imagenet_preset_fetch_fails_fast_naming_the_handle(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))  # an empty cache: a fetch must happen
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="resnet_vd_50_imagenet") as err:
        build_model(ModelConfig(backbone="resnet50d", weights="imagenet", image_size=SIZE))
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "kaggle://keras/resnet_vd/keras/resnet_vd_50_imagenet" in message
    assert "--weights resnet50d=PATH" in message and "preset directory" in message


def test_keras_file_loads_in_a_fresh_process_after_importing_lungtf_models(tmp_path):
    """``import lungtf.models`` registers KerasHub's blocks, so a saved ``.keras`` file loads."""
    model = build_model(ModelConfig(backbone="efficientnetv2_rw_t", weights="none", image_size=SIZE))
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(2).uniform(0, 255, (1, SIZE, SIZE, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", keras.ops.convert_to_numpy(model(x, training=False)))
    script = (
        "import sys, numpy as np, keras, lungtf.models; d = sys.argv[1]; "
        "m = keras.models.load_model(d + '/m.keras'); "
        "np.testing.assert_allclose(m(np.load(d + '/x.npy'), training=False), "
        "np.load(d + '/y.npy'), atol=1e-6); print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
