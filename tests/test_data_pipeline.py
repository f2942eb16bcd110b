"""Input pipeline: shapes, dtypes, label order, determinism, squish-resize, bad files at run time,
every augmentation, and show_batch. Real image files in tmp_path, 32-48 px."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from lungtf.config import AUGMENTATIONS, DEFAULT_AUGMENT
from lungtf.constants import CLASS_NAMES, class_index
from lungtf.data.ingest import Record, load_records
from lungtf.data.pipeline import (
    RandomFlipRotate,
    RandomHEDJitter,
    RandomHSVJitter,
    build_augmenter,
    make_dataset,
    show_batch,
)


def _collect(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def _batch(n: int = 8, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def test_shapes_dtypes_and_label_order(tiny_folder: Path):
    records = load_records(tiny_folder)
    ds = make_dataset(records, image_size=32, batch_size=10, training=False)
    batches = list(ds)
    assert [int(x.shape[0]) for x, _ in batches] == [10, 10, 4]
    x, y = batches[0]
    assert x.dtype == "float32" and y.dtype == "int32" and tuple(x.shape[1:]) == (32, 32, 3)
    images, labels = _collect(ds)
    assert labels.tolist() == [class_index(r.label) for r in records]
    assert 0 <= images.min() and images.max() <= 255 and images.max() > 1  # raw pixels, not 0-1
    expected = np.asarray(Image.open(records[0].path).convert("RGB").resize((32, 32)), np.float32)
    assert np.abs(images[0] - expected).mean() < 12  # same picture, resized


def test_training_is_shuffled_and_deterministic_given_seed(tiny_folder: Path):
    records = load_records(tiny_folder)

    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        aug = build_augmenter(DEFAULT_AUGMENT, seed=seed)
        return _collect(
            make_dataset(records, 32, 8, training=True, augmenter=aug, seed=seed, jit_compile=False)
        )

    (x1, y1), (x2, y2), (_, y3) = run(1), run(1), run(2)
    assert np.array_equal(y1, y2) and np.array_equal(x1, x2)
    assert sorted(y1.tolist()) == sorted(class_index(r.label) for r in records)
    assert y1.tolist() != [class_index(r.label) for r in records]  # shuffled
    assert y1.tolist() != y3.tolist()


def test_cache_gives_the_same_images(tiny_folder: Path):
    records = load_records(tiny_folder)
    plain = _collect(make_dataset(records, 32, 8, training=False))
    cached = make_dataset(records, 32, 8, training=False, cache=True)
    for _ in range(2):  # the second epoch reads from the cache
        assert all(np.array_equal(a, b) for a, b in zip(_collect(cached), plain))


def test_squish_resize_keeps_the_whole_non_square_image(tmp_path: Path):
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :40, 0] = 255  # left half red
    wide[:, 40:, 2] = 255  # right half blue
    Image.fromarray(wide).save(tmp_path / "wide.png")
    for size in (32, 96):  # shrink (area average) and enlarge (bilinear)
        (x, _), = make_dataset([Record(str(tmp_path / "wide.png"), "lung_n")], size, 1, False)
        image, half = x.numpy()[0], size // 2
        assert image.shape == (size, size, 3)
        assert np.all(image[:, : half - 2, 0] == 255) and np.all(image[:, : half - 2, 2] == 0)
        assert np.all(image[:, half + 2 :, 2] == 255) and np.all(image[:, half + 2 :, 0] == 0)


def test_gray_and_alpha_become_rgb(tmp_path: Path):
    Image.fromarray(np.full((36, 36), 90, np.uint8)).save(tmp_path / "gray.jpeg", quality=100)
    rgba = np.zeros((36, 36, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 10
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    records = [Record(str(tmp_path / "gray.jpeg"), "lung_n"), Record(str(tmp_path / "alpha.png"), "lung_aca")]
    images, labels = _collect(make_dataset(records, 32, 2, training=False))
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [1, 0]
    assert np.allclose(images[0], 90, atol=2)
    assert np.all(images[1] == [0, 200, 0])  # alpha dropped, colour kept


def test_corrupt_file_does_not_stop_the_epoch(tiny_folder: Path):
    records = load_records(tiny_folder)
    data = Path(records[3].path).read_bytes()
    Path(records[3].path).write_bytes(data[: len(data) // 3])  # truncated after the check
    (tiny_folder / "lung_n" / "text.jpeg").write_text("not a jpeg")
    records.append(Record(str(tiny_folder / "lung_n" / "text.jpeg"), "lung_n"))
    records.append(Record(str(tiny_folder / "lung_n" / "deleted.jpeg"), "lung_n"))
    for training in (False, True):
        images, labels = _collect(make_dataset(records, 32, 5, training=training))
        assert len(images) == len(labels) == 24 - 1


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_every_augmentation_keeps_shape_dtype_and_range(name: str):
    augmenter = build_augmenter([name], seed=3)
    batch = _batch()
    out = keras.ops.convert_to_numpy(augmenter(batch, training=True))
    assert out.shape == batch.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, batch)  # it changed something
    assert np.array_equal(keras.ops.convert_to_numpy(augmenter(batch, training=False)), batch)


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


def test_make_dataset_rejects_bad_input(tiny_folder: Path):
    with pytest.raises(ValueError, match="empty"):
        make_dataset([], 32, 8, False)
    with pytest.raises(ValueError, match="unknown class 'colon_n'"):
        make_dataset([Record(str(tiny_folder / "x.jpeg"), "colon_n")], 32, 8, False)


def test_show_batch_writes_a_png(tiny_folder: Path, tmp_path: Path, artifacts_dir: Path):
    records = load_records(tiny_folder)
    x, y = next(iter(make_dataset(records, 32, 12, training=True, jit_compile=False,
                                  augmenter=build_augmenter(DEFAULT_AUGMENT))))
    out = tmp_path / "batch.png"
    show_batch(x, y, out, ncols=6)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100
    names = tf.constant([CLASS_NAMES[i] for i in y[:3].numpy()])  # a string tensor gives bytes
    show_batch(x[:3], names, artifacts_dir / "show_batch.png")
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        show_batch(x[:3], y[:2], out)


def test_real_tiles(shared_data: Path):
    records = load_records(shared_data)[::800]
    images, labels = _collect(make_dataset(records, 64, 4, training=True,
                                           augmenter=build_augmenter(DEFAULT_AUGMENT)))
    assert images.shape == (len(records), 64, 64, 3)
    assert sorted(labels.tolist()) == sorted(class_index(r.label) for r in records)
    assert 100 < images.mean() < 230  # H&E tiles: pale pink-purple
