"""Training callbacks: resumable history, phase-aware backup, best checkpoint, throughput, curves.

A run killed at any moment (SIGKILL included) and started again continues where it stopped:
``BackupAndRestore`` keeps one backup per phase, the CSV history drops the rows of epochs that
will be trained again, and the best checkpoint remembers the best value reached before the kill.
Every file is written to a temporary file and renamed over the old one
(``lungtf.train.rundir.atomic_path``): a kill in the middle of a write leaves the previous
``best.keras``, backup or history, never a truncated one.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import keras

from lungtf.train.multiworker import SyncStatistics, bytes_from_chief, variables_from_chief
from lungtf.train.rundir import atomic_path, write_csv, write_text

log = logging.getLogger("lungtf.train")

MONITOR = "val_accuracy"
"""The validation metric that picks the best checkpoint and drives early stopping."""


class ResumableCSVLogger(keras.callbacks.Callback):
    """One history row per epoch (``epoch`` then the sorted log keys, as Keras's ``CSVLogger``)
    in a CSV that holds each epoch once, even across restarts, and is rewritten atomically.

    An epoch finished but not yet backed up when the process died is trained again after the
    restart; its old row is dropped when the first epoch of the new ``fit`` begins.
    """

    def __init__(self, filename: str | Path):
        super().__init__()
        self.filename = Path(filename)
        self._rows: list[dict[str, str]] | None = None

    def on_train_begin(self, logs=None):
        self._rows = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._rows is None:
            rows = read_history(self.filename)
            self._rows = [r for r in rows if int(r["epoch"]) < epoch]
            if len(self._rows) != len(rows):
                write_rows(self.filename, self._rows, list(rows[0]))

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": str(epoch), **{k: str(v) for k, v in sorted((logs or {}).items())}}
        rows = [*(self._rows or []), row]
        fields = list(rows[0]) + [k for k in row if k not in rows[0]]
        write_rows(self.filename, rows, fields)
        self._rows = rows


class PhaseBackup(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` for one phase of a multi-phase run, written atomically.

    The backup is kept after the phase ends (``delete_checkpoint=False``), so a restarted run can
    restore the weights a finished phase ended with by replaying a zero-epoch ``fit``. Keras keeps
    the restored epoch on the model (``_initial_epoch``) for every later ``fit``; it is cleared at
    the end of this phase so the next phase starts at its own first epoch.

    Each backup writes the weights to a new file named after its epoch, then replaces
    ``training_metadata.json`` (which names that file), then deletes older weights: whenever
    the process dies, the metadata names a complete weights file of the same epoch.

    With several workers every worker writes its backups (in its own directory) but only the
    chief's are read: on restore the chief's epoch is taken and its restored weights and
    optimizer state are copied to every worker (``lungtf.train.multiworker``), so the workers
    continue in step whichever of them died.
    """

    def __init__(self, backup_dir: str | Path):
        super().__init__(str(backup_dir), delete_checkpoint=False)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self.model._initial_epoch = None

    def _save_model(self):
        folder = Path(self.backup_dir)
        name = f"epoch-{self._current_epoch}-{self._last_batch_seen}.weights.h5"
        with atomic_path(folder / name) as tmp:
            self.model.save_weights(tmp, overwrite=True)
        state = {"epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name}
        write_text(self._training_metadata_path, json.dumps(state))
        for old in folder.glob("*.weights.h5"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def _load_model(self):
        metadata = Path(self._training_metadata_path)
        state = json.loads(metadata.read_text()) if metadata.is_file() else {}
        weights = Path(self.backup_dir) / state.get("weights", "latest.weights.h5")  # or Keras's
        strategy = self.model.distribute_strategy
        chief = json.dumps([weights.is_file(), state.get("epoch")]).encode()
        restore, epoch = json.loads(bytes_from_chief(strategy, chief))  # the chief's backup rules
        if restore:
            optimizer = self.model.optimizer
            if optimizer is not None and not optimizer.built:
                optimizer.build(self.model.trainable_variables)
            if strategy.extended.should_checkpoint:
                self.model.load_weights(weights)
            variables_from_chief(
                strategy, self.model.variables + (optimizer.variables if optimizer else [])
            )
        if epoch is not None:
            self.model._initial_epoch = epoch
            log.info("%s: backup restored, %d epoch(s) done", self.backup_dir, epoch)


class InnerCheckpoint(keras.callbacks.ModelCheckpoint):
    """Best ``val_accuracy`` checkpoint of ``inner`` (the deployable model), resumable, atomic.

    ``inner`` differs from the model being fitted when augmentation runs inside the training
    step. The bar to beat starts at the best value already in the history (read when the first
    epoch begins, after the history dropped the epochs about to be trained again) when the
    checkpoint exists, so a restart never overwrites a better checkpoint; with several workers,
    at the chief's bar. The file is saved beside the old one and renamed over
    it, so a kill during the save leaves the previous best.
    """

    def __init__(self, inner: keras.Model, filepath: str | Path, history_csv: str | Path):
        super().__init__(str(filepath), monitor=MONITOR, mode="max", save_best_only=True)
        self._inner, self._history_csv, self._primed = inner, history_csv, False

    def set_model(self, model):
        super().set_model(self._inner)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._primed:  # no checkpoint yet: the first epoch of this run must write one
            self._primed = True
            best = best_so_far(self._history_csv) if Path(self.filepath).is_file() else None
            chief = bytes_from_chief(self.model.distribute_strategy, json.dumps(best).encode())
            self.best = json.loads(chief)  # workers save when the chief does
        super().on_epoch_begin(epoch, logs)

    def _save_model(self, epoch, batch, logs):
        if self._should_save_model(epoch, batch, logs, self.filepath):  # also updates self.best
            with atomic_path(self.filepath) as tmp:
                self.model.save(tmp, overwrite=True)


class SwapEMA(keras.callbacks.SwapEMAWeights):
    """Keras's ``SwapEMAWeights(swap_on_epoch=True)``: validation and every callback after it at
    an epoch's end see the optimizer's averaged (EMA) weights; the raw ones train on.

    Keras leaves the averages in the model only when the last planned epoch ends; when training
    stops early (``EarlyStopping``, which must come before this callback), ``fit`` would put
    the raw weights back, so the averages are kept here too.
    """

    def __init__(self):
        super().__init__(swap_on_epoch=True)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.model.stop_training and epoch != self.params["epochs"] - 1:
            self._finalize_ema_values()


class Throughput(keras.callbacks.Callback):
    """Training images per second, excluding validation and the first (compiling) epoch."""

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.epoch_seconds: list[float] = []
        self._start: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        if self._start is not None:
            self.epoch_seconds.append(time.perf_counter() - self._start)
            self._start = None

    def images_per_second(self) -> float | None:
        """Mean over the timed epochs; ``None`` when no epoch was timed."""
        timed = self.epoch_seconds[1:] or self.epoch_seconds
        return self.images_per_epoch * len(timed) / sum(timed) if timed else None


def read_history(path: str | Path) -> list[dict[str, str]]:
    """Rows of a history CSV (empty when the file does not exist yet); a row cut short (a
    history written before writes were atomic and killed mid-row) is left out."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if None not in r.values() and None not in r]


def write_rows(path: str | Path, rows: list[dict[str, str]], fieldnames: list[str]) -> None:
    """Write ``rows`` as a CSV with a header, atomically."""
    write_csv(path, fieldnames, rows)


def best_so_far(history_csv: str | Path) -> float | None:
    """The best ``val_accuracy`` already in the history, so a restart does not lower the bar."""
    values = [float(r[MONITOR]) for r in read_history(history_csv) if r.get(MONITOR)]
    return max(values) if values else None


def make_callbacks(
    out_dir: Path,
    phase: str,
    model: keras.Model,
    images_per_epoch: int,
    patience: int,
    ema: bool = False,
) -> list[keras.callbacks.Callback]:
    """The callbacks of one phase of one backbone, in the order that keeps resume exact.

    The history row is written before the backup, so a kill between the two repeats the epoch
    (its row is then replaced) instead of losing its row. With ``ema`` (an optimizer with
    ``use_ema``), ``SwapEMA`` comes after the backup, which must hold the raw weights and the
    optimizer's averages as they are to resume, and before the best checkpoint, which saves the
    averaged weights; early stopping comes before it, so it can keep the averages. With several
    workers the BatchNorm statistics are averaged first (``multiworker.SyncStatistics``), so
    every file holds the weights all workers share.
    """
    stopping = []
    if patience:
        stopping.append(
            keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=patience)
        )
    callbacks = [
        SyncStatistics(),
        ResumableCSVLogger(out_dir / "history.csv"),
        PhaseBackup(out_dir / "backup" / phase),
        *(stopping + [SwapEMA()] if ema else []),
        InnerCheckpoint(model, out_dir / "best.keras", out_dir / "history.csv"),
        keras.callbacks.TensorBoard(
            str(out_dir / "tensorboard" / phase), write_graph=False, profile_batch=0
        ),
        Throughput(images_per_epoch),
    ]
    return callbacks if ema else callbacks + stopping


def plot_curves(history_csv: str | Path, png: str | Path, title: str) -> None:
    """Loss and accuracy per epoch (train and validation) from a history CSV, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_history(history_csv)
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = [float(r[key]) for r in rows if r.get(key)]
            if values:
                ax.plot(epochs[: len(values)], values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
