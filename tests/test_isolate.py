"""lungtf.train.isolate: each backbone of a run trained in a child process of its own.

The backbones are two-convolution probes registered by a module written into a temporary
folder (a child process must be able to import what registered them); 32 px, 1 epoch.
"""

import json
import logging
import os
import re
from dataclasses import replace

import keras
import pytest
from conftest import backbones_from_module, probe_source, write_grouped_tiles

from lungtf.config import RunConfig, TrainConfig
from lungtf.train import main
from lungtf.train.cli import build_parser
from lungtf.train.isolate import in_child_processes, planned_jit, resolve_backbone_process


@pytest.fixture(scope="module")
def probe_module(tmp_path_factory):
    """Import the probes ``iso_a`` and ``iso_b`` (variants ``v1``, ``raise``, ``kill``) from a
    module file; removed from the registry after."""
    folder, names = tmp_path_factory.mktemp("probes"), ("iso_a", "iso_b")
    source = probe_source(*names, variants=("v1", "raise", "kill"))
    with backbones_from_module(folder, "isolate_probes", source, names) as module:
        yield module


@pytest.fixture(autouse=True)
def log_to_this_tests_stderr():
    """``lungtf.train``'s stderr handler is made once per process, on the ``sys.stderr`` of its
    time: drop it, so that ``main`` makes one on this test's captured stream."""
    logger = logging.getLogger("lungtf.train")
    for handler in [h for h in logger.handlers if getattr(h, "_lungtf", False)]:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """3 classes x 12 tiles (40 px) in groups of two, with a groups.csv beside them."""
    return write_grouped_tiles(tmp_path_factory.mktemp("data") / "lung_image_sets", 12, 2)


def _argv(tiles, out, backbones: str, *flags: str) -> list[str]:
    return [
        "--preset", "cpu", "--data", str(tiles), "--backbones", backbones, "--image-size", "32",
        "--crop-size", "0", "--batch-size", "8", "--scratch-epochs", "1", "--weights", "none",
        "--output", str(out), "--name", "iso", "--verbose", "0", *flags,
    ]  # fmt: skip


def test_children_train_fail_resume_and_package(probe_module, tiles, tmp_path, capsys):
    """A backbone whose child fails (an exception at build) stops the run with code 1 and one
    message naming it (the parent adds no traceback); ``--resume`` skips the backbone done
    before and trains the next in another child; each backbone trained in a process of its
    own (pids from their log lines in train.log), the parent held the lock, and the run
    directory is packaged as in-process. With XLA on (``--jit-compile true``) ``auto`` (the
    default) chooses child processes; the resume trains without XLA, ``backbone_process`` true."""
    assert main(_argv(tiles, tmp_path, "iso_a,iso_b:raise", "--jit-compile", "true")) == 1
    err = capsys.readouterr().err
    assert "backbone iso_b:raise: its training process exited with code 1" in err, err[-3000:]
    assert err.count("Traceback") == 1, err[-3000:]  # the child's own
    assert "iso_a: training in process" in err  # the child's output is relayed
    (run,) = tmp_path.glob("*-iso")
    assert (run / "iso_a" / "result.json").is_file() and not (run / "comparison.md").exists()
    config = run / "config.yaml"
    text = config.read_text().replace("iso_b:raise", "iso_b")  # and iso_b without XLA (cheaper)
    text = text.replace("jit_compile: true", "jit_compile: false")
    config.write_text(text.replace("backbone_process: auto", "backbone_process: true"))
    assert main(["--resume", str(run)]) == 0
    log = (run / "train.log").read_text()
    assert "iso_a: already trained (result.json), skipped" in log
    assert "trains in a process of its own (backbone_process auto, XLA on" in log
    assert log.count("XLA on, augmentation") == 2  # iso_a's and iso_b:raise's runtime
    assert "trains in a process of its own (backbone_process True)" in log  # the resume
    found = {e: (int(pid), int(parent)) for e, pid, parent
             in re.findall(r"(iso_a|iso_b): training in process (\d+) \(parent (\d+)\)", log)}
    assert set(found) == {"iso_a", "iso_b"}, log
    assert found["iso_a"][0] != found["iso_b"][0]
    assert {parent for _, parent in found.values()} == {os.getpid()}
    assert os.getpid() not in {pid for pid, _ in found.values()}
    assert re.search(r"iso_b: process \d+ ends, peak RSS \d+ MiB", log)
    assert (run / ".lock").read_text().strip() == str(os.getpid())  # no child took the lock
    for entry in ("iso_a", "iso_b"):
        assert json.loads((run / entry / "result.json").read_text())["entry"] == entry
        assert (run / entry / "best.keras").is_file()
    assert "iso_b" in (run / "comparison.md").read_text()
    assert json.loads((run / "best" / "lungtf.json").read_text())["backbone"] in ("iso_a", "iso_b")
    assert any((run / "best" / "saved_model").iterdir())


def test_killed_child_stops_the_run(probe_module, tiles, tmp_path, capsys):
    """A child killed by SIGKILL: code 1, the backbone and the signal named, no traceback."""
    assert main(_argv(tiles, tmp_path, "iso_a:kill,iso_b", "--backbone-process", "true")) == 1
    err = capsys.readouterr().err
    assert "backbone iso_a:kill: its training process was killed by signal 9" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (run,) = tmp_path.glob("*-iso")
    assert not (run / "iso_b").exists()


def test_auto_is_a_child_process_per_backbone_with_xla_only(probe_module, monkeypatch):
    """``auto``: children when XLA is on and there are several backbones, one worker; the
    resolution on this CPU-only machine; backbones a child cannot import stay in-process."""
    assert resolve_backbone_process("auto", False, 3, False) is False
    assert resolve_backbone_process("auto", True, 3, False) is True
    assert resolve_backbone_process("auto", True, 1, False) is False
    assert resolve_backbone_process("auto", True, 3, True) is False
    assert resolve_backbone_process(True, False, 1, False) is True
    assert resolve_backbone_process(True, True, 3, True) is False
    assert resolve_backbone_process(False, True, 3, False) is False
    train = TrainConfig()
    assert planned_jit(train, gpus=0) is False and planned_jit(train, gpus=1) is True
    assert planned_jit(replace(train, jit_compile=True), gpus=0) is True
    assert planned_jit(replace(train, jit_compile=True), gpus=2) is False  # mirrored: no XLA
    assert planned_jit(replace(train, jit_compile=True, distribution="none"), gpus=2) is True
    cfg = RunConfig(backbones=("iso_a", "iso_b"), preset="cpu")
    xla = replace(cfg, train=replace(cfg.train, jit_compile=True))
    assert in_child_processes(cfg) is False  # auto without a GPU: no XLA
    assert in_child_processes(xla) is True
    assert in_child_processes(replace(xla, backbones=("iso_a",))) is False
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:1"]}, '
                       '"task": {"type": "worker", "index": 0}}')
    assert in_child_processes(xla) is False  # several workers: in-process
    monkeypatch.delenv("TF_CONFIG")

    from lungtf.models import register_backbone, registry

    @register_backbone("iso_local", preprocess=None, from_scratch=True, preprocessing="",
                       default_variant="v1", description="registered inside a function")
    def local(variant, input_shape):
        return keras.Model()

    try:
        mixed = replace(xla, backbones=("iso_a", "iso_local"))
        assert in_child_processes(mixed) is False
        with pytest.raises(ValueError, match="cannot register iso_local"):
            in_child_processes(replace(mixed, train=replace(mixed.train, backbone_process=True)))
    finally:
        del registry._REGISTRY["iso_local"]
    with pytest.raises(ValueError, match="backbone_process must be one of"):
        TrainConfig(backbone_process="sometimes").validate()
    assert build_parser().parse_args(["--backbone-process", "False"]).backbone_process is False
