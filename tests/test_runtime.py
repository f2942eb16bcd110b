"""Runtime: dtype policy set and restored, strategy choice, MirroredStrategy over 2 logical CPUs."""

import subprocess
import sys
import textwrap
from pathlib import Path

import keras

import lungtf.models  # noqa: F401  (registers the layers best.keras holds)
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
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import write_tile
from lungtf.config import resolve_run_config
from lungtf.constants import CLASS_NAMES
from lungtf.train.fit import train_backbone
from lungtf.train.prepare import prepare_splits
from lungtf.train.runtime import runtime

root = Path(sys.argv[1])
for c, name in enumerate(CLASS_NAMES):
    for i in range(8):
        write_tile(root / "data" / name / f"{name}{i}.png", seed=10 * c + i, cls=c)
run = resolve_run_config("cpu", None, {
    "data": {"data": str(root / "data"), "image_size": 32, "crop_size": 24, "batch_size": 4},
    "train": {"scratch_epochs": 1, "distribution": "mirrored", "device_augment": True},
    "backbones": ["resnet34"],
})
with runtime(run.train) as rt:
    splits, _ = prepare_splits(run.data, root / "run")
    result = train_backbone("resnet34", run, rt, splits, root / "run" / "resnet34", verbose=0)
print("replicas", rt.replicas, type(rt.strategy).__name__, "val_accuracy", result["val_accuracy"])
"""


def test_mirrored_strategy_on_two_logical_cpus_with_device_augmentation(tmp_path):
    # Logical devices must be configured before TensorFlow initialises: a fresh interpreter.
    # Augmentation inside the training step (the GPU path), cropping 24 px training views of the
    # 32 px tiles, is exercised on the same run.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MIRRORED), str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    assert words[:3] == ["replicas", "2", "MirroredStrategy"]
    assert 0 <= float(words[4]) <= 1
    saved = keras.models.load_model(tmp_path / "run" / "resnet34" / "best.keras", compile=False)
    assert saved.input_shape == (None, 32, 32, 3)  # the deployable model, not the training wrapper
    assert {"preprocess", "backbone", "probabilities"} <= {layer.name for layer in saved.layers}
