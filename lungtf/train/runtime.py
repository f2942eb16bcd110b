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

import keras
import tensorflow as tf

from lungtf.config import AUTO, TrainConfig

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


def resolve_precision(requested: str, gpus: int) -> str:
    """Keras dtype policy name: ``auto`` is ``mixed_float16`` on GPU and ``float32`` on CPU."""
    if requested == AUTO:
        return "mixed_float16" if gpus else "float32"
    return requested


def make_strategy(kind: str, gpus: int) -> tf.distribute.Strategy:
    """Build the distribution strategy named by ``TrainConfig.distribution``.

    ``auto`` picks ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` is set, ``MirroredStrategy``
    over every visible GPU when there are two or more, else the default (single-device) strategy.
    ``mirrored`` without GPUs mirrors over the logical CPU devices (how it is tested on CPU).
    """
    if kind == AUTO:
        kind = "multiworker" if os.environ.get("TF_CONFIG") else "mirrored" if gpus > 1 else "none"
    if kind == "multiworker":
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
        jit_compile: compile the train step with XLA.
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


@contextlib.contextmanager
def runtime(cfg: TrainConfig) -> Iterator[Runtime]:
    """Set the dtype policy and build the strategy for ``cfg``; restore the policy afterwards.

    Must be entered before other TensorFlow work when ``TF_CONFIG`` asks for several workers
    (collective ops are configured when the strategy is created).
    """
    gpus = visible_gpus()
    rt = Runtime(
        strategy=make_strategy(cfg.distribution, gpus),
        precision=resolve_precision(cfg.precision, gpus),
        jit_compile=bool(gpus) if cfg.jit_compile == AUTO else bool(cfg.jit_compile),
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
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(rt.precision)
    try:
        yield rt
    finally:
        keras.config.set_dtype_policy(previous)
