"""Augmentation layers: every name, exact flips, rotation limit, host (OpenCV) warp against the
keras.ops warp, stain and colour jitter, serialisation, and use inside a model. Tiny arrays."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from lungtf.config import AUGMENTATIONS, DEFAULT_AUGMENT
from lungtf.data.augment import (
    RandomFlipRotate,
    RandomHEDJitter,
    RandomHSVJitter,
    build_augmenter,
    warp_host,
)
from lungtf.models.portable import dtype_policy


def _batch(n: int = 8, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _smooth(n: int = 8, size: int = 48) -> np.ndarray:
    """Blurred noise: a tissue-like image whose values change by a few levels per pixel."""
    rough = _batch(n, size // 4 + 1)
    big = tf.image.resize(rough, (size, size), method="bicubic").numpy()
    return np.clip(np.round(big), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_every_augmentation_keeps_shape_dtype_and_range(name: str):
    augmenter = build_augmenter([name], seed=3)
    batch = _batch()
    out = keras.ops.convert_to_numpy(augmenter(batch, training=True))
    assert out.shape == batch.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, batch)  # it changed something
    assert np.array_equal(keras.ops.convert_to_numpy(augmenter(batch, training=False)), batch)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("name", [*AUGMENTATIONS, "crop"])
def test_every_augmentation_computes_in_float32_under_mixed_precision(name: str, policy: str):
    """The GPU recipe builds the augmenter under mixed_float16 and runs it in the training step:
    every layer (Keras's brightness and contrast too) computes in float32 and returns what the
    float32 policy returns, called eagerly and inside a model (the training view)."""
    names, crop = ([], 24) if name == "crop" else ([name], None)
    batch = _batch(4)
    reference = keras.ops.convert_to_numpy(build_augmenter(names, seed=3, crop_size=crop)(batch))
    with dtype_policy(policy):
        eager = build_augmenter(names, seed=3, crop_size=crop)
        pixels = keras.Input((32, 32, 3))
        model = keras.Model(pixels, build_augmenter(names, seed=3, crop_size=crop)(pixels))
        assert {layer.compute_dtype for layer in eager.layers} == {"float32"}
        for augmenter in (eager, model):
            out = augmenter(batch, training=True)
            assert out.dtype == "float32"
            np.testing.assert_allclose(keras.ops.convert_to_numpy(out), reference, atol=1e-3)
        assert np.array_equal(keras.ops.convert_to_numpy(eager(batch, training=False)), batch)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
def test_flips_are_exact_and_combined(jit: bool):
    batch = _batch(64, size=8)
    augmenter = build_augmenter(["flip_horizontal", "flip_vertical"], seed=5)
    warp = tf.function(lambda x: augmenter(x, training=True), jit_compile=jit)
    out = warp(tf.constant(batch)).numpy()
    seen = set()
    for image, flipped in zip(batch, out):
        variants = {
            "none": image, "h": image[:, ::-1], "v": image[::-1], "hv": image[::-1, ::-1]
        }
        match = [k for k, v in variants.items() if np.array_equal(v, flipped)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == {"none", "h", "v", "hv"}
    only_h = build_augmenter(["flip_horizontal"], seed=5)(batch, training=True)
    for image, flipped in zip(batch, keras.ops.convert_to_numpy(only_h)):
        assert np.array_equal(flipped, image) or np.array_equal(flipped, image[:, ::-1])


def test_rotation_stays_within_the_limit():
    square = np.zeros((1, 33, 33, 3), np.float32)
    square[:, 8:25, 8:25] = 255.0
    layer = RandomFlipRotate(False, False, max_degrees=10.0, seed=1)
    for _ in range(5):
        out = keras.ops.convert_to_numpy(layer(square, training=True))[0, ..., 0]
        assert np.all(out[16, 10:23] > 250)  # the centre cross stays inside
        assert np.all(out[10:23, 16] > 250)
        assert np.all(out[:3, :3] < 5) and np.all(out[-3:, -3:] < 5)  # corners stay empty


def test_hed_jitter_round_trip_and_stain_change():
    batch = _batch()
    identity = RandomHEDJitter(alpha=0.0, beta=0.0, seed=0)(batch, training=True)
    assert np.allclose(keras.ops.convert_to_numpy(identity), batch, atol=0.05)
    strong = keras.ops.convert_to_numpy(RandomHEDJitter(alpha=0.3, beta=0.3, seed=0)(batch))
    assert np.abs(strong - batch).mean() > 5


def test_colour_jitter_changes_each_image_differently():
    batch = np.repeat(_batch(1), 4, axis=0)
    out = keras.ops.convert_to_numpy(RandomHSVJitter(seed=0)(batch, training=True))
    assert len({round(float(o.mean()), 3) for o in out}) == 4


def test_augmenter_config_round_trip():
    augmenter = build_augmenter(AUGMENTATIONS, rotation_degrees=7.0, seed=11)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(augmenter))
    assert [type(layer) for layer in restored.layers] == [type(layer) for layer in augmenter.layers]
    assert restored.get_layer("flip_rotate").max_degrees == 7.0
    assert restored.get_layer("flip_rotate").probability == 0.75
    assert restored.get_layer("hed_jitter").get_config()["seed"] == 12


def test_augmenter_inside_a_model():
    """The same layers run inside a model (augmenting on the accelerator): identity at inference."""
    augmenter = build_augmenter(AUGMENTATIONS, seed=2)
    pixels = keras.Input((32, 32, 3))
    model = keras.Model(pixels, augmenter(pixels))
    batch = _batch(4)
    assert np.array_equal(keras.ops.convert_to_numpy(model(batch, training=False)), batch)
    out = keras.ops.convert_to_numpy(model(batch, training=True))
    assert out.shape == batch.shape and not np.allclose(out, batch)


def test_build_augmenter_names():
    assert build_augmenter([]) is None
    assert [layer.name for layer in build_augmenter(DEFAULT_AUGMENT).layers] == ["flip_rotate"]
    with pytest.raises(ValueError, match=r"\['blur'\].*flip_horizontal.*contrast"):
        build_augmenter(["rotate", "blur"])


@pytest.mark.parametrize("degrees, probability", [(0.0, 1.0), (10.0, 0.5), (180.0, 1.0)])
def test_host_warp_matches_the_keras_warp(degrees: float, probability: float):
    """OpenCV on the host and keras.ops gathers apply the same maps to within fixed-point rounding."""
    images = _smooth(16)
    layer = RandomFlipRotate(True, True, max_degrees=degrees, probability=probability, seed=4)
    maps = layer.transforms(len(images), 48, 48)
    device = keras.ops.convert_to_numpy(layer.warp(images.astype(np.float32), maps))
    host = warp_host(images, keras.ops.convert_to_numpy(maps)).astype(np.float32)
    if degrees == 0.0:  # flips only: integer positions, both exact
        assert np.array_equal(host, device)
    difference = np.abs(host - device)
    assert difference.mean() < 0.6 and difference.max() <= 4
    assert np.abs(host - images).mean() > 1  # and the warp did move pixels


def test_rotation_probability_leaves_the_others_only_flipped():
    maps = RandomFlipRotate(True, True, 10.0, probability=0.75, seed=2).transforms(4000, 32, 32)
    rotated = np.abs(keras.ops.convert_to_numpy(maps)[:, 1]) > 0  # a1 = -sx sin(angle)
    assert 0.72 < rotated.mean() < 0.78
    never = RandomFlipRotate(True, True, 10.0, probability=0.0, seed=2).transforms(64, 32, 32)
    assert np.all(keras.ops.convert_to_numpy(never)[:, [1, 3]] == 0)


def test_transforms_are_drawn_from_the_seed():
    first = RandomFlipRotate(seed=9).transforms(6, 32, 32)
    again = RandomFlipRotate(seed=9).transforms(6, 32, 32)
    other = RandomFlipRotate(seed=10).transforms(6, 32, 32)
    assert np.array_equal(first, again) and not np.allclose(first, other)


@pytest.mark.parametrize("degrees", [0.0, 180.0], ids=["flips", "rotate"])
def test_crop_host_and_keras_warps_agree(degrees: float):
    """A crop is the same warp with a smaller output: OpenCV and keras.ops agree, flips exactly."""
    images = _smooth(16)
    layer = RandomFlipRotate(True, True, max_degrees=degrees, crop_size=20, seed=6)
    maps = layer.transforms(len(images), 48, 48)
    device = keras.ops.convert_to_numpy(layer.warp(images.astype(np.float32), maps))
    host = warp_host(images, keras.ops.convert_to_numpy(maps), size=20).astype(np.float32)
    assert device.shape == host.shape == (16, 20, 20, 3)
    if degrees == 0.0:
        assert np.array_equal(host, device)
    difference = np.abs(host - device)
    assert difference.mean() < 0.6 and difference.max() <= 4


def test_unrotated_crops_are_exact_slices_from_every_position():
    """Without rotation a crop is a flipped slice of the input, at any whole-pixel position."""
    images = np.arange(4 * 9 * 9 * 3, dtype=np.uint8).reshape(4, 9, 9, 3)
    layer = RandomFlipRotate(True, True, max_degrees=0.0, crop_size=4, seed=1)
    corners = set()
    for _ in range(60):
        maps = keras.ops.convert_to_numpy(layer.transforms(4, 9, 9))
        out = warp_host(images, maps, size=4)
        for image, crop in zip(images, out):
            found = [(y, x) for y in range(6) for x in range(6) for view in
                     (image[y:y + 4, x:x + 4],) for flip in
                     (view, view[:, ::-1], view[::-1], view[::-1, ::-1])
                     if np.array_equal(flip, crop)]
            assert len(found) == 1
            corners.add(found[0])
    assert len(corners) == 36  # every top-left position 0..5 x 0..5 is drawn


def test_crop_layer_shapes_and_limits():
    augmenter = build_augmenter([], crop_size=24, seed=0)
    assert [layer.name for layer in augmenter.layers] == ["flip_rotate"]
    pixels = keras.Input((32, 32, 3))
    model = keras.Model(pixels, augmenter(pixels))
    assert model.output_shape == (None, 24, 24, 3)
    assert keras.ops.convert_to_numpy(model(_batch(2), training=True)).shape == (2, 24, 24, 3)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(augmenter))
    assert restored.get_layer("flip_rotate").crop_size == 24
    with pytest.raises(ValueError, match="crop_size 40 is larger than the 32x32 input"):
        RandomFlipRotate(crop_size=40).transforms(2, 32, 32)
