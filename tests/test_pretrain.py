"""lungtf.pretrain: the SimSiam loss and its stop-gradient, the two views, a tiny end-to-end
pretraining whose weights file loads through the registry as ``--weights PATH`` does, and
``python -m lungtf.train --pretrain-epochs N`` (``lungtf.train.pretraining``): pretraining on the
run's own training split inside the backbone's training."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import backbones_from_module, probe_source, write_grouped_tiles

import lungtf.pretrain.views
import lungtf.train.fit
from bench import cv
from lungtf.config import ModelConfig, RunConfig, TrainConfig, from_dict, load_yaml
from lungtf.data.ingest import load_records
from lungtf.data.split import make_split, read_manifest, write_manifest
from lungtf.models import build_model
from lungtf.pretrain import main
from lungtf.pretrain.cli import pretrain, select_records
from lungtf.pretrain.simsiam import embedding_std, negative_cosine, simsiam_loss
from lungtf.pretrain.views import RandomResizedCrop, make_views
from lungtf.train import main as train_main
from lungtf.train.cli import _overrides, build_parser
from lungtf.train.compare import write_comparison
from lungtf.train.isolate import train_in_children


def test_loss_on_known_vectors():
    def d(p, z):
        return float(negative_cosine(tf.constant([p], tf.float32), tf.constant([z], tf.float32)))

    assert d([2.0, 0.0], [5.0, 0.0]) == pytest.approx(-1.0)  # same direction, any length
    assert d([1.0, 1.0], [-3.0, -3.0]) == pytest.approx(1.0)
    assert d([1.0, 0.0], [0.0, 4.0]) == pytest.approx(0.0, abs=1e-7)
    p1, p2 = tf.constant([[1.0, 0.0]]), tf.constant([[0.0, 1.0]])
    z1, z2 = tf.constant([[0.0, -1.0]]), tf.constant([[1.0, 1.0]])
    # D(p1, z2) / 2 + D(p2, z1) / 2 = (-cos 45 deg + 1) / 2: a swapped pairing would give 0.
    expected = (-1 / math.sqrt(2) + 1.0) / 2
    assert float(simsiam_loss(p1, p2, z1, z2)) == pytest.approx(expected, abs=1e-6)


def test_no_gradient_flows_into_the_target():
    p, z = tf.constant([[1.0, 0.0]]), tf.constant([[0.0, 1.0]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([p, z])
        loss = simsiam_loss(p, p, z, z)
    grad_z = tape.gradient(loss, z)
    assert grad_z is None or not np.any(grad_z.numpy())  # stop-gradient: z is a constant
    # d(-cos(p, z))/dp at p = e1, z = e2 is -e2 (the part of z orthogonal to p).
    np.testing.assert_allclose(tape.gradient(loss, p).numpy(), [[0.0, -1.0]], atol=1e-6)


def test_embedding_std_detects_collapse():
    collapsed = np.tile([[0.3, -1.0, 2.0, 0.5]], (16, 1)).astype(np.float32)
    assert float(embedding_std(collapsed)) == pytest.approx(0.0, abs=1e-6)
    spread = np.random.default_rng(0).normal(size=(512, 64)).astype(np.float32)
    assert float(embedding_std(spread)) == pytest.approx(1 / math.sqrt(64), rel=0.05)


def test_resized_crop_maps_zoom_and_keep_the_region_inside():
    layer = RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1.0, 1.0), seed=1)
    maps = np.asarray(layer.transforms(64, 128, 128))
    scale = np.sqrt(np.abs(maps[:, 0] * maps[:, 4] - maps[:, 1] * maps[:, 3]))
    np.testing.assert_allclose(scale, 2.0, rtol=1e-5)  # a quarter of 128^2 = 64 px side -> 32 px
    centre = maps[:, [2, 5]] + (maps[:, [0, 3]] + maps[:, [1, 4]]) * 15.5  # where the centre samples
    assert np.all((centre >= 31.5 - 1e-3) & (centre <= 95.5 + 1e-3))
    assert len(np.unique(np.round(np.arctan2(maps[:, 3], maps[:, 0]), 3))) > 32  # any angle


def test_views_are_two_different_reproducible_batches(tiny_folder):
    records = load_records(tiny_folder)
    first = [next(iter(make_views(records, 40, 32, 8, seed=3, jit_compile=False)))
             for _ in range(2)]
    (a, b), (a2, b2) = first
    assert a.dtype == tf.uint8 and a.shape == b.shape == (8, 32, 32, 3)
    assert np.mean(np.abs(a.numpy().astype(int) - b.numpy())) > 5  # independent views
    np.testing.assert_array_equal(a.numpy(), a2.numpy())  # seeded: the same stream again
    np.testing.assert_array_equal(b.numpy(), b2.numpy())
    with pytest.raises(ValueError, match="at least batch_size"):
        make_views(records[:4], 40, 32, 8)


def grouped_manifest(folder: Path, path: Path) -> list:
    """A grouped split manifest of ``folder``'s tiles, pairs of tiles forming a source group."""
    records = [replace(r, group=f"{r.label}-{i // 2}") for i, r in enumerate(load_records(folder))]
    split = make_split(records, seed=0)
    write_manifest(split, path, "grouped")
    return split


def test_cli_refuses_missing_data_and_empty_split(tmp_path, tiny_folder):
    assert main(["--out", str(tmp_path / "out")]) == 2
    grouped_manifest(tiny_folder, tmp_path / "splits.csv")
    assert main(["--splits", str(tmp_path / "splits.csv"), "--split", "nope",
                 "--out", str(tmp_path / "out")]) == 2


def test_pretrain_end_to_end_weights_load_as_weights_path(pretrain_probe, tmp_path, tiny_folder,
                                                          caplog):
    """Train-split tiles only; loss finite and moving; the file loads as --weights PATH does."""
    manifest = tmp_path / "splits.csv"
    split = grouped_manifest(tiny_folder, manifest)
    records, note = select_records(None, str(manifest), "train")
    train = {r.path for r in split if r.split == "train"}
    assert {r.path for r in records} == train and len(train) < len(split)
    out = tmp_path / "pretrained"
    settings = {"image_size": 40, "crop_size": 32, "epochs": 2, "batch_size": 8, "lr": 0.05,
                "weight_decay": 1e-4, "dim": 64, "hidden": 16, "seed": 42}
    model = pretrain(pretrain_probe, records, out, settings, note, verbose=0)

    logged = json.loads((out / "pre_probe-v1.json").read_text())
    assert logged["data"]["split"] == "train" and logged["data"]["tiles"] == len(train)
    assert "were not read" in logged["data"]["note"]
    losses = [h["loss"] for h in logged["history"]]
    assert len(losses) == 2 and all(-1.0 <= v <= 1.0 for v in losses)
    assert losses[0] != losses[1]
    assert all(h["z_std"] > 0 for h in logged["history"])

    path = out / "pre_probe-v1.weights.h5"
    loaded = build_model(ModelConfig(backbone=pretrain_probe, weights=str(path),
                                     image_size=40)).get_layer("backbone")
    assert len(loaded.weights) == len(model.backbone.weights)
    for saved, read in zip(model.backbone.weights, loaded.weights):
        assert saved.path == read.path
        np.testing.assert_array_equal(saved.numpy(), read.numpy())
    moving = [w.numpy() for w in loaded.weights if w.path.endswith("moving_mean")]
    assert any(np.any(m) for m in moving)  # trained statistics, not a fresh initialisation
    assert not list(out.rglob(".tmp-*"))

    flags = ["--backbones", pretrain_probe, "--splits", str(manifest), "--image-size", "40",
             "--crop-size", "32", "--epochs", "2", "--batch-size", "8", "--lr", "0.05",
             "--dim", "64", "--hidden", "16", "--out", str(out), "--verbose", "0"]
    stamp = path.stat().st_mtime_ns
    assert main(flags) == 0  # finished with the same settings: skipped
    assert "already pretrained" in caplog.text and path.stat().st_mtime_ns == stamp
    assert main([*flags[:-4], "--seed", "1", *flags[-4:]]) == 2  # other settings refused
    assert "other settings" in caplog.text

    # Killed after the last backup, before the weights were written: the same command restores
    # the backup (BackupAndRestore), trains no further and writes the same weights.
    path.unlink()
    (out / "pre_probe-v1.json").unlink()
    assert main(flags) == 0
    again = build_model(ModelConfig(backbone=pretrain_probe, weights=str(path),
                                    image_size=40)).get_layer("backbone")
    for saved, read in zip(model.backbone.weights, again.weights):
        np.testing.assert_array_equal(saved.numpy(), read.numpy())
    # Not trained again (seeded, a retraining could give the same weights): the same epochs,
    # timings included.
    assert json.loads((out / "pre_probe-v1.json").read_text())["history"] == logged["history"]


@pytest.fixture(scope="module")
def pretrain_probe(tmp_path_factory):
    """Backbone ``pre_probe`` from a module file, so a child process can import it too (a real
    backbone's train step takes far longer to trace); removed from the registry after."""
    folder = tmp_path_factory.mktemp("probes")
    source = probe_source("pre_probe")
    with backbones_from_module(folder, "pretrain_probes", source, ("pre_probe",)):
        yield "pre_probe"


def _backbone_weights(model) -> list:
    return [w.numpy() for w in model.get_layer("backbone").weights]


def test_train_pretrains_on_its_training_split_then_fine_tunes(pretrain_probe, tmp_path,
                                                               monkeypatch):
    """``--pretrain-epochs 1``: SimSiam reads the training split only and writes its weights
    into the backbone's folder; the head phase starts from exactly those weights and keeps them
    (frozen); stopped in the fine-tune phase, the backbone resumes in a child process of its own
    (``lungtf.train.isolate``, as ``backbone_process`` trains it), skips the finished
    pretraining and finishes; train.log, result.json and comparison.md say it was pretrained."""
    tiles = write_grouped_tiles(tmp_path / "lung_image_sets", 12, 2)
    viewed, seen = [], {}
    real_views, real_callbacks = lungtf.pretrain.views.make_views, lungtf.train.fit.make_callbacks

    def views_spy(records, *args, **kwargs):
        viewed.extend(r.path for r in records)
        return real_views(records, *args, **kwargs)

    class Recorder(keras.callbacks.Callback):
        def __init__(self, phase, model):
            super().__init__()
            self.phase, self.classifier = phase, model

        def on_train_begin(self, logs=None):
            if self.phase == "finetune":
                raise RuntimeError("stopped in the fine-tune phase on purpose")
            seen["begin"] = _backbone_weights(self.classifier)

        def on_train_end(self, logs=None):
            seen["end"] = _backbone_weights(self.classifier)

    def callbacks_spy(out_dir, phase, model, *args, **kwargs):
        return real_callbacks(out_dir, phase, model, *args, **kwargs) + [Recorder(phase, model)]

    monkeypatch.setattr(lungtf.pretrain.views, "make_views", views_spy)
    monkeypatch.setattr(lungtf.train.fit, "make_callbacks", callbacks_spy)
    for handler in [h for h in logging.getLogger("lungtf.train").handlers
                    if getattr(h, "_lungtf", False)]:  # made on an earlier test's stderr
        logging.getLogger("lungtf.train").removeHandler(handler)
    argv = ["--preset", "cpu", "--data", str(tiles), "--backbones", "pre_probe",
            "--image-size", "32", "--crop-size", "24", "--batch-size", "8", "--weights", "none",
            "--pretrain-epochs", "1", "--head-epochs", "1", "--epochs", "1",
            "--output", str(tmp_path / "runs"), "--name", "pre", "--verbose", "0"]
    with pytest.raises(RuntimeError, match="on purpose"):
        train_main(argv)

    (run,) = (tmp_path / "runs").glob("*-pre")
    rows, _ = read_manifest(run / "splits.csv")
    train = sorted(r.path for r in rows if r.split == "train")
    assert sorted(viewed) == train and len(train) < len(rows)  # val and test tiles never read
    folder = run / "pre_probe" / "pretrain"
    path, logged = folder / "pre_probe-v1.weights.h5", folder / "pre_probe-v1.json"
    record = json.loads(logged.read_text())
    assert record["data"]["split"] == "train" and record["data"]["tiles"] == len(train)
    assert "were not read" in record["data"]["note"] and len(record["history"]) == 1
    assert (record["crop_size"], record["image_size"], record["batch_size"]) == (24, 32, len(train))
    pretrained = build_model(ModelConfig(backbone="pre_probe", weights=str(path), image_size=32))
    for start, end, saved in zip(seen["begin"], seen["end"], _backbone_weights(pretrained)):
        np.testing.assert_array_equal(start, saved)  # the head phase starts from the file
        np.testing.assert_array_equal(end, saved)  # and keeps the backbone frozen
    assert any(np.any(w) for w in _backbone_weights(pretrained))
    stamp = path.stat().st_mtime_ns

    (result,) = train_in_children(from_dict(RunConfig, load_yaml(run / "config.yaml")), run, 0)
    write_comparison([result], run, "grouped", result)  # what the run's packaging writes
    assert path.stat().st_mtime_ns == stamp
    log = (run / "train.log").read_text()
    assert "pre_probe: pretrained with SimSiam, 1 epochs on the" in log
    assert "pre_probe: already pretrained (skipped) with SimSiam" in log
    assert "pre_probe: training in process" in log  # the resume trained in a child process
    assert result["pretrained"]["weights"] == "pre_probe/pretrain/pre_probe-v1.weights.h5"
    assert result["pretrained"]["tiles"] == len(train) and result["epochs"] == 2  # head + finetune
    comparison = (run / "comparison.md").read_text()
    assert "Pretrained with SimSiam on the run's training split only" in comparison
    assert f"- pre_probe: 1 epochs on {len(train)} tiles, final loss" in comparison


def test_pretrain_epochs_is_validated_and_has_its_own_recipe_id():
    cfg = RunConfig(backbones=("regnet:200mf", "resnet34"), model=ModelConfig(weights="none"),
                    train=TrainConfig(pretrain_epochs=2))
    cfg.validate()
    with pytest.raises(ValueError, match=r"every backbone needs weights none; got resnet34: "
                                         r"imagenet \(give --weights none"):
        replace(cfg, model=replace(cfg.model, weights="regnet:200mf=none,imagenet")).validate()
    with pytest.raises(ValueError, match="not supported with distribution multiworker"):
        replace(cfg, train=replace(cfg.train, distribution="multiworker")).validate()
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="pretrain_epochs must be an integer >= 0"):
            TrainConfig(pretrain_epochs=bad).validate()
    args = build_parser().parse_args(["--pretrain-epochs", "3"])
    assert _overrides(args)["train"]["pretrain_epochs"] == 3
    plain = cv.recipe_id("--preset cpu")[1]
    assert cv.recipe_id("--preset cpu --pretrain-epochs 0")[1] == plain
    assert cv.recipe_id("--preset cpu --pretrain-epochs 1")[1] != plain
    assert cv.recipe_id("--preset cpu --pretrain-epochs 2")[1] != cv.recipe_id(
        "--preset cpu --pretrain-epochs 1")[1]
