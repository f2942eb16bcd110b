"""RegNetY ImageNet weights: keras.applications' (tf-keras) checkpoints mapped onto our RegNetY.

The reference is tf-keras's own ``RegNetY...`` (a test-only dependency), with random weights so
that no download is needed: saved in the legacy HDF5 layout that the published ``_notop.h5``
files use, loaded through our ``--weights`` path, and compared on random images.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from lungtf.config import ModelConfig
from lungtf.models import build_model, model_parts
from lungtf.models.regnet_weights import REFERENCE, file_name, is_reference_file

tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (dev extra) is the reference RegNetY")

SIZE = 64


def reference_regnet(variant: str, seed: int = 0):
    """tf-keras RegNetY ``variant`` (headless, with its Rescaling) with random, non-trivial weights.

    Random BatchNorm statistics and affine parameters too, so that a swapped gamma/beta or
    mean/variance would show in the outputs; kernels He-scaled and each block's last BatchNorm
    scaled down so that activations stay of order 1-10 through 27 blocks (float32 sums of
    values in the thousands would differ by more than 1e-4 in any two implementations).
    """
    model_name = REFERENCE[variant][0]
    builder = getattr(tf_keras.applications, "RegNetY" + model_name[-3:])
    model = builder(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    rng = np.random.default_rng(seed)
    for w in model.weights:
        shape, kind = tuple(w.shape), w.name.split("/")[-1].split(":")[0]
        if kind == "gamma" and "_conv_1x1_2_bn" in w.name:
            value = rng.uniform(0.1, 0.3, shape)  # small residual branches: deep sums stay O(1)
        elif kind == "kernel":
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif kind in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, beta, moving_mean
            value = rng.normal(0, 0.1, shape)
        w.assign(value.astype("float32"))
    return model


@pytest.mark.parametrize("variant", ["200mf", "1.6gf"])  # 1.6gf: the default variant
def test_reference_checkpoint_maps_onto_our_regnety(variant, tmp_path):
    reference = reference_regnet(variant)
    path = tmp_path / file_name(variant)
    reference.save_weights(str(path))  # .h5: the legacy layout of the published files
    assert is_reference_file(str(path))
    model = build_model(
        ModelConfig(backbone="regnet", variant=variant, weights=str(path), image_size=SIZE)
    )
    preprocess, backbone, _ = model_parts(model)
    x = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    expected = reference(x, training=False).numpy()
    ours = backbone(preprocess(x), training=False).numpy()
    assert ours.shape == expected.shape and 0.1 < np.abs(expected).max() < 100
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_reference_file_of_another_variant_is_refused(tmp_path):
    path = tmp_path / file_name("200mf")
    reference_regnet("200mf").save_weights(str(path))
    with pytest.raises(ValueError, match="does not fit regnety_400mf"):
        build_model(ModelConfig(backbone="regnet", variant="400mf", weights=str(path), image_size=32))


def test_regnet_imagenet_fetch_fails_fast_naming_the_file(offline):
    cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    if (cached / file_name("200mf")).is_file():
        pytest.skip(f"RegNetY-200MF ImageNet weights already cached in {cached}: no fetch to fail")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"regnety002_notop\.h5.*--weights regnet=PATH") as err:
        build_model(ModelConfig(backbone="regnet", variant="200mf", weights="imagenet", image_size=32))
    assert time.monotonic() - start < 30
    assert "--weights none" in str(err.value)
