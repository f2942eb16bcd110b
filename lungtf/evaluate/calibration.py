"""Expected calibration error, reliability bins and temperature scaling.

A model is calibrated when, of the tiles it calls with top probability 0.9, about 90% are right.
Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``T`` fitted on the
validation split; it changes no prediction, only how confident the probabilities are. The model
outputs probabilities, and ``softmax(log(p) / T)`` equals ``softmax(logits / T)`` because
``log(p)`` differs from the logits by a per-tile constant, so ``T`` can be fitted and applied on
probabilities alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize

N_BINS = 15
"""Equal-width bins of the top probability used for the ECE and the reliability diagram."""

_EPS = 1e-12


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of the top probability; empty bins have ``count == 0`` and NaN means.

    Attributes:
        edges: ``n_bins + 1`` bin edges on [0, 1]; bin ``i`` holds confidences in
            ``(edges[i], edges[i + 1]]`` (the first bin also holds 0).
        confidence: mean top probability per bin.
        accuracy: share of correct predictions per bin.
        count: tiles per bin.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> ReliabilityBins:
    """Bin the tiles by top probability and measure accuracy and mean confidence per bin."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(y_true) or len(y_true) == 0:
        raise ValueError(
            f"probs must be a non-empty [N, classes] array with N = len(y_true) = {len(y_true)}; "
            f"got {probs.shape}"
        )
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, conf, n_bins) / count
        accuracy = np.bincount(idx, correct, n_bins) / count
    return ReliabilityBins(np.linspace(0.0, 1.0, n_bins + 1), confidence, accuracy, count)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE: the tile-weighted mean of ``|accuracy - confidence|`` over equal-width bins."""
    bins = reliability_bins(probs, y_true, n_bins)
    used = bins.count > 0
    gaps = np.abs(bins.accuracy[used] - bins.confidence[used])
    return float(np.sum(gaps * bins.count[used]) / bins.count.sum())


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Return ``softmax(log(probs) / temperature)``; ``temperature == 1`` returns the input."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs
    z = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean negative log-likelihood (cross-entropy) of the true classes."""
    probs = np.asarray(probs, dtype=np.float64)
    picked = probs[np.arange(len(probs)), np.asarray(y_true, dtype=np.int64)]
    return float(-np.mean(np.log(np.clip(picked, _EPS, 1.0))))


def fit_temperature(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Fit the temperature that minimises the NLL of ``y_true`` (the validation split).

    The search runs over ``log T`` in [log 0.05, log 20] (bounded scalar minimisation), which
    keeps ``T`` positive and treats halving and doubling alike.
    """
    if len(y_true) == 0:
        raise ValueError("fit_temperature needs at least one labelled tile; got none")
    result = optimize.minimize_scalar(
        lambda log_t: nll(apply_temperature(probs, float(np.exp(log_t))), y_true),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))
