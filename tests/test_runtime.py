"""Runtime: dtype policy, XLA rule and strategy; the GPU recipe's code path run on this CPU.

The GPU recipe (``--preset gpu``: mixed_float16, XLA, augmentation inside the training step) is
trained end to end at tiny size, once on one device and once with MirroredStrategy over 2
logical CPU devices, then its exports are checked (float32 graph, no XLA-must-compile function)
and served by the dev server.
"""

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from test_export import graph_problems
from test_serving import launch, wait_ready

import lungtf.models  # registers the layers best.keras holds
import lungtf.train.runtime
from lungtf import export
from lungtf.config import TrainConfig
from lungtf.models.portable import portable_copy
from lungtf.train.runtime import (
    cpu_has_bf16,
    make_strategy,
    resolve_jit,
    resolve_precision,
    runtime,
)

REPO = Path(__file__).resolve().parents[1]


def test_precision_policy_is_set_then_restored(monkeypatch):
    monkeypatch.setattr(lungtf.train.runtime, "cpu_has_bf16", lambda: True)
    before = keras.config.dtype_policy().name
    with runtime(TrainConfig(precision="mixed_bfloat16")) as rt:
        assert rt.precision == keras.config.dtype_policy().name == "mixed_bfloat16"
        assert rt.gpus == 0 and not rt.jit_compile and not rt.device_augment  # CPU: auto is off
    assert keras.config.dtype_policy().name == before
    assert resolve_precision("auto", gpus=0) == "float32"
    assert resolve_precision("auto", gpus=1) == "mixed_float16"


X86_FLAGS = "flags\t\t: fpu vme sse2 avx2 avx512f avx512bw"
ARM_FEATURES = "Features\t: fp asimd evtstrm aes sha1 crc32 atomics"


def test_bfloat16_only_where_the_cpu_computes_it(monkeypatch, caplog):
    assert cpu_has_bf16(f"processor\t: 0\n{X86_FLAGS} avx512_bf16 avx512_vnni\n")
    assert cpu_has_bf16(f"{X86_FLAGS} amx_bf16 amx_tile\n")
    assert cpu_has_bf16(f"{ARM_FEATURES} bf16 i8mm\n")
    assert not cpu_has_bf16(f"{X86_FLAGS} avx512_vnni\n")  # AVX-512 alone emulates bfloat16
    assert not cpu_has_bf16(f"{ARM_FEATURES}\nmodel name\t: bf16 in a name is not a flag\n")
    assert not cpu_has_bf16("")
    monkeypatch.setattr(lungtf.train.runtime, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="lungtf"):
        assert resolve_precision("mixed_bfloat16", gpus=0) == "float32"
    assert "no bfloat16 arithmetic" in caplog.text and "float32" in caplog.text
    assert resolve_precision("mixed_bfloat16", gpus=1) == "mixed_bfloat16"  # the GPU decides
    assert resolve_precision("mixed_float16", gpus=0) == "mixed_float16"  # asked for: as asked


def test_auto_strategy_is_single_device_on_cpu(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert make_strategy("auto", gpus=0).num_replicas_in_sync == 1


def test_xla_is_on_by_default_only_with_a_gpu_and_one_replica(caplog):
    assert resolve_jit("auto", gpus=1, replicas=1) is True
    assert resolve_jit("auto", gpus=2, replicas=2) is False  # Keras's own rule under tf.distribute
    assert resolve_jit("auto", gpus=0, replicas=1) is False
    assert resolve_jit(True, gpus=0, replicas=1) is True  # explicit: honoured, CPU included
    assert resolve_jit(False, gpus=1, replicas=1) is False
    with caplog.at_level(logging.WARNING, logger="lungtf.train"):
        assert resolve_jit(True, gpus=4, replicas=4) is False
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "cannot be honoured with 4 replicas" in record.getMessage()
    assert "WITHOUT XLA" in record.getMessage()


GPU_RECIPE = r"""
import sys
from pathlib import Path

import tensorflow as tf

replicas = int(sys.argv[2])
if replicas > 1:  # logical devices must be configured before TensorFlow initialises
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
import keras

sys.path.insert(0, "tests")
from conftest import write_tile
from lungtf.config import AUGMENTATIONS
from lungtf.constants import CLASS_NAMES
from lungtf.models import register_backbone
from lungtf.models.regnet import GroupedConv2D, y_block
from lungtf.models.resnet import IMAGENET_PREPROCESSING, conv_bn, imagenet_preprocess
from lungtf.train import main


@register_backbone("gpu_probe", preprocess=imagenet_preprocess,
                   preprocessing=IMAGENET_PREPROCESSING, default_variant="tiny",
                   from_scratch=True, description="a two-block RegNetY-style test backbone")
def gpu_probe(variant, input_shape):
    # A grouped convolution as a GPU build makes it (keras.ops.conv, XLA-compiled), then a real
    # RegNetY block (BatchNorm, squeeze-excitation, residual): small, so XLA compiles quickly.
    inputs = keras.Input(input_shape)
    x = conv_bn(inputs, 16, 3, 2, "stem")
    x = GroupedConv2D(16, 3, 2, 8, implementation="grouped", name="gpu_conv")(x)
    x = y_block(keras.layers.ReLU(name="gpu_relu")(x), 32, 1, 8, "s1_b1")
    return keras.Model(inputs, x, name="gpu_probe")


root = Path(sys.argv[1])
data, rows = root / "data", []
for c, name in enumerate(CLASS_NAMES):
    for i in range(12):
        path = write_tile(data / name / f"{name}{i}.png", seed=10 * c + i, cls=c)
        rows.append(f"{name}/{path.name},{name},{name}-{i // 2}")
(data / "groups.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
sys.exit(main([
    "--preset", "gpu", "--data", str(data), "--backbones", "gpu_probe", "--weights", "none",
    "--image-size", "32", "--crop-size", "24", "--batch-size", "8", "--scratch-epochs", "1",
    "--augment", ",".join(AUGMENTATIONS), "--precision", "mixed_float16", "--jit-compile", "True",
    "--device-augment", "True", "--distribution", "mirrored" if replicas > 1 else "none",
    "--output", str(root / "runs"), "--name", "gpu", "--verbose", "0",
]))
"""
"""The GPU preset's configuration at tiny size: ``python -m lungtf.train --preset gpu`` with
mixed_float16, ``--jit-compile True``, ``--device-augment True``, every augmentation name and a
random crop, on a small backbone built from the project's own layers (the real backbones take
minutes of XLA compilation each on 2 cores; the acceptance run in docs/gpu.md trains them)."""


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory) -> dict[int, Path]:
    """Run directories of the GPU recipe on 1 and on 2 replicas (two interpreters at once)."""
    root = tmp_path_factory.mktemp("gpu_recipe")
    procs = {}
    for replicas in (1, 2):
        with open(root / f"{replicas}.log", "wb") as log:
            procs[replicas] = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(GPU_RECIPE), str(root / str(replicas)),
                 str(replicas)],
                stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
            )  # fmt: skip
    for replicas, proc in procs.items():
        code = proc.wait(timeout=900)
        assert code == 0, (root / f"{replicas}.log").read_text()[-4000:]
    return {r: next((root / str(r) / "runs").glob("*-gpu")) for r in procs}


def test_gpu_recipe_trains_on_one_and_on_two_replicas(gpu_runs):
    single, mirrored = ((run / "train.log").read_text() for run in (gpu_runs[1], gpu_runs[2]))
    assert (
        "1 replica(s) (_DefaultDistributionStrategy), precision mixed_float16, XLA on, "
        "augmentation on device"
    ) in single
    assert (
        "2 replica(s) (MirroredStrategy), precision mixed_float16, XLA off, "
        "augmentation on device"
    ) in mirrored
    assert "WARNING jit_compile true cannot be honoured with 2 replicas" in mirrored
    for run in gpu_runs.values():
        meta = json.loads((run / "best" / "lungtf.json").read_text())
        assert meta["backbone"] == "gpu_probe" and 0 <= meta["val_metrics"]["accuracy"] <= 1
        saved = keras.models.load_model(run / "gpu_probe" / "best.keras", compile=False)
        assert saved.input_shape == (None, 32, 32, 3)  # the deployable model, not the view
        assert {"preprocess", "backbone", "probabilities"} <= {layer.name for layer in saved.layers}
        assert saved.get_layer("logits").compute_dtype == "float16"  # trained mixed


def test_gpu_recipe_exports_a_float32_graph_without_xla(gpu_runs):
    for run in gpu_runs.values():
        (version,) = (run / "best" / "saved_model").iterdir()
        assert graph_problems(version) == {"xla_must_compile": [], "half_ops": []}


def test_gpu_recipe_export_is_served_and_predicts_a_real_tile(gpu_runs, shared_data, tmp_path):
    tile = min((shared_data / "lung_aca").glob("*.jpeg")).read_bytes()
    config = tmp_path / "models.config"
    entries = []
    for replicas, name in ((1, "lungtf"), (2, "mirrored")):
        shutil.copytree(gpu_runs[replicas] / "best" / "saved_model", tmp_path / name)
        entries.append(f'config {{ name: "{name}" base_path: "{tmp_path / name}" '
                       'model_platform: "tensorflow" }')
    config.write_text("model_config_list {\n" + "\n".join(entries) + "\n}\n")
    proc = launch(["--config", str(config)], tmp_path / "log")
    try:
        target = wait_ready(proc, tmp_path / "log")
        with grpc.insecure_channel(target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for replicas, name in ((1, "lungtf"), (2, "mirrored")):
                req = predict_pb2.PredictRequest()
                req.model_spec.name = name
                req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([tile], dtype=tf.string))
                served = tf.make_ndarray(stub.Predict(req, timeout=60).outputs["probabilities"])
                trained = keras.models.load_model(
                    gpu_runs[replicas] / "best" / "model.keras", compile=False
                )
                pixels = export.decode_and_resize(tf.constant([tile]), 32)
                assert served.shape == (1, 3) and abs(served.sum() - 1) < 1e-5
                float32 = portable_copy(trained)(pixels, training=False).numpy()
                np.testing.assert_allclose(served, float32, atol=1e-5)
                mixed = trained(pixels, training=False).numpy()  # the float16 model itself
                np.testing.assert_allclose(served, mixed, atol=1e-2)
    finally:
        proc.kill()
        proc.wait()
