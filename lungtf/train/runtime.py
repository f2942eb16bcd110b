"""Hardware set-up of a run: device detection, preset choice, dtype policy, XLA and distribution.

One place decides how training uses the machine, so the training loop itself is the same on a
2-core laptop, one GPU, several GPUs (``MirroredStrategy``) or several hosts
(``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from lungtf.config import AUTO, TrainConfig
from lungtf.models.portable import dtype_policy

log = logging.getLogger("lungtf.train")


def visible_gpus() -> int:
    """Number of GPUs TensorFlow can see."""
    return len(tf.config.list_physical_devices("GPU"))


def choose_preset(requested: str | None) -> str:
    """The preset to use: ``requested`` when given, else ``gpu`` with a GPU visible, else ``cpu``.

    The automatic choice is logged, so a reader of the run log knows why a recipe was used.
    """
    if requested is not None:
        return requested
    gpus = visible_gpus()
    if gpus:
        log.info("%d GPU(s) visible: preset 'gpu' chosen automatically", gpus)
        return "gpu"
    log.info("no GPU visible: preset 'cpu' chosen automatically (pass --preset gpu to override)")
    return "cpu"


CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""``/proc/cpuinfo`` flags of CPUs with bfloat16 arithmetic (x86 AVX512-BF16 / AMX, Arm BF16)."""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively (``/proc/cpuinfo``; False where unknown).

    Without it oneDNN emulates bfloat16 and ``mixed_bfloat16`` runs slower than float32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and CPU_BF16_FLAGS & set(value.split()):
            return True
    return False


def resolve_precision(requested: str, gpus: int) -> str:
    """Keras dtype policy name: ``auto`` is ``mixed_float16`` on GPU and ``float32`` on CPU;
    ``mixed_bfloat16`` on a CPU without bfloat16 arithmetic falls back to ``float32`` (logged)."""
    if requested == AUTO:
        return "mixed_float16" if gpus else "float32"
    if requested == "mixed_bfloat16" and not gpus and not cpu_has_bf16():
        log.warning("precision mixed_bfloat16 asked for, but this CPU has no bfloat16 arithmetic "
                    "(no %s in /proc/cpuinfo): training in float32",
                    "/".join(sorted(CPU_BF16_FLAGS)))
        return "float32"
    return requested


XLA_ACROSS_REPLICAS_ISSUES = (
    "keras-team/keras#21366, keras-team/keras#18145, keras-team/keras#18716"
)
"""Reports of Keras XLA-compiled train steps failing under ``tf.distribute`` (see ``resolve_jit``)."""


def resolve_jit(requested: bool | str, gpus: int, replicas: int) -> bool:
    """Whether ``compile`` gets ``jit_compile=True`` (the train step compiled with XLA).

    ``auto`` is on only with a GPU and a single replica, as Keras's own ``auto`` rule (Keras
    turns XLA off under ``tf.distribute``). An explicit ``True`` is honoured with one replica,
    CPU included. With several replicas it cannot be: Keras compiles the whole cross-replica step
    (``strategy.run`` over every device) as one XLA cluster, which fails at the first step --
    "Trying to access resource ... located in device CPU:1 from device CPU:0" on 2 logical CPUs
    here, with float32 as with mixed_float16; ``merge_call`` errors of the LossScaleOptimizer on
    GPUs (``XLA_ACROSS_REPLICAS_ISSUES``). So XLA is then off, with a WARNING that says why.
    """
    if requested == AUTO:
        return bool(gpus) and replicas == 1
    if requested and replicas > 1:
        log.warning(
            "jit_compile true cannot be honoured with %d replicas: Keras compiles the whole "
            "cross-replica train step as one XLA cluster, which is known to fail at the first "
            "step under tf.distribute (variables on several devices; LossScaleOptimizer "
            "merge_call; %s). Training WITHOUT XLA; use one device for an XLA run.",
            replicas,
            XLA_ACROSS_REPLICAS_ISSUES,
        )
        return False
    return bool(requested)


def make_strategy(kind: str, gpus: int) -> tf.distribute.Strategy:
    """Build the distribution strategy named by ``TrainConfig.distribution``.

    ``auto`` picks ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` is set, ``MirroredStrategy``
    over every visible GPU when there are two or more, else the default (single-device) strategy.
    ``mirrored`` without GPUs mirrors over the logical CPU devices (how it is tested on CPU).
    ``multiworker`` reads the cluster from ``TF_CONFIG`` (``lungtf.train.multiworker``).
    """
    if kind == AUTO:
        kind = "multiworker" if os.environ.get("TF_CONFIG") else "mirrored" if gpus > 1 else "none"
    if kind == "multiworker":
        from lungtf.train.multiworker import patch_keras

        patch_keras()  # Keras 3's trainer fails with several workers without it
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")]
        )
    return tf.distribute.get_strategy()


@dataclass(frozen=True)
class Runtime:
    """The resolved hardware settings every backbone of a run trains with.

    Attributes:
        strategy: the distribution strategy; models and optimizers are built in its scope.
        precision: the Keras dtype policy in force (softmax stays float32 in the model).
        jit_compile: compile the train step with XLA (``resolve_jit``: never with several
            replicas).
        device_augment: augment inside the training step (on the accelerator) rather than in
            the tf.data pipeline.
        gpus: GPUs visible.
    """

    strategy: tf.distribute.Strategy
    precision: str
    jit_compile: bool
    device_augment: bool
    gpus: int

    @property
    def replicas(self) -> int:
        """Replicas the global batch is split over."""
        return self.strategy.num_replicas_in_sync

    @property
    def chief(self) -> bool:
        """Whether this process writes the run directory: always, except on the non-chief
        workers of a multi-worker run (``lungtf.train.multiworker``)."""
        return self.strategy.extended.should_checkpoint


@contextlib.contextmanager
def runtime(cfg: TrainConfig) -> Iterator[Runtime]:
    """Set the dtype policy and build the strategy for ``cfg``; restore the policy afterwards.

    Must be entered before other TensorFlow work when ``TF_CONFIG`` asks for several workers
    (collective ops are configured when the strategy is created).
    """
    gpus = visible_gpus()
    strategy = make_strategy(cfg.distribution, gpus)
    rt = Runtime(
        strategy=strategy,
        precision=resolve_precision(cfg.precision, gpus),
        jit_compile=resolve_jit(cfg.jit_compile, gpus, strategy.num_replicas_in_sync),
        device_augment=bool(gpus) if cfg.device_augment == AUTO else bool(cfg.device_augment),
        gpus=gpus,
    )
    log.info(
        "runtime: %d GPU(s), %d replica(s) (%s), precision %s, XLA %s, augmentation on %s",
        gpus,
        rt.replicas,
        type(rt.strategy).__name__,
        rt.precision,
        "on" if rt.jit_compile else "off",
        "device" if rt.device_augment else "tf.data",
    )
    with dtype_policy(rt.precision):
        yield rt
