"""Training callbacks: resumable history, phase-aware backup, best checkpoint, throughput, curves.

A run killed at any moment (SIGKILL included) and started again continues where it stopped:
``BackupAndRestore`` keeps one backup per phase, the CSV history drops the rows of epochs that
will be trained again, and the best checkpoint remembers the best value reached before the kill.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import keras

MONITOR = "val_accuracy"
"""The validation metric that picks the best checkpoint and drives early stopping."""


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """``CSVLogger`` (append mode) whose file holds each epoch once, even across restarts.

    An epoch finished but not yet backed up when the process died is trained again after the
    restart; its old row is dropped when the first epoch of the new ``fit`` begins.
    """

    def __init__(self, filename: str | Path):
        super().__init__(str(filename), append=True)
        self._truncated = False

    def on_train_begin(self, logs=None):
        self._truncated = False
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._truncated:
            self._truncated = True
            rows = read_history(self.filename)
            kept = [r for r in rows if int(r["epoch"]) < epoch]
            if len(kept) != len(rows):
                self.csv_file.close()
                write_rows(self.filename, kept, list(rows[0]))
                self.csv_file = open(self.filename, "a", newline="")  # noqa: SIM115


class PhaseBackup(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` for one phase of a multi-phase run.

    The backup is kept after the phase ends (``delete_checkpoint=False``), so a restarted run can
    restore the weights a finished phase ended with by replaying a zero-epoch ``fit``. Keras keeps
    the restored epoch on the model (``_initial_epoch``) for every later ``fit``; it is cleared at
    the end of this phase so the next phase starts at its own first epoch.
    """

    def __init__(self, backup_dir: str | Path):
        super().__init__(str(backup_dir), delete_checkpoint=False)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self.model._initial_epoch = None


class InnerCheckpoint(keras.callbacks.ModelCheckpoint):
    """Best ``val_accuracy`` checkpoint of ``inner`` (the deployable model), resumable.

    ``inner`` differs from the model being fitted when augmentation runs inside the training
    step. The bar to beat starts at the best value already in the history (read when the first
    epoch begins, after the history dropped the epochs about to be trained again), so a restart
    never overwrites a better checkpoint.
    """

    def __init__(self, inner: keras.Model, filepath: str | Path, history_csv: str | Path):
        super().__init__(str(filepath), monitor=MONITOR, mode="max", save_best_only=True)
        self._inner, self._history_csv, self._primed = inner, history_csv, False

    def set_model(self, model):
        super().set_model(self._inner)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._primed:
            self._primed = True
            self.best = best_so_far(self._history_csv)
        super().on_epoch_begin(epoch, logs)


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
    """Rows of a history CSV (empty when the file does not exist yet)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: str | Path, rows: list[dict[str, str]], fieldnames: list[str]) -> None:
    """Write ``rows`` as a CSV with a header."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


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
) -> list[keras.callbacks.Callback]:
    """The callbacks of one phase of one backbone, in the order that keeps resume exact.

    The history row is written before the backup, so a kill between the two repeats the epoch
    (its row is then replaced) instead of losing its row.
    """
    callbacks = [
        ResumableCSVLogger(out_dir / "history.csv"),
        PhaseBackup(out_dir / "backup" / phase),
        InnerCheckpoint(model, out_dir / "best.keras", out_dir / "history.csv"),
        keras.callbacks.TensorBoard(
            str(out_dir / "tensorboard" / phase), write_graph=False, profile_batch=0
        ),
        Throughput(images_per_epoch),
    ]
    if patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=patience)
        )
    return callbacks


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
    fig.savefig(png, dpi=100)
    plt.close(fig)
