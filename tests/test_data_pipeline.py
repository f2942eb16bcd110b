"""Input pipeline: shapes, dtypes, label order, determinism, squish-resize, bad files at run time,
augmentation in the pipeline, and show_batch. Real image files in tmp_path, 32-48 px."""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import png_bomb
from PIL import Image

from lungtf.config import AUGMENTATIONS, DEFAULT_AUGMENT
from lungtf.constants import CLASS_NAMES, MAX_IMAGE_PIXELS, class_index
from lungtf.data.augment import build_augmenter, warp_host
from lungtf.data.hostile import png_header
from lungtf.data.ingest import Record, check_image, load_records, within_pixel_cap
from lungtf.data.pipeline import (
    checked_size,
    decode_resize,
    header_size,
    length_found_at_end,
    make_dataset,
    show_batch,
)
from lungtf.demo_files import thumbnail_uri
from lungtf.models.portable import dtype_policy


def _collect(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_shapes_dtypes_and_label_order(tiny_folder: Path):
    records = load_records(tiny_folder)
    ds = make_dataset(records, image_size=32, batch_size=10, training=False)
    batches = list(ds)
    assert [int(x.shape[0]) for x, _ in batches] == [10, 10, 4]
    x, y = batches[0]
    assert x.dtype == "uint8" and y.dtype == "int32" and tuple(x.shape[1:]) == (32, 32, 3)
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


@pytest.mark.parametrize("names, crop", [
    (DEFAULT_AUGMENT, 0), (("flip_horizontal", "rotate", "hsv_jitter"), 0), (DEFAULT_AUGMENT, 20),
], ids=["default", "colour", "crop"])
def test_pipeline_applies_the_augmenters_draws_in_order(tiny_folder: Path, names, crop: int):
    """The parallel host warp gives exactly the layer's maps, batch after batch, in order."""
    records = load_records(tiny_folder)
    plain = list(make_dataset(records, 32, 8, training=True, seed=3))
    augmented = list(make_dataset(records, 32, 8, training=True, seed=3, jit_compile=False,
                                  augmenter=build_augmenter(names, seed=7, crop_size=crop)))
    reference = build_augmenter(names, seed=7, crop_size=crop)
    geometry, colour = reference.layers[0], reference.layers[1:]
    for (x, y), (x_aug, y_aug) in zip(plain, augmented, strict=True):
        assert np.array_equal(y, y_aug)
        assert x_aug.shape[1:] == ((crop, crop, 3) if crop else (32, 32, 3))
        maps = geometry.transforms(len(x), 32, 32).numpy()
        expected = warp_host(x.numpy(), maps, crop or None).astype(np.float32)
        for layer in colour:
            expected = layer(expected, training=True).numpy()
        assert x_aug.dtype == "uint8"
        tolerance = 1 if colour else 0  # colour layers: float noise may round the other way
        assert np.abs(x_aug.numpy() - np.round(expected)).max() <= tolerance


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


def test_reading_an_evaluation_pipeline_to_its_end_is_not_a_warning(tiny_folder: Path):
    ds = make_dataset(load_records(tiny_folder), 16, 4, training=False)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D()])

    def warned(silenced: bool) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with length_found_at_end() if silenced else contextlib.nullcontext():
                model.predict(ds, verbose=0)  # a new predict iterator finds the length at the end
        return any("ran out of data" in str(w.message) for w in caught)

    assert warned(silenced=False)  # Keras's warning for a pipeline of unknown length
    assert not warned(silenced=True)


def test_header_size_and_bombs_are_refused_before_decoding(tiny_folder: Path, tmp_path: Path):
    """A 389 KB PNG declaring 20000 x 20000 pixels is skipped from its header (decoding it would
    take 1.2 GB and seconds); JPEG/PNG sizes are read without decoding; other formats refused."""
    jpeg = Path(load_records(tiny_folder)[0].path).read_bytes()
    png = tmp_path / "wide.png"
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(png)
    assert header_size(tf.constant(jpeg)).numpy().tolist() == [40, 40]
    assert header_size(tf.constant(png.read_bytes())).numpy().tolist() == [30, 50]
    gif = tmp_path / "x.gif"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(gif)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG or PNG"):
        decode_resize(tf.constant(gif.read_bytes()), 16)
    bomb = tmp_path / "lung_n" / "bomb.png"
    bomb.parent.mkdir()
    bomb.write_bytes(png_bomb())
    with pytest.raises(tf.errors.InvalidArgumentError, match="20000 x 20000 pixels"):
        decode_resize(tf.constant(bomb.read_bytes()), 16)
    records = [Record(str(bomb), "lung_n"), *load_records(tiny_folder)[:3]]
    start = time.monotonic()
    images, _ = _collect(make_dataset(records, 16, 4, training=False))
    assert len(images) == 3 and time.monotonic() - start < 3  # the bomb skipped, undecoded


def test_host_augmentation_runs_under_mixed_precision(tiny_folder: Path):
    """With augmentation in tf.data (``--device-augment false``) the pipeline calls the layers
    while the run's mixed_float16 policy is in force: same batches as under float32."""
    records = load_records(tiny_folder)

    def batches(policy: str) -> np.ndarray:
        with dtype_policy(policy):
            aug = build_augmenter(AUGMENTATIONS, seed=5, crop_size=24)
            return _collect(make_dataset(records, 32, 8, training=True, augmenter=aug, seed=5))[0]

    mixed, reference = batches("mixed_float16"), batches("float32")
    assert mixed.dtype == np.uint8 and mixed.shape == (len(records), 24, 24, 3)
    assert np.abs(mixed.astype(int) - reference).max() <= 1  # XLA may round a level differently


@pytest.mark.parametrize(
    ("width", "height", "allowed"),
    [(4096, 4096, True), (MAX_IMAGE_PIXELS, 1, True), (4097, 4096, False), (0, 16, False),
     (2**32 - 1, 2**32 - 1, False), (2**32 - 1, 2**31 + 1, False), (2**32 - 1, 1, False)],
)
def test_one_pixel_cap_rule_for_pipeline_ingest_and_demo(tmp_path: Path, width, height, allowed):
    """Python ints and int64 tensors give the same answer, also where the int64 product wraps
    (2**32 - 1 squared is negative); ingest and the demo refuse what the pipeline refuses."""
    assert within_pixel_cap(width, height) == allowed
    sides = tf.constant([width, height], tf.int64)
    assert bool(within_pixel_cap(sides[0], sides[1])) == allowed
    header = png_header(width, height)
    if allowed:
        assert checked_size(tf.constant(header)).numpy().tolist() == [height, width]
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"is {width} x {height} pixels"):
            checked_size(tf.constant(header))
        path = tmp_path / "header.png"
        path.write_bytes(header)
        assert check_image(str(path), min_side=0) is not None and thumbnail_uri(path) is None
