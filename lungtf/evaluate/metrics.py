"""Classification metrics, the cancer-versus-benign view, group bootstrap intervals and McNemar.

Everything here works on plain numpy arrays of class ids (order of ``lungtf.constants.CLASS_NAMES``)
and probabilities, so it can be checked against small hand-computed cases. Metrics come from
scikit-learn where it has them; the group bootstrap and McNemar's test are written here because
scikit-learn has neither (statsmodels is not a dependency).
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from lungtf.constants import CANCER_CLASSES, CLASS_NAMES

CANCER_IDS = np.array(sorted(CLASS_NAMES.index(c) for c in CANCER_CLASSES))
"""Output indices of the cancer classes."""

MCNEMAR_EXACT_BELOW = 25
"""Use the exact binomial test when there are fewer discordant pairs than this."""


def _as_ids(y: np.ndarray | list[int], name: str, n_classes: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} must hold class ids in 0..{n_classes - 1}; got {sorted(set(y.tolist()))}")
    return y


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> tuple[float | None, dict, str]:
    """Macro one-vs-rest ROC-AUC over the classes that can be scored.

    ``sklearn.metrics.roc_auc_score(multi_class="ovr")`` refuses a ``y_true`` that lacks a class,
    which a small test split can; here each class is scored one-vs-rest on its own and the macro
    mean is taken over the classes present, with a note naming any class that was left out.

    Returns:
        ``(macro_auc or None, {class_name: auc or None}, note)``; ``note`` is ``""`` when every
        class was scored.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = _as_ids(y_true, "y_true", probs.shape[1])
    per_class: dict[str, float | None] = {}
    skipped = []
    for k, name in enumerate(CLASS_NAMES[: probs.shape[1]]):
        positives = y_true == k
        if positives.all() or not positives.any():
            per_class[name] = None
            skipped.append(name)
        else:
            per_class[name] = float(roc_auc_score(positives, probs[:, k]))
    scored = [v for v in per_class.values() if v is not None]
    macro = float(np.mean(scored)) if scored else None
    note = ""
    if skipped:
        note = (
            f"ROC-AUC not defined for {', '.join(skipped)} (only one of class/rest present in "
            f"y_true); macro mean over {len(scored)} of {len(per_class)} classes"
        )
    return macro, per_class, note


def cancer_view(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Collapse the three classes to cancer (``CANCER_CLASSES``) versus benign.

    Returns:
        ``sensitivity`` (cancer tiles called any cancer class), ``specificity`` (benign tiles
        called benign), ``missed_cancers`` (cancer predicted benign), ``benign_called_cancer``,
        ``n_cancer``, ``n_benign``. A rate whose denominator is zero is ``None``.
    """
    true_cancer = np.isin(np.asarray(y_true), CANCER_IDS)
    pred_cancer = np.isin(np.asarray(y_pred), CANCER_IDS)
    n_cancer = int(true_cancer.sum())
    n_benign = int((~true_cancer).sum())
    missed = int((true_cancer & ~pred_cancer).sum())
    false_alarms = int((~true_cancer & pred_cancer).sum())
    return {
        "sensitivity": (n_cancer - missed) / n_cancer if n_cancer else None,
        "specificity": (n_benign - false_alarms) / n_benign if n_benign else None,
        "missed_cancers": missed,
        "benign_called_cancer": false_alarms,
        "n_cancer": n_cancer,
        "n_benign": n_benign,
    }


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy, per-class precision/recall/F1, macro ROC-AUC, confusion matrix, cancer view.

    ``labels=range(n_classes)`` is passed to scikit-learn so a class that is never predicted (or
    absent) still has its row, with 0 where a rate is undefined (``zero_division=0``).

    Args:
        y_true: true class ids ``[N]``.
        probs: predicted probabilities ``[N, n_classes]``; the prediction is their argmax.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(y_true):
        raise ValueError(
            f"probs must be [N, classes] with N = len(y_true) = {len(y_true)}; got {probs.shape}"
        )
    n_classes = probs.shape[1]
    y_true = _as_ids(y_true, "y_true", n_classes)
    y_pred = probs.argmax(axis=1)
    labels = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    macro_auc, auc_per_class, auc_note = roc_auc_ovr(y_true, probs)
    names = CLASS_NAMES[:n_classes]
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
                "roc_auc": auc_per_class[name],
            }
            for k, name in enumerate(names)
        },
        "macro_f1": float(np.mean(f1)),
        "roc_auc_macro_ovr": macro_auc,
        "roc_auc_note": auc_note,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "cancer_vs_benign": cancer_view(y_true, y_pred),
    }


def group_bootstrap(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: list[str] | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 42,
    level: float = 0.95,
) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals for accuracy, sensitivity and specificity over groups.

    The tiles of one source tile (a group) are rotated/flipped copies and not independent, so
    whole groups are drawn with replacement and all their tiles move together (a cluster
    bootstrap); resampling tiles would give intervals that are far too narrow.

    Returns:
        ``{"accuracy": (low, high), "sensitivity": ..., "specificity": ...}``; an interval is
        ``None`` when no resample had a non-zero denominator.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if not (len(y_true) == len(y_pred) == len(groups)):
        raise ValueError(
            f"y_true, y_pred and groups must have one entry per tile; "
            f"got {len(y_true)}, {len(y_pred)}, {len(groups)}"
        )
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    _, group_ids = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    true_cancer = np.isin(y_true, CANCER_IDS)
    pred_cancer = np.isin(y_pred, CANCER_IDS)
    # Per-group counts: correct, tiles, cancers found, cancers, benign kept, benign.
    columns = np.stack(
        [
            y_true == y_pred,
            np.ones_like(true_cancer),
            true_cancer & pred_cancer,
            true_cancer,
            ~true_cancer & ~pred_cancer,
            ~true_cancer,
        ],
        axis=1,
    ).astype(np.int64)
    counts = np.zeros((group_ids.max() + 1, columns.shape[1]), np.int64)
    np.add.at(counts, group_ids, columns)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(counts), size=(n_resamples, len(counts)))
    sums = counts[draws].sum(axis=1).astype(np.float64)
    tail = 100 * (1 - level) / 2
    out: dict[str, tuple[float, float] | None] = {}
    for name, num, den in (("accuracy", 0, 1), ("sensitivity", 2, 3), ("specificity", 4, 5)):
        ok = sums[:, den] > 0
        values = sums[ok, num] / sums[ok, den]
        out[name] = (
            (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
            if values.size
            else None
        )
    return out


def mcnemar(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict:
    """McNemar's test of two models' accuracy on the same tiles.

    Only the discordant pairs count: ``b`` tiles model A gets right and B wrong, ``c`` the other
    way round. With fewer than ``MCNEMAR_EXACT_BELOW`` discordant pairs the exact two-sided
    binomial test (``b ~ Binomial(b + c, 1/2)``) is used, otherwise the chi-square statistic with
    continuity correction ``(|b - c| - 1)^2 / (b + c)`` on one degree of freedom.

    Returns:
        ``{"b", "c", "both_right", "both_wrong", "method", "statistic", "p_value"}``.
    """
    y_true, pred_a, pred_b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not (len(y_true) == len(pred_a) == len(pred_b)):
        raise ValueError(
            f"McNemar needs both models' predictions on the same tiles; "
            f"got {len(y_true)} labels, {len(pred_a)} and {len(pred_b)} predictions"
        )
    right_a, right_b = pred_a == y_true, pred_b == y_true
    b = int((right_a & ~right_b).sum())
    c = int((~right_a & right_b).sum())
    if b + c == 0:
        method, statistic, p_value = "no discordant pairs", 0.0, 1.0
    elif b + c < MCNEMAR_EXACT_BELOW:
        method = "exact binomial"
        statistic = float(min(b, c))
        p_value = float(stats.binomtest(b, b + c, 0.5).pvalue)
    else:
        method = "chi-square with continuity correction"
        statistic = (abs(b - c) - 1) ** 2 / (b + c)
        p_value = float(stats.chi2.sf(statistic, df=1))
    return {
        "b": b,
        "c": c,
        "both_right": int((right_a & right_b).sum()),
        "both_wrong": int((~right_a & ~right_b).sum()),
        "method": method,
        "statistic": float(statistic),
        "p_value": min(1.0, p_value),
    }
