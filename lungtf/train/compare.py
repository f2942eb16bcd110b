"""Compare trained backbones, pick the best by a documented rule and package it.

Rule: the highest validation accuracy wins; ties go to the fewest missed cancers (cancer tiles,
``lungtf.constants.CANCER_CLASSES``, predicted benign), then to the fewest parameters. The test
split is looked at once, for the chosen model only, so it stays an unbiased estimate.

Uncertainty threshold: the smallest top-class probability ``t`` such that the validation
predictions with top probability >= ``t`` are at least ``TARGET_CONFIDENT_ACCURACY`` accurate;
predictions below ``t`` are meant to be flagged "uncertain, refer to a pathologist".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import lungtf
from lungtf.constants import CLASS_NAMES
from lungtf.data.pipeline import make_dataset
from lungtf.evaluate.metrics import cancer_view
from lungtf.export import export_model
from lungtf.train.rundir import atomic_path, write_csv, write_text

log = logging.getLogger("lungtf.train")

TARGET_CONFIDENT_ACCURACY = 0.99
"""Accuracy the confident validation predictions must reach (uncertainty threshold rule)."""

COLUMNS = (
    "backbone",
    "variant",
    "weights",
    "val_accuracy",
    "val_loss",
    "missed_cancers",
    "benign_called_cancer",
    "val_n",
    "params",
    "epochs",
    "lr",
    "wall_time_s",
    "train_img_per_s",
)
"""Columns of ``comparison.csv``, in order."""


def predict_records(model: keras.Model, records: list, image_size: int, batch_size: int):
    """``(probabilities [N,3], labels [N])`` of ``model`` on ``records`` (no augmentation)."""
    probs, labels = [], []
    for x, y in make_dataset(records, image_size, batch_size, training=False):
        probs.append(model.predict_on_batch(x))  # one pass: each tile is decoded once
        labels.append(y.numpy())
    return np.concatenate(probs).astype(np.float64), np.concatenate(labels)


def summarize(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, cross-entropy loss, missed cancers, benign called cancer and ``n``."""
    pred = probs.argmax(axis=1)
    view = cancer_view(labels, pred)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return {
        "accuracy": float((pred == labels).mean()),
        "loss": float(-np.log(picked).mean()),
        "missed_cancers": view["missed_cancers"],
        "benign_called_cancer": view["benign_called_cancer"],
        "n": len(labels),
    }


def evaluate_records(model: keras.Model, records: list, image_size: int, batch_size: int) -> dict:
    """``summarize`` of ``model`` on ``records``."""
    return summarize(*predict_records(model, records, image_size, batch_size))


def uncertainty_threshold(
    probs: np.ndarray, labels: np.ndarray, target: float = TARGET_CONFIDENT_ACCURACY
) -> float:
    """Smallest top probability at which the predictions at or above it reach ``target`` accuracy.

    Returns 1.0 (everything flagged uncertain) when no threshold reaches ``target``.
    """
    top = probs.max(axis=1)
    order = np.argsort(-top)
    correct = (probs.argmax(axis=1) == labels)[order]
    accuracy_above = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    ok = np.nonzero(accuracy_above >= target)[0]
    if len(ok) == 0:
        return 1.0
    # The largest prefix (most predictions kept) whose accuracy reaches the target.
    return float(top[order][ok[-1]])


def pick_best(results: list[dict]) -> dict:
    """The best result: highest ``val_accuracy``, then fewest ``missed_cancers``, ``params``."""
    return max(results, key=lambda r: (r["val_accuracy"], -r["missed_cancers"], -r["params"]))


def write_comparison(results: list[dict], run_dir: Path, protocol: str, best: dict) -> None:
    """``comparison.csv`` (a row a backbone) and ``comparison.md`` (table, split protocol, rule).

    ``comparison.md`` also lists every backbone that could not start from the requested weights
    (``weights_note`` of its result, e.g. ``regnet`` asked for ImageNet weights it has not got),
    and every backbone pretrained in the run (``pretrained``: epochs, final loss and z_std).
    """
    write_csv(run_dir / "comparison.csv", list(COLUMNS), results)
    lines = [
        "# Backbone comparison",
        "",
        f"Split protocol: **{protocol}**"
        + (
            " (leak-free: no source tile in two splits)."
            if protocol == "grouped"
            else " (LEAKY: rotated/flipped copies of one tile can sit in train and validation; "
            "accuracies are inflated)."
        ),
        (
            "Metrics on the validation split; missed cancers = cancer tiles (lung_aca, lung_scc) "
            "predicted benign (lung_n)."
        ),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    for r in results:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    notes = [r for r in results if r.get("weights_note")]
    if notes:
        lines += ["", "**Weights not as requested:**", ""]
        lines += [f"- {r.get('entry', r['backbone'])}: {r['weights_note']}." for r in notes]
    pretrained = [r for r in results if r.get("pretrained")]
    if pretrained:
        heading = (
            "**Pretrained with SimSiam on the run's training split only (validation and test not "
            "read), then fine-tuned as transfer backbones (head phase with the backbone frozen, "
            "then all layers):**"
        )
        lines += ["", heading, ""]
        lines += [f"- {r.get('entry', r['backbone'])}: {p['epochs']} epochs on {p['tiles']} "
                  f"tiles, final loss {p['loss']:.4f}, z_std {p['z_std']:.4f}, "
                  f"{p['cpu_seconds']:.0f} CPU-s (`{p['weights']}`)."
                  for r in pretrained for p in [r["pretrained"]]]
    lines += [
        "",
        "Best: **{}** ({}). Rule: highest validation accuracy; ties go to the fewest missed "
        "cancers, then the fewest parameters.".format(best["backbone"], best["variant"]),
        "",
    ]
    write_text(run_dir / "comparison.md", "\n".join(lines))  # last: it marks the run finished


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:.4g}" if value < 1e4 else f"{value:.0f}"
    return "" if value is None else str(value)


def finalize_best(
    run_dir: Path,
    best_checkpoint_dir: Path,
    best: dict,
    splits: dict[str, list],
    image_size: int,
    batch_size: int,
    protocol: str,
) -> Path:
    """Copy the best checkpoint to ``best/model.keras`` with ``best/lungtf.json``; export it.

    ``lungtf.json`` holds the metadata of docs/architecture.md: validation and test metrics, the
    uncertainty threshold chosen on the validation split, temperature 1.0 (uncalibrated) and
    versions. The model is then exported (``lungtf.export``) to ``best/saved_model/<version>/``.

    Args:
        run_dir: the run directory (``best/`` is made in it).
        best_checkpoint_dir: the chosen backbone's folder holding ``best.keras``.
        best: the chosen backbone's result row.
        splits: the run's ``train``/``val``/``test`` records.
        image_size: input side in pixels.
        batch_size: batch size for predictions.
        protocol: the split protocol (``grouped`` or ``random (leaky)``).

    Returns:
        The ``best`` folder.
    """
    best_dir = run_dir / "best"
    best_dir.mkdir(exist_ok=True)
    model = keras.models.load_model(best_checkpoint_dir / "best.keras", compile=False)
    with atomic_path(best_dir / "model.keras") as tmp:
        model.save(tmp)  # uncompiled: loads without training-only objects
    val_probs, val_labels = predict_records(model, splits["val"], image_size, batch_size)
    test = (
        evaluate_records(model, splits["test"], image_size, batch_size) if splits["test"] else None
    )
    meta = {
        "backbone": best["backbone"],
        "variant": best["variant"],
        "image_size": image_size,
        "class_names": list(CLASS_NAMES),
        "split_protocol": protocol,
        "val_metrics": summarize(val_probs, val_labels),
        "test_metrics": test,
        "temperature": 1.0,
        "uncertainty_threshold": uncertainty_threshold(val_probs, val_labels),
        "uncertainty_rule": f"smallest top probability whose confident validation predictions "
        f"are >= {TARGET_CONFIDENT_ACCURACY:.0%} accurate",
        "versions": {
            "lungtf": lungtf.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }
    write_text(best_dir / "lungtf.json", json.dumps(meta, indent=2))
    if test is not None:
        log.info(
            "best %s: test accuracy %.4f, missed cancers %d of n=%d (%s split)",
            best["backbone"],
            test["accuracy"],
            test["missed_cancers"],
            test["n"],
            protocol,
        )
    version_dir = export_model(model, best_dir / "saved_model", meta)
    log.info("exported SavedModel: %s", version_dir)
    return best_dir
