"""lungtf.train end to end on tiny real images: CLI smoke, resume across phases, rules, errors."""

import csv
import gc
import json
import logging
import os
import re
import runpy
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import backbones_from_module, probe_source, write_grouped_tiles, write_tile

from lungtf.config import ModelConfig, dump_yaml, load_yaml, resolve_run_config
from lungtf.constants import CLASS_NAMES
from lungtf.models import build_model, get_spec, list_backbones
from lungtf.models.portable import dtype_policy
from lungtf.train import main
from lungtf.train.callbacks import read_history
from lungtf.train.cli import _run_dir, build_parser
from lungtf.train.compare import pick_best, uncertainty_threshold, write_comparison
from lungtf.train.fit import compile_model, release_backbone, resolve_weights, train_backbone
from lungtf.train.prepare import prepare_splits
from lungtf.train.rundir import RunLock, claim_new
from lungtf.train.runtime import choose_preset, runtime

SIZE = 32


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes x 20 tiles (40 px) in groups of two, a groups.csv beside them, one broken file."""
    root = write_grouped_tiles(tmp_path_factory.mktemp("data") / "lung_image_sets", 20, 2)
    (root / "lung_n" / "broken.jpeg").write_bytes(b"not a jpeg at all")
    return root


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """Two two-convolution backbones registered for this module: ``probe_a`` and ``probe_b``
    (variants ``v1``, ``v2``). Run orchestration (phases, resume, comparison, packaging, release)
    does not depend on the backbone, and a real one's train step takes ~30-70 CPU-seconds to
    trace; every real backbone is trained through the command line elsewhere (``tiny_run``,
    the study below, tests/test_multiworker.py)."""
    folder, names = tmp_path_factory.mktemp("probes"), ("probe_a", "probe_b")
    source = probe_source(*names, variants=("v1", "v2"))
    with backbones_from_module(folder, "train_probes", source, names):
        yield names


def _live(kind: type) -> int:
    """Objects of ``kind`` that are alive now (found by the garbage collector; no collection)."""
    return sum(isinstance(o, kind) for o in gc.get_objects())


def test_cli_two_backbones_compare_and_package_best(tiny_data, probes, tmp_path, monkeypatch):
    """Two backbones end to end; each is released before the next is built: when a backbone
    starts and when the best is packaged, no Keras model or tf.function of a finished backbone is
    alive (uncollected cycles included), and the release keeps the run's dtype policy."""
    import lungtf.train.compare
    import lungtf.train.fit

    live = []  # (keras Models, tf.functions) alive when each backbone starts, then at packaging

    def counting(real):
        def call(*args, **kwargs):
            live.append((_live(keras.Model), _live(tf.types.experimental.PolymorphicFunction)))
            return real(*args, **kwargs)

        return call

    for module, name in ((lungtf.train.fit, "train_backbone"),
                         (lungtf.train.compare, "finalize_best")):
        monkeypatch.setattr(module, name, counting(getattr(module, name)))
    argv = [
        "--data", str(tiny_data), "--backbones", "probe_a,probe_b:v2",
        "--image-size", str(SIZE), "--crop-size", "24", "--batch-size", "8", "--scratch-epochs", "1",
        "--weights", "none", "--output", str(tmp_path), "--name", "smoke", "--verbose", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    # The first count may include what earlier tests of the session left alive (the release
    # frees that too); the second backbone and packaging must find no more than it, and the same.
    # With release_backbone a no-op: [(0, 10), (6, 15), (6, 15)] alone (checked with the probes).
    assert live[1] == live[2] and all(n <= first for n, first in zip(live[1], live[0])), live
    with dtype_policy("mixed_bfloat16"):
        release_backbone("mixed_bfloat16")
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    (run,) = tmp_path.glob("*-smoke")
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml", "splits.csv", "bad_files.csv", "comparison.csv", "comparison.md", "best",
        "probe_a", "probe_b-v2", "train.log",
    }  # fmt: skip
    assert "broken.jpeg" in (run / "bad_files.csv").read_text()
    assert not list(run.rglob(".tmp-*"))  # every atomic write was renamed into place
    with open(run / "splits.csv", newline="") as fh:
        split_rows = list(csv.DictReader(fh))
    assert len(split_rows) == 60 and {r["protocol"] for r in split_rows} == {"grouped"}
    with open(run / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["backbone"], r["variant"]) for r in rows] == [("probe_a", "v1"), ("probe_b", "v2")]
    for r in rows:
        assert 0 <= float(r["val_accuracy"]) <= 1 and int(r["params"]) > 0
        assert float(r["wall_time_s"]) > 0 and int(r["missed_cancers"]) >= 0
    md = (run / "comparison.md").read_text()
    assert "grouped" in md and "missed cancers" in md and "highest validation accuracy" in md
    for backbone in ("probe_a", "probe_b-v2"):
        assert (run / backbone / "curves.png").stat().st_size > 1000
        assert [r["epoch"] for r in read_history(run / backbone / "history.csv")] == ["0"]
        assert any((run / backbone / "tensorboard").rglob("events.out.tfevents.*"))
    meta = json.loads((run / "best" / "lungtf.json").read_text())
    assert meta["backbone"] == pick_best([_typed(r) for r in rows])["backbone"]
    assert meta["class_names"] == list(CLASS_NAMES) and meta["image_size"] == SIZE
    assert meta["split_protocol"] == "grouped" and meta["temperature"] == 1.0
    assert meta["test_metrics"]["n"] == sum(r["split"] == "test" for r in split_rows)
    assert 0 < meta["uncertainty_threshold"] <= 1
    model = keras.models.load_model(run / "best" / "model.keras")
    assert model.input_shape == (None, SIZE, SIZE, 3)  # trained on 24 px crops, takes whole tiles
    assert any((run / "best" / "saved_model").glob("*/saved_model.pb"))


def _fit_tiny(run, rt) -> None:
    """A tiny model compiled as ``train_backbone`` compiles it, fitted for 2 steps."""
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(CLASS_NAMES), activation="softmax"),
    ])  # fmt: skip
    compile_model(model, 1e-3, run, rt)
    x = np.random.default_rng(0).random((16, 8, 8, 3), np.float32)
    model.fit(x, np.eye(len(CLASS_NAMES), dtype=np.float32)[np.arange(16) % 3], verbose=0)


def test_release_frees_every_graph_a_backbone_traced():
    """After ``release_backbone`` nothing a fitted model traced is alive: no ``FuncGraph`` (train
    step, metric and variable-initialisation branches), and the eager context holds as many
    functions after each of three fits as after the first, so backbones do not accumulate them.
    With the release before issue 26's second fix (``clear_session`` only) each train step's
    graph stayed alive, held by TensorFlow's gradient registry (``CustomGradient-<uid>`` of the
    gradient all-reduce); ``bench/backbone_memory.py`` measures the host RSS this costs."""
    from tensorflow.python.eager import context
    from tensorflow.python.framework.func_graph import FuncGraph

    run = resolve_run_config("cpu", None, {})
    counts = []
    with runtime(run.train) as rt:
        release_backbone(rt.precision)  # what earlier tests of the session left behind
        for _ in range(3):
            before = {id(g) for g in gc.get_objects() if isinstance(g, FuncGraph)}
            _fit_tiny(run, rt)
            traced = [weakref.ref(g) for g in gc.get_objects()
                      if isinstance(g, FuncGraph) and id(g) not in before]  # fmt: skip
            assert traced
            release_backbone(rt.precision)
            alive = [g().name for g in traced if g() is not None]
            assert not alive, f"{len(alive)} of {len(traced)} graphs alive: {sorted(alive)[:5]}"
            counts.append(len(context.context().list_function_names()))
    assert counts[0] == counts[1] == counts[2], counts


def _typed(row: dict) -> dict:
    return {**row, "val_accuracy": float(row["val_accuracy"]),
            "missed_cancers": int(row["missed_cancers"]), "params": int(row["params"])}


class _Interrupt(keras.callbacks.Callback):
    """Stands in for a killed process: raises once training has finished epoch ``after``."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after:
            raise KeyboardInterrupt(f"interrupted after epoch {epoch}")


def test_interrupted_run_resumes_across_phases(tiny_data, probes, tmp_path):
    # A backbone weights file (made here) makes probe_a a transfer backbone: two phases.
    weights = tmp_path / "backbone.weights.h5"
    cfg = ModelConfig(backbone="probe_a", weights="none", image_size=SIZE)
    build_model(cfg).get_layer("backbone").save_weights(weights)
    run = resolve_run_config("cpu", None, {
        "data": {"data": str(tiny_data), "image_size": SIZE, "crop_size": 0, "batch_size": 8},
        "model": {"weights": str(weights)},
        "train": {"head_epochs": 1, "epochs": 2, "early_stopping_patience": 0},
        "backbones": ["probe_a"],
    })  # fmt: skip
    run.validate()
    out = tmp_path / "run" / "probe_a"
    with runtime(run.train) as rt:
        splits, _ = prepare_splits(run.data, tmp_path / "run")
        with pytest.raises(KeyboardInterrupt):  # dies after global epoch 1 (first fine-tune one)
            train_backbone("probe_a", run, rt, splits, out, 0, [_Interrupt(after=1)])
        state = json.loads((out / "state.json").read_text())
        assert state["phases"] == {"head": 1}
        result = train_backbone("probe_a", run, rt, splits, out, verbose=0)
    assert [r["epoch"] for r in read_history(out / "history.csv")] == ["0", "1", "2"]
    assert json.loads((out / "state.json").read_text())["phases"] == {"head": 1, "finetune": 3}
    assert result["epochs"] == 3 and result["weights"] == str(weights)
    assert json.loads((out / "result.json").read_text()) == result


def test_cli_study_backbones_from_local_weights_on_shared_tiles(shared_data, tmp_path):
    """The acceptance run, offline: resnet50d and efficientnetv2_rw_t from KerasHub preset
    directories and regnet from a keras.applications RegNetY file, all made here, given per
    backbone with one --weights flag; trained on 60 real shared tiles (10 source tiles a class)."""
    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (dev extra) writes the RegNet file")
    from test_hub import random_hub_backbone

    with open(shared_data / "groups.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked, per_group = [], {}
    for row in sorted(rows, key=lambda r: (r["label"], r["group"], r["path"])):
        groups = {g for (label, g) in per_group if label == row["label"]}
        key = (row["label"], row["group"])
        if per_group.get(key, 0) < 2 and (key in per_group or len(groups) < 10):
            per_group[key] = per_group.get(key, 0) + 1
            picked.append(f"{shared_data / row['path']},{row['label']},{row['group']}")
    manifest = tmp_path / "tiles.csv"
    manifest.write_text("path,label,group\n" + "\n".join(picked) + "\n")
    assert len(picked) == 60
    sources = {}
    for name in ("resnet50d", "efficientnetv2_rw_t"):
        sources[name] = tmp_path / f"{name}_preset"
        random_hub_backbone(name).save_to_preset(str(sources[name]))
    sources["regnet"] = tmp_path / "regnety002_notop.h5"
    tf_keras.applications.RegNetY002(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
    ).save_weights(str(sources["regnet"]))
    weights = ",".join(f"{name}={path}" for name, path in sources.items())
    argv = [
        "--preset", "cpu", "--data", str(manifest), "--weights", weights,
        "--backbones", "resnet50d,efficientnetv2_rw_t,regnet:200mf", "--image-size", str(SIZE),
        "--crop-size", "0", "--batch-size", "8", "--head-epochs", "1", "--epochs", "0",
        "--output", str(tmp_path / "runs"), "--name", "study", "--verbose", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    (run,) = (tmp_path / "runs").glob("*-study")
    with open(run / "comparison.csv", newline="") as fh:
        results = {r["backbone"]: r for r in csv.DictReader(fh)}
    assert set(results) == set(sources)
    folders = {"resnet50d": "resnet50d", "efficientnetv2_rw_t": "efficientnetv2_rw_t",
               "regnet": "regnet-200mf"}
    for name, path in sources.items():
        assert results[name]["weights"] == str(path)
        history = read_history(run / folders[name] / "history.csv")
        assert [r["epoch"] for r in history] == ["0"]  # the head phase: a transfer backbone
    assert any((run / "best" / "saved_model").glob("*/saved_model.pb"))


def test_invalid_config_fails_before_anything_runs(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="lungtf.train"):
        assert main(["--backbones", "resnet34,vgg16", "--output", str(tmp_path / "runs")]) == 2
        assert re.search("invalid configuration: unknown backbone 'vgg16'.*resnet34", caplog.text)
        assert main(["--batch-size", "0", "--output", str(tmp_path / "runs")]) == 2
        assert "batch_size must be >= 1; got 0" in caplog.text
    assert not (tmp_path / "runs").exists()


def test_preset_follows_the_hardware_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="lungtf.train"):
        assert choose_preset(None) == "cpu"  # this machine has no GPU
        assert choose_preset("gpu") == "gpu"
    assert "no GPU visible: preset 'cpu' chosen automatically" in caplog.text


def test_best_rule_and_uncertainty_threshold():
    rows = [
        {"backbone": "a", "val_accuracy": 0.9, "missed_cancers": 1, "params": 10},
        {"backbone": "b", "val_accuracy": 0.95, "missed_cancers": 3, "params": 10},
        {"backbone": "c", "val_accuracy": 0.95, "missed_cancers": 2, "params": 20},
    ]
    assert pick_best(rows)["backbone"] == "c"  # tie on accuracy -> fewest missed cancers
    probs = np.array([[0.99, 0.005, 0.005], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    labels = np.array([0, 0, 0, 2])  # the two least confident predictions are wrong
    assert uncertainty_threshold(probs, labels) == pytest.approx(0.9)
    assert uncertainty_threshold(probs, np.array([1, 1, 0, 2])) == 1.0  # never 99% accurate


def _resolved_cfg(tiny_data, tmp_path):
    run = resolve_run_config("cpu", None, {
        "data": {"data": str(tiny_data), "image_size": SIZE, "crop_size": 0},
        "backbones": ["resnet34"],
        "output": str(tmp_path / "runs"), "name": "locked",
    })  # fmt: skip
    run.validate()
    return run


def test_two_runs_in_the_same_second_get_their_own_directories(tiny_data, tmp_path):
    cfg = _resolved_cfg(tiny_data, tmp_path)
    args = build_parser().parse_args(["--new"])
    (first, lock1), (second, lock2) = _run_dir(cfg, args), _run_dir(cfg, args)  # within a second
    assert first != second and first.is_dir() and second.is_dir()
    assert RunLock.try_acquire(first) is None  # each held by its run until released
    lock1.release()
    RunLock.acquire(first).release()
    lock2.release()
    now = datetime(2026, 12, 3, 10, 0, 0, tzinfo=timezone.utc)  # the same second, for certain
    names = [claim_new(tmp_path, "tiny", now) for _ in range(2)]
    assert [path.name for path, _ in names] == ["20261203T100000Z-tiny", "20261203T100000Z-2-tiny"]


HOLD = """import sys, time
from lungtf.train.rundir import RunLock
lock = RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_run_held_by_a_live_process_is_not_resumed(tiny_data, tmp_path):
    """A second identical command skips the unfinished directory another process trains into;
    once that process is gone (killed), the directory is resumed as before."""
    cfg = _resolved_cfg(tiny_data, tmp_path)
    held, lock = claim_new(Path(cfg.output), cfg.name)
    dump_yaml(cfg, held / "config.yaml")  # an unfinished run of the same configuration
    lock.release()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().decode().strip() == "held"
        args = build_parser().parse_args([])
        other, other_lock = _run_dir(cfg, args)
        assert other != held
        other_lock.release()
        assert main(["--resume", str(held)]) == 3  # refused, nothing trained into it
        assert not (held / "splits.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    again, lock = _run_dir(cfg, args)
    assert again == held  # the holder died (as under SIGKILL): its directory resumes
    lock.release()


SAVER = """import sys
import keras
import numpy as np
from pathlib import Path
from lungtf.train.callbacks import make_callbacks

out, epochs = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(2048, activation="relu"),
                          keras.layers.Dense(3, activation="softmax")])  # 1 M weights: 12 MB saves
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])


class EveryEpochIsBest(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"] = float(epoch)  # so best.keras is rewritten at every epoch end
        print("epoch", epoch, flush=True)


x, y = np.random.default_rng(0).random((16, 512), np.float32), np.arange(16) % 3
model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=16, verbose=0,
          callbacks=[EveryEpochIsBest(), *make_callbacks(out, "scratch", model, 16, 0)])
"""


def test_sigkill_during_saves_never_breaks_resume(tmp_path, monkeypatch):
    """Kill a process that saves best.keras, the backup and the history every few tenths of a
    second at random moments; each restart resumes from what the kill left (a truncated
    best.keras or backup would make it fail), and a last run finishes with every epoch once."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    out = tmp_path / "run" / "tiny"
    rng = np.random.default_rng(19)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}  # this checkout's lungtf, not an installed one
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(out), "100000"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        lines = [proc.stdout.readline() for _ in range(2)]  # two epochs saved in this run
        assert all(lines), "the saver died before saving: it could not resume"
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        keras.models.load_model(out / "best.keras")  # whatever the moment, the file is whole
        epochs = [int(r["epoch"]) for r in read_history(out / "history.csv")]
        assert epochs == list(range(len(epochs)))
    last = epochs[-1] + 3
    monkeypatch.setattr(sys, "argv", [str(script), str(out), str(last)])
    runpy.run_path(str(script), run_name="__main__")  # the last run, in this process: finishes
    assert [int(r["epoch"]) for r in read_history(out / "history.csv")] == list(range(last))


def test_auto_bool_flags_take_any_case_and_refuse_cleanly(capsys):
    parser = build_parser()
    for given, expected in (("True", True), ("true", True), ("FALSE", False), ("false", False),
                            ("auto", "auto"), ("Auto", "auto")):
        args = parser.parse_args(["--jit-compile", given, "--device-augment", given])
        assert args.jit_compile == args.device_augment == expected
    assert "{auto,true,false}" in parser.format_help()
    for flag in ("--jit-compile", "--device-augment"):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([flag, "yes"])
        assert stop.value.code == 2  # argparse's usage error, not a KeyError traceback
        err = capsys.readouterr().err
        assert f"argument {flag}: invalid value 'yes'; allowed are auto, true, false" in err


def test_backbone_without_imagenet_weights_warns_and_comparison_says_so(caplog, tmp_path):
    specs = [get_spec(name) for name in list_backbones()]
    specs.append(replace(get_spec("resnet50"), name="unweighted", imagenet=False))
    rows = []
    for spec in specs:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lungtf.train"):
            weights, note = resolve_weights(spec, "imagenet", spec.name)
        assert resolve_weights(spec, "none", spec.name) == ("none", None)
        if spec.imagenet:
            assert (weights, note, caplog.records) == ("imagenet", None, [])
            continue
        assert weights == "none" and f"{spec.name} has no ImageNet weights" in note
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert note in caplog.records[0].getMessage()
        rows.append({"entry": spec.name, "backbone": spec.name, "variant": "v", "weights": weights,
                     "weights_note": note, "val_accuracy": 0.5, "missed_cancers": 0, "params": 1})
    rows.append({**rows[-1], "entry": "resnet50", "backbone": "resnet50", "weights": "imagenet",
                 "weights_note": None})
    write_comparison(rows, tmp_path, "grouped", rows[-1])
    md = (tmp_path / "comparison.md").read_text()
    assert "**Weights not as requested:**" in md
    for row in rows[:-1]:
        assert f"- {row['entry']}: {row['weights_note']}." in md
    assert "- resnet50:" not in md


class _StopAfterIngest(Exception):
    """Raised where the first backbone would start training: the run got past its data."""


@pytest.fixture
def stop_before_training(monkeypatch) -> list:
    """``main`` runs up to the first backbone (config, lock, ingest, split) and stops there with
    ``_StopAfterIngest``; the list collects the splits each call reached training with."""
    reached = []

    def stop(entry, cfg, rt, splits, out_dir, verbose=2, extra_callbacks=None):
        reached.append(splits)
        raise _StopAfterIngest(entry)

    monkeypatch.setattr("lungtf.train.fit.train_backbone", stop)
    return reached


def test_symlinked_data_and_outside_rows_take_the_checks_flags(tmp_path, stop_before_training):
    """A dataset of symlinked class folders is read with --data-root (the folder they lead
    into), a manifest with ../ rows with --allow-outside-root; the flags are stored in the run's
    config.yaml, so the same command and --resume read the run's splits.csv the same way."""
    real = tmp_path / "disk"
    for c, name in enumerate(CLASS_NAMES):
        for i in range(10):
            write_tile(real / name / f"{name}{i}.jpeg", seed=100 * c + i, cls=c)
    linked = tmp_path / "dataset"
    linked.mkdir()
    for name in CLASS_NAMES:
        (linked / name).symlink_to(real / name, target_is_directory=True)
    manifest = tmp_path / "lists" / "tiles.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n" + "".join(
        f"../disk/{name}/{name}{i}.jpeg,{name}\n" for name in CLASS_NAMES for i in range(10)))
    common = ["--backbones", "resnet34", "--image-size", str(SIZE), "--crop-size", "0",
              "--weights", "none",
              "--output", str(tmp_path / "runs"), "--verbose", "0"]
    for data, flags, name in ((linked, ["--data-root", str(real)], "linked"),
                              (manifest, ["--allow-outside-root"], "outside")):
        argv = ["--data", str(data), "--name", name, *common]
        with pytest.raises(ValueError, match="--data-root.*--allow-outside-root"):
            main(argv)  # refused by default, naming the flags that now exist here
        for run in (tmp_path / "runs").glob(f"*-{name}"):  # the refused run's directory
            for path in run.iterdir():
                path.unlink()
            run.rmdir()
        with pytest.raises(_StopAfterIngest):
            main(argv + flags)
        (run,) = (tmp_path / "runs").glob(f"*-{name}")
        stored = load_yaml(run / "config.yaml")["data"]
        assert (stored["data_root"], stored["allow_outside_root"]) == (
            (str(real), False) if name == "linked" else (None, True))
        with pytest.raises(_StopAfterIngest):
            main(argv + flags)  # the same command resumes this run: the same configuration
        with pytest.raises(_StopAfterIngest):
            main(["--resume", str(run)])
        assert [p.name for p in (tmp_path / "runs").glob(f"*-{name}")] == [run.name]
        first, again, resumed = (
            {k: [(os.path.realpath(r.path), r.label, r.group) for r in rs] for k, rs in s.items()}
            for s in stop_before_training[-3:]
        )
        assert sum(map(len, first.values())) == 30 and again == first and resumed == first


def test_found_data_is_written_into_config_and_the_demo_finds_it(
    tmp_path, monkeypatch, stop_before_training
):
    """A run that found its data ($LUNGTF_DATA, relative here) stores the absolute path in
    config.yaml: the demo's --run finds its test tiles without --data-root, and the same command
    run again resolves the same configuration, so it resumes the run."""
    from lungtf.demo_files import find_examples

    for c, name in enumerate(CLASS_NAMES):
        for i in range(10):
            write_tile(tmp_path / "tiles" / name / f"{name}{i}.jpeg", seed=100 * c + i, cls=c)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LUNGTF_DATA", "tiles")
    argv = ["--backbones", "resnet34", "--image-size", str(SIZE), "--crop-size", "0",
            "--weights", "none", "--output", "runs", "--name", "found", "--verbose", "0"]
    for _ in range(2):
        with pytest.raises(_StopAfterIngest):
            main(argv)
    (run,) = (tmp_path / "runs").glob("*-found")  # the second call resumed the first run
    assert load_yaml(run / "config.yaml")["data"]["data"] == str(tmp_path / "tiles")
    monkeypatch.chdir(run)  # the demo is started from anywhere
    examples = find_examples([], run.resolve(), per_source=6)
    tests = {r.path for r in stop_before_training[0]["test"]}
    assert examples and all(caption.startswith("test: ") for _, caption in examples)
    assert {path for path, _ in examples} <= tests


def test_a_resumed_run_keeps_its_list_of_skipped_files(tmp_path, stop_before_training, caplog):
    """The files the first ingest skipped (a truncated JPEG, a text file named .jpeg) stay in
    bad_files.csv, and in the log's count, when the same command or --resume continues the run
    (its splits.csv lists only readable files); a tile of the split broken since is added."""
    root = tmp_path / "tiles"
    rows = []
    for c, name in enumerate(CLASS_NAMES):
        for i in range(10):
            write_tile(root / name / f"{name}{i}.jpeg", seed=100 * c + i, cls=c)
            rows.append(f"{name}/{name}{i}.jpeg,{name},{name}-{i // 2}")
    (root / "groups.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    truncated = write_tile(root / "lung_aca" / "cut.jpeg", seed=7)
    truncated.write_bytes(truncated.read_bytes()[:-300])
    (root / "lung_n" / "notes.jpeg").write_text("not a jpeg at all\n")
    argv = ["--data", str(root), "--backbones", "resnet34", "--image-size", str(SIZE),
            "--crop-size", "0", "--weights", "none", "--output", str(tmp_path / "runs"),
            "--name", "bad", "--verbose", "0"]

    def run_once(args) -> tuple[bytes, list]:
        caplog.clear()
        with caplog.at_level(logging.INFO, "lungtf.train"), pytest.raises(_StopAfterIngest):
            main(args)
        (run,) = (tmp_path / "runs").glob("*-bad")  # every call continued the first run
        skipped = [r.getMessage() for r in caplog.records if "unreadable files" in r.getMessage()]
        return (run / "bad_files.csv").read_bytes(), skipped

    first, logged = run_once(argv)
    (run,) = (tmp_path / "runs").glob("*-bad")
    with open(run / "bad_files.csv", newline="") as fh:
        listed = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert sorted(listed) == ["cut.jpeg", "notes.jpeg"], listed
    assert "truncated" in listed["cut.jpeg"] and logged[0].startswith("2 unreadable files")
    assert run_once(argv) == (first, logged)  # the same command resumes the run
    assert run_once(["--resume", str(run)]) == (first, logged)
    assert sum(map(len, stop_before_training[-1].values())) == 30
    broken = stop_before_training[-1]["train"][0].path  # a tile of the split, broken since
    Path(broken).write_bytes(b"")
    again, logged = run_once(["--resume", str(run)])
    assert again.startswith(first) and again[len(first):].decode().startswith(broken)
    assert logged[0].startswith("3 unreadable files")


class _Started(Exception):
    """Raised by ``_FirstWeights`` once it has the initial weights: no step needs to run."""


class _FirstWeights(keras.callbacks.Callback):
    """Records a digest of the model's weights when training begins, then stops the run."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def on_train_begin(self, logs=None):
        self.seen.append(np.concatenate([np.ravel(w) for w in self.model.get_weights()]))
        raise _Started


def test_the_run_seed_fixes_the_initial_weights(tiny_data, tmp_path):
    """Two trainings with the same ``--seed`` start from the same weights, another seed from
    others, whatever random calls ran before (Keras's initialisers follow the run's seed)."""
    seen = []
    for i, seed in enumerate((7, 7, 8)):
        run = resolve_run_config("cpu", None, {
            "data": {"data": str(tiny_data), "image_size": SIZE, "crop_size": 0,
                     "batch_size": 8, "seed": seed},
            "backbones": ["regnet:200mf"],
        })  # fmt: skip
        keras.utils.set_random_seed(100 + i)  # what ran before must not matter
        with runtime(run.train) as rt:
            splits, _ = prepare_splits(run.data, tmp_path / f"run{i}")
            with pytest.raises(_Started):
                train_backbone("regnet:200mf", run, rt, splits, tmp_path / f"run{i}" / "r", 0,
                               [_FirstWeights(seen)])
    assert np.array_equal(seen[0], seen[1])
    assert not np.array_equal(seen[0], seen[2])
