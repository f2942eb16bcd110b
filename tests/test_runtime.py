"""Runtime: dtype policy set and restored, strategy choice, MirroredStrategy over 2 logical CPUs."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import keras

from lungtf.config import TrainConfig
from lungtf.train.runtime import make_strategy, resolve_precision, runtime


def test_precision_policy_is_set_then_restored():
    before = keras.config.dtype_policy().name
    with runtime(TrainConfig(precision="mixed_bfloat16")) as rt:
        assert rt.precision == keras.config.dtype_policy().name == "mixed_bfloat16"
        assert rt.gpus == 0 and not rt.jit_compile and not rt.device_augment  # CPU: auto is off
    assert keras.config.dtype_policy().name == before
    assert resolve_precision("auto", gpus=0) == "float32"
    assert resolve_precision("auto", gpus=1) == "mixed_float16"


def test_auto_strategy_is_single_device_on_cpu(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert make_strategy("auto", gpus=0).num_replicas_in_sync == 1


MIRRORED = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from lungtf.config import ModelConfig, RunConfig, TrainConfig
from lungtf.models import build_model
from lungtf.train.fit import compile_model
from lungtf.train.runtime import runtime

with runtime(TrainConfig(distribution="mirrored")) as rt:
    with rt.strategy.scope():
        model = build_model(ModelConfig(backbone="resnet34", weights="none", image_size=32))
        compile_model(model, 1e-3, RunConfig(), rt)
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(16) % 3]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    print("replicas", rt.replicas, type(rt.strategy).__name__, "loss", history.history["loss"][0])
"""


def test_mirrored_strategy_on_two_logical_cpus_fits():
    # Logical devices must be configured before TensorFlow initialises: a fresh interpreter.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MIRRORED)],
        capture_output=True, text=True, timeout=600, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    assert words[:3] == ["replicas", "2", "MirroredStrategy"]
    assert math.isfinite(float(words[4]))  # the one fit produced a real loss
