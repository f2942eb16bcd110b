"""Training on several machines (``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``).

Roles: ``TF_CONFIG`` names the cluster and this process's task. The chief (task type ``chief``,
or worker 0 when the cluster has no chief) alone writes the run directory. Every other worker
executes the same saves, in the same order (a collective strategy needs every worker in every
step, and Keras may read variables collectively while saving), into a worker directory
``<output>/.workers/<name>/<type>-<index>/`` that it empties when it starts and removes when it
ends: the Keras multi-worker convention of a temporary ``write_filepath`` for non-chief workers.

Agreement without a shared file system: non-chief workers keep no state of their own between
runs. What steers the run is taken from the chief over the collective channel (the gRPC links
that carry the gradients): the configuration, the split, each backbone's ``state.json``,
``result.json`` and ``history.csv``, and, when a phase resumes, every weight and optimizer slot
the chief restored from its ``BackupAndRestore`` backup. So any worker, or all of them, killed at
any moment (SIGKILL included) and started again with the same command continue from the chief's
last backup, whether or not the machines share storage.

Keras 3's TensorFlow trainer fails with several workers (keras-team/keras#20585):
``patch_keras`` fixes the two functions at fault (see there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml

from lungtf.config import AUTO, RunConfig, from_dict, to_dict
from lungtf.train.rundir import LOCK_FILE, RunLock, atomic_path

log = logging.getLogger("lungtf.train")

WORKERS_DIR = ".workers"
"""Folder of the output root that holds the worker directories of non-chief workers."""

CHIEF_STATE = ("state.json", "result.json", "history.csv")
"""Files of a backbone folder that steer training; non-chief workers take the chief's copies."""


@dataclass(frozen=True)
class Role:
    """This process's task in a ``TF_CONFIG`` cluster.

    Attributes:
        task_type: ``chief`` or ``worker``.
        index: task index within its type.
        chief: whether this task writes the run directory.
    """

    task_type: str
    index: int
    chief: bool

    @property
    def name(self) -> str:
        """``<type>-<index>``, the name of a non-chief worker's directory."""
        return f"{self.task_type}-{self.index}"


def worker_role(distribution: str, environ: Mapping[str, str] = os.environ) -> Role | None:
    """This process's role when training uses several workers, else ``None``.

    Several workers: ``TF_CONFIG`` is set and ``distribution`` is ``auto`` or ``multiworker``
    (the rule of ``runtime.make_strategy``).

    Raises:
        ValueError: ``TF_CONFIG`` is not JSON, or names a task type other than chief/worker.
    """
    raw = environ.get("TF_CONFIG")
    if not raw or distribution not in (AUTO, "multiworker"):
        return None
    try:
        spec = json.loads(raw)
        task, cluster = spec.get("task", {}), spec.get("cluster", {})
    except (ValueError, AttributeError):
        raise ValueError(f"TF_CONFIG must be a JSON object with cluster and task; got {raw!r}")
    task_type, index = task.get("type"), int(task.get("index", 0))
    if task_type not in ("chief", "worker"):
        raise ValueError(
            f"TF_CONFIG task type must be 'chief' or 'worker' for MultiWorkerMirroredStrategy; "
            f"got {task_type!r}"
        )
    chief = task_type == "chief" or ("chief" not in cluster and index == 0)
    return Role(task_type, index, chief)


def claim_worker_dir(output: str | Path, name: str, role: Role) -> tuple[Path, RunLock]:
    """Lock and empty the worker directory of a non-chief ``role`` (see the module docstring).

    A worker killed earlier left its directory behind; nothing in it is read again, so it is
    emptied. The lock makes a second process with the same role and run name fail at once
    (``rundir.RunDirBusy``) instead of sharing it.
    """
    path = Path(output) / WORKERS_DIR / name / role.name
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(path)
    for child in path.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return path, lock


def remove_worker_dir(path: Path, lock: RunLock) -> None:
    """Release and delete a worker directory, and its parents when they are left empty."""
    lock.release()
    shutil.rmtree(path, ignore_errors=True)
    for parent in (path.parent, path.parent.parent):
        try:
            parent.rmdir()
        except OSError:  # another worker's directory is still there
            break


def is_multiworker(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` spans workers (collectives are needed to agree on anything)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _words_from_chief(strategy: tf.distribute.Strategy, words: np.ndarray) -> np.ndarray:
    """The chief's int64 vector on every worker: an all-reduce SUM to which only replica 0
    contributes (replica 0 is the chief's first device: the chief is task 0 of the group)."""

    def value(ctx: tf.distribute.experimental.ValueContext) -> tf.Tensor:
        return tf.constant(words) if ctx.replica_id_in_sync_group == 0 else tf.zeros_like(words)

    per_replica = strategy.experimental_distribute_values_from_function(value)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def bytes_from_chief(strategy: tf.distribute.Strategy, data: bytes) -> bytes:
    """The chief's ``data`` on every worker (each worker passes its own; only the chief's count).

    Every worker must call this at the same point of the run (it is a collective). Without
    several workers ``data`` is returned as is.
    """
    if not is_multiworker(strategy):
        return data
    size = int(_words_from_chief(strategy, np.array([len(data)], np.int64))[0])
    if size == 0:
        return b""
    padded = data[:size].ljust(-(-size // 8) * 8, b"\0")  # the chief's length, in whole words
    return _words_from_chief(strategy, np.frombuffer(padded, "<i8")).tobytes()[:size]


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Wait until every worker gets here (a collective; nothing happens with one worker)."""
    bytes_from_chief(strategy, b"")


def mirror_from_chief(
    strategy: tf.distribute.Strategy, folder: Path, names: Iterable[str] = CHIEF_STATE
) -> None:
    """Make the files ``names`` of a non-chief worker's ``folder`` copies of the chief's (a file
    the chief lacks is deleted). A collective, see ``bytes_from_chief``."""
    if not is_multiworker(strategy):
        return
    for name in names:
        path = folder / name
        data = bytes_from_chief(strategy, b"\1" + path.read_bytes() if path.is_file() else b"")
        if strategy.extended.should_checkpoint:  # the chief: its files are the originals
            continue
        if data:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data[1:])
        else:
            path.unlink(missing_ok=True)


def variables_from_chief(strategy: tf.distribute.Strategy, variables: list) -> None:
    """Assign the chief's values to ``variables`` on every worker, bit for bit (a collective).

    Used after the chief restored a backup that non-chief workers do not have.
    """
    if not is_multiworker(strategy):
        return
    arrays = [np.asarray(v.numpy()) for v in variables]
    data = bytes_from_chief(strategy, b"".join(a.tobytes() for a in arrays))
    offset = 0
    for variable, array in zip(variables, arrays):
        variable.assign(np.frombuffer(data, array.dtype, array.size, offset).reshape(array.shape))
        offset += array.nbytes


class SyncStatistics(keras.callbacks.Callback):
    """Average the non-trainable float variables (BatchNorm moving statistics) over all replicas
    before each validation and at each epoch end, so every worker validates and saves the same
    weights.

    Keras 3 creates BatchNorm's moving mean and variance without a cross-replica aggregation:
    each replica updates its own copy from its own batches, and the copies of two workers drift
    apart (Keras 2 averaged them when they were read). The average uses every replica's batches.
    Nothing happens with a single worker.
    """

    def __init__(self):
        super().__init__()
        self._mean = None

    def on_test_begin(self, logs=None):
        self._average()

    def on_epoch_end(self, epoch, logs=None):
        self._average()

    def _average(self) -> None:
        strategy = self.model.distribute_strategy
        variables = [v for v in self.model.non_trainable_variables if v.dtype == "float32"]
        if not is_multiworker(strategy) or not variables:
            return
        if self._mean is None:  # one traced function: eager collectives are slow

            def replica_mean() -> tf.Tensor:
                flat = tf.concat([tf.reshape(v.value, [-1]) for v in variables], 0)
                context = tf.distribute.get_replica_context()
                return context.all_reduce(tf.distribute.ReduceOp.MEAN, flat)

            self._mean = tf.function(lambda: strategy.run(replica_mean))
        values = strategy.experimental_local_results(self._mean())[0].numpy()
        offset = 0
        for v in variables:
            size = int(np.prod(v.shape))
            v.assign(values[offset : offset + size].reshape(v.shape))
            offset += size


def weights_digest(model: keras.Model) -> str:
    """SHA-256 (first 16 hex digits) of every weight of ``model``, in order."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.asarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:16]


def check_in_sync(strategy: tf.distribute.Strategy, model: keras.Model, entry: str) -> str:
    """Log the weights digest of ``model``; with several workers, fail unless it is the chief's.

    Raises:
        RuntimeError: this worker's weights differ from the chief's.
    """
    digest = weights_digest(model)
    chief = bytes_from_chief(strategy, digest.encode()).decode()
    if chief != digest:
        raise RuntimeError(
            f"{entry}: this worker's weights (digest {digest}) differ from the chief's ({chief}); "
            "the workers did not train in step"
        )
    log.info(
        "%s: weights digest %s%s",
        entry,
        digest,
        " (the same on every worker)" if is_multiworker(strategy) else "",
    )
    return digest


def patch_keras() -> None:
    """Fix Keras 3's TensorFlow trainer for several workers (keras-team/keras#20585); idempotent.

    - ``_maybe_symbolic_build`` builds the model from a first batch that it averages over the
      replicas with ``strategy.reduce`` on the whole ``(x, y)`` tuple, which fails with several
      workers ("Attempt to convert a value (PerReplica...)"); only the shapes matter, so the
      first local replica's batch is used.
    - ``reduce_per_replica`` averages each step's metrics with ``strategy.reduce(MEAN, v,
      axis=0)``, which fails on scalar metrics ("Invalid reduction dimension 0"); ``axis=None``
      averages over the replicas, as with a single worker.
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_lungtf_multiworker", False):
        return
    build, reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica

    def local(strategy, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and is_multiworker(strategy):
            for _, _, it in iterator:
                data_batch = tree.map_structure(lambda v: local(strategy, v), next(it))
                break
            iterator = None
        return build(self, iterator=iterator, data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multiworker(strategy):
            return tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None)
                if isinstance(v, tf.distribute.DistributedValues)
                else v,
                values,
            )
        return reduce(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    trainer._lungtf_multiworker = True


def chief_config(strategy: tf.distribute.Strategy, cfg: RunConfig) -> RunConfig:
    """The chief's run configuration on every worker (a collective, see ``bytes_from_chief``).

    A non-chief worker whose own configuration differs (other flags, or ``--resume`` of a run
    directory its machine cannot see) trains with the chief's and says so at WARNING level.
    """
    text = bytes_from_chief(strategy, yaml.safe_dump(to_dict(cfg)).encode())
    chief = from_dict(RunConfig, yaml.safe_load(text))
    mine, theirs = _flat(to_dict(cfg)), _flat(to_dict(chief))
    differs = sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))
    if differs:
        log.warning(
            "this worker's configuration differs from the chief's in %s; training with the "
            "chief's",
            ", ".join(differs),
        )
    return chief


def _flat(values: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` as ``{"train.lr": 1}``."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
