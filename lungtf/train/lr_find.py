"""Learning-rate finder: an exponential LR sweep, a smoothed loss-vs-LR plot and a suggestion.

Leslie Smith's range test as popularised by fastai: train one batch per step while the LR grows
exponentially from ``min_lr`` to ``max_lr``, stop when the loss diverges, and suggest the LR at
the steepest descent of the smoothed loss (before its minimum). The model's weights are restored
afterwards, so the sweep leaves no trace on the training that follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from lungtf.train.rundir import atomic_path


@dataclass(frozen=True)
class LRFindResult:
    """Outcome of a sweep.

    Attributes:
        lrs: learning rate of each step taken.
        losses: training loss of each step (one batch each).
        smoothed: bias-corrected exponential moving average of ``losses``.
        suggestion: the suggested peak learning rate.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float


class _Sweep(keras.callbacks.Callback):
    """Sets the LR before each one-batch "epoch" and records that batch's loss."""

    def __init__(self, lrs: np.ndarray, diverge: float):
        super().__init__()
        self.lrs, self.diverge = lrs, diverge
        self.losses: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate.assign(float(self.lrs[epoch]))

    def on_epoch_end(self, epoch, logs=None):
        loss = float(logs["loss"])
        self.losses.append(loss)
        if not math.isfinite(loss) or loss > self.diverge * min(self.losses):
            self.model.stop_training = True


def smooth(losses: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (as fastai's recorder)."""
    out, avg = np.empty(len(losses)), 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> float:
    """LR of the steepest descent of the smoothed loss up to its minimum (``min_lr / 10`` rule
    when fewer than three points precede the minimum)."""
    finite = np.isfinite(smoothed)
    lrs, smoothed = lrs[finite], smoothed[finite]
    lowest = int(np.argmin(smoothed))
    if lowest < 2:
        return float(lrs[lowest] / 10)
    slope = np.gradient(smoothed[: lowest + 1], np.log(lrs[: lowest + 1]))
    return float(lrs[int(np.argmin(slope))])


def lr_find(
    model: keras.Model,
    dataset: tf.data.Dataset,
    steps: int = 100,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    diverge: float = 4.0,
    png: str | Path | None = None,
) -> LRFindResult:
    """Sweep the LR of a compiled ``model`` over ``steps`` training batches of ``dataset``.

    Args:
        model: compiled with an optimizer whose ``learning_rate`` is a number (not a schedule).
        dataset: training batches; repeated as needed.
        steps: most steps of the sweep (it stops early when the loss exceeds ``diverge`` times
            its lowest value).
        min_lr: first learning rate.
        max_lr: last learning rate.
        diverge: divergence factor that ends the sweep.
        png: where to draw the smoothed loss against the LR (log scale), when given.

    Returns:
        The sweep and its suggested LR, clipped to ``[min_lr, max_lr]``.

    Raises:
        ValueError: when the LR range is empty.
        TypeError: when the optimizer's learning rate is a schedule.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr; got min_lr={min_lr}, max_lr={max_lr}")
    if not isinstance(model.optimizer.learning_rate, keras.Variable):
        raise TypeError(
            "lr_find needs an optimizer compiled with a numeric learning_rate; got "
            f"{model.optimizer.get_config()['learning_rate']}"
        )
    lrs = min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))
    weights = model.get_weights()
    start_lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    sweep = _Sweep(lrs, diverge)
    try:
        model.fit(
            dataset.repeat(), epochs=steps, steps_per_epoch=1, shuffle=False,  # tf.data shuffles
            callbacks=[sweep], verbose=0,
        )
    finally:
        model.set_weights(weights)
        model.optimizer.learning_rate.assign(start_lr)
    losses = np.array(sweep.losses)
    taken = lrs[: len(losses)]
    smoothed = smooth(losses)
    suggestion = float(np.clip(suggest(taken, smoothed), min_lr, max_lr))
    result = LRFindResult(taken, losses, smoothed, suggestion)
    if png is not None:
        plot(result, png)
    return result


def plot(result: LRFindResult, png: str | Path) -> None:
    """Smoothed loss against the LR (log axis) with the suggestion marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    ax.axvline(
        result.suggestion, color="red", linestyle="--", label=f"suggested {result.suggestion:.2e}"
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
