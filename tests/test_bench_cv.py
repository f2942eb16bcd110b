"""bench/cv.py: grouped K-fold CV of two recipes, one JSON per fold run, resumption, the paired
report, and the paired bootstrap on made-up per-source results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import backbones_from_module, probe_source, write_grouped_tiles

from bench import cv
from lungtf.constants import CLASS_NAMES

RECIPE = ("--preset cpu --backbones cv_probe --image-size 32 --crop-size 0 --batch-size 16 "
          "--scratch-epochs 1")


@pytest.fixture(scope="module")
def probe_backbone(tmp_path_factory):
    """A two-convolution backbone ``cv_probe``, registered for this module only: the test checks
    bench/cv.py, and a real backbone's train step takes ~70 CPU-seconds to trace per fold run."""
    folder = tmp_path_factory.mktemp("probes")
    with backbones_from_module(folder, "cv_probes", probe_source("cv_probe"), ("cv_probe",)):
        yield "cv_probe"


@pytest.fixture
def grouped_tiles(tmp_path) -> Path:
    """3 classes x 5 source tiles x 3 copies (40 px) and their groups.csv."""
    return write_grouped_tiles(tmp_path / "lung_image_sets", 15, 3)


def test_two_recipes_on_two_folds_pair_and_resume(probe_backbone, grouped_tiles, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--data", str(grouped_tiles), "--results", str(results), "--folds", "2",
            "--recipe", RECIPE, "--vs", RECIPE + " --ema 0.9", "--val-fraction", "0.3",
            "--verbose", "0"]
    assert cv.main([*argv, "--fold", "1"]) == 0  # one fold, both arms
    first, second = (cv.recipe_id(flags)[1] for flags in (RECIPE, RECIPE + " --ema 0.9"))
    assert sorted(p.name for p in (results / first).glob("*.json")) == ["fold1-seed0.json"]
    assert cv.main(argv) == 0  # fills in fold 0 only
    out = capsys.readouterr().out
    assert "trained 2 fold runs now" in out  # fold 0 of both arms; fold 1 was kept
    tested = {}
    for rid in (first, second):
        for fold in range(2):
            r = json.loads((results / rid / f"fold{fold}-seed0.json").read_text())
            assert r["recipe_hash"] == rid and r["fold"] == fold and r["seed"] == 0
            assert sum(map(sum, r["confusion"]["matrix"])) == r["n_tiles"]
            assert sum(s["n"] for s in r["per_source"].values()) == r["n_tiles"]
            assert sum(s["correct"] for s in r["per_source"].values()) == round(
                r["accuracy"] * r["n_tiles"])
            assert r["aca_scc_errors"] == r["aca_to_scc"] + r["scc_to_aca"]
            assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["val_sources"] == 3
            assert not list((results / rid / f"fold{fold}-seed0").rglob("backup"))
            tested.setdefault(rid, []).extend(r["per_source"])
        assert sorted(tested[rid]) == sorted(f"{n}-{g}" for n in CLASS_NAMES for g in range(5))
    assert r["config"]["train"]["ema_momentum"] == 0.9  # the second arm's recipe
    assert "(2 of 2 fold runs done)" in out and "pooled accuracy" in out
    assert "paired: second minus first, over the 2 fold runs both have" in out
    assert "accuracy difference" in out and "aca<->scc errors difference" in out
    assert "over 15 test source tiles" in out
    assert cv.main(argv) == 0  # everything is there: nothing trains
    assert "trained 0 fold runs now" in capsys.readouterr().out
    (results / second / "fold0-seed0.json").unlink()  # as if killed before writing its result
    assert cv.main(argv) == 0
    assert "trained 1 fold runs now" in capsys.readouterr().out
    assert json.loads((results / second / "fold0-seed0.json").read_text())["resumed"]


def test_recipe_must_not_set_what_cv_sets(grouped_tiles, tmp_path):
    with pytest.raises(ValueError, match="sets --seed"):
        cv.recipe_id("--preset cpu --seed 3")
    assert cv.recipe_id("--preset  cpu")[1] == cv.recipe_id("--preset cpu")[1]
    argv = ["--data", str(grouped_tiles), "--results", str(tmp_path), "--report-only"]
    assert cv.main([*argv, "--folds", "3"]) == 0
    with pytest.raises(SystemExit, match="holds results of other folds"):
        cv.main([*argv, "--folds", "2"])


def test_paired_bootstrap_on_made_up_sources():
    rng = np.random.default_rng(0)
    first = {f"s{i}": (int(c), 20) for i, c in enumerate(rng.integers(10, 20, 60))}
    d, low, high = cv.paired_bootstrap(first, dict(first))
    assert d == low == high == 0  # identical arms
    noisy = {s: (min(20, c + int(rng.integers(-2, 3))), n) for s, (c, n) in first.items()}
    d, low, high = cv.paired_bootstrap(first, noisy)
    assert low <= d <= high and low < 0 < high or d == 0  # no real difference
    better = {s: (min(20, c + 3), n) for s, (c, n) in first.items()}
    d, low, high = cv.paired_bootstrap(first, better)
    assert 0 < low <= d <= high  # a clearly better arm: the interval excludes 0
    errors = cv.paired_bootstrap(first, better, per_tile=False)
    assert errors[0] == sum(better[s][0] - first[s][0] for s in first)
    acc, low, high = cv.bootstrap(np.array([18, 20, 10]), np.array([20, 20, 20]))
    assert acc == pytest.approx(48 / 60) and low < acc < high


def test_fold_placeholder_gives_each_fold_its_own_weights(probe_backbone, grouped_tiles, tmp_path):
    """``{fold}`` in a recipe names one file per fold (e.g. weights pretrained on that fold's
    training sources only); the recipe's id keeps the placeholder, so the folds gather."""
    from lungtf.config import ModelConfig
    from lungtf.models import build_model

    backbone = build_model(ModelConfig(backbone="cv_probe", weights="none", image_size=32))
    backbone.get_layer("backbone").save_weights(tmp_path / "probe-fold1.weights.h5")
    recipe = (RECIPE.replace("--scratch-epochs 1", "--head-epochs 1 --epochs 1")
              + f" --weights cv_probe={tmp_path}/probe-fold{{fold}}.weights.h5")
    results = tmp_path / "results"
    argv = ["--data", str(grouped_tiles), "--results", str(results), "--folds", "2",
            "--recipe", recipe, "--val-fraction", "0.3", "--verbose", "0"]
    assert cv.main([*argv, "--fold", "1"]) == 0  # one fold keeps the test short
    r = json.loads((results / cv.recipe_id(recipe)[1] / "fold1-seed0.json").read_text())
    assert r["config"]["model"]["weights"] == f"cv_probe={tmp_path}/probe-fold1.weights.h5"
    assert r["recipe"] == recipe  # the report names the recipe as given


def test_recipe_id_follows_the_resolved_configuration(tmp_path, monkeypatch):
    """Two spellings of one recipe share an id; a changed preset file gives a new one (before,
    the id hashed the flags, so ``--preset cpu`` kept its results when the preset changed)."""
    import lungtf.config

    spelled = ("--preset cpu --image-size 224 --crop-size 112 --scratch-epochs 16 "
               "--precision mixed_bfloat16 --backbones regnet:400mf")
    assert cv.recipe_id("--preset cpu-224")[1] == cv.recipe_id(spelled)[1]
    assert cv.recipe_id("--preset cpu-224")[1] != cv.recipe_id("--preset cpu")[1]
    before = cv.recipe_id("--preset cpu")[1]
    presets = tmp_path / "configs"
    shutil.copytree(lungtf.config.PRESET_DIR, presets)
    text = (presets / "cpu.yaml").read_text()
    (presets / "cpu.yaml").write_text(text.replace("scratch_epochs: 34", "scratch_epochs: 35"))
    monkeypatch.setattr(lungtf.config, "PRESET_DIR", presets)
    assert cv.recipe_id("--preset cpu")[1] != before
