"""The evaluation's files: ``predictions.csv``, ``metrics.json`` and the readable ``report.md``.

``summarize`` turns labels, probabilities and groups into one metrics dictionary (the content of
``metrics.json``); ``write_report_md`` renders it for a person. Every report states the split
protocol, and a random (leaky) split's report says first, in bold, that its numbers are inflated.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from lungtf.constants import CLASS_NAMES, PROTOCOL_GROUPED, PROTOCOL_RANDOM
from lungtf.evaluate import calibration, metrics

LEAKY_WARNING = (
    "**WARNING: these numbers come from a random (leaky) split.** LC25000 tiles are ~20 "
    "rotated/flipped copies of each source tile, and a random split puts copies of the same "
    "source tile in train and test, so accuracy is inflated (the study's 0.999) and says little "
    "about unseen tissue. Use a grouped split (`python -m lungtf.data split`) for honest numbers."
)


def tile_losses(probs: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """Cross-entropy of each tile's true class, ``-log p[true]``."""
    picked = np.asarray(probs)[np.arange(len(y_true)), np.asarray(y_true, dtype=np.int64)]
    return np.abs(np.log(np.clip(picked, 1e-12, 1.0)))  # abs: no -0.0 for p = 1


def worst_per_group(losses: np.ndarray, groups: list[str], n: int) -> np.ndarray:
    """Indices of the worst tile of each of the ``n`` worst source-tile groups, worst first.

    LC25000 tiles are ~20 rotated/flipped copies of a source tile, so the ``n`` worst tiles are
    often copies of one source tile; one tile per group shows ``n`` different mistakes.
    """
    picked: list[int] = []
    seen: set[str] = set()
    for i in np.argsort(-np.asarray(losses), kind="stable"):
        if len(picked) == n:
            break
        if groups[i] not in seen:
            seen.add(groups[i])
            picked.append(int(i))
    return np.array(picked, dtype=np.int64)


def summarize(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: list[str],
    protocol: str,
    n_resamples: int = 1000,
    seed: int = 42,
) -> dict[str, Any]:
    """All metrics of one split as a JSON-ready dictionary.

    Args:
        y_true: true class ids.
        probs: probabilities ``[N, 3]`` as served (temperature applied).
        groups: the source-tile group of each tile, for the group bootstrap.
        protocol: the split protocol from the manifest (``lungtf.constants.SPLIT_PROTOCOLS``).
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.
    """
    y_true = np.asarray(y_true)
    out = metrics.classification_metrics(y_true, probs)
    out["split_protocol"] = protocol
    out["leaky"] = protocol != PROTOCOL_GROUPED
    out["loss"] = float(tile_losses(probs, y_true).mean())
    out["ece"] = calibration.expected_calibration_error(probs, y_true)
    intervals = metrics.group_bootstrap(
        y_true, np.asarray(probs).argmax(1), groups, n_resamples=n_resamples, seed=seed
    )
    out["bootstrap"] = {
        "unit": "group",
        "n_groups": len(set(groups)),
        "n_resamples": n_resamples,
        "level": 0.95,
        "seed": seed,
        **{k: list(v) if v else None for k, v in intervals.items()},
    }
    return out


def write_predictions_csv(
    path: str | Path, paths: list[str], groups: list[str], y_true: np.ndarray, probs: np.ndarray
) -> Path:
    """One row per tile: path, group, true and predicted label, the class probabilities, loss."""
    losses = tile_losses(probs, y_true)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "group", "label", "predicted", *CLASS_NAMES, "loss"])
        for p, g, t, row, loss in zip(paths, groups, y_true, probs, losses):
            writer.writerow(
                [p, g, CLASS_NAMES[t], CLASS_NAMES[int(np.argmax(row))],
                 *(f"{v:.8g}" for v in row), f"{loss:.8g}"]
            )
    return Path(path)


def write_metrics_json(path: str | Path, summary: dict[str, Any]) -> Path:
    """``metrics.json``: the summary dictionary, indented."""
    Path(path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _ci(pair: list[float] | None) -> str:
    return "n/a" if not pair else f"{_pct(pair[0])} – {_pct(pair[1])}"


def _protocol_lines(s: dict[str, Any]) -> list[str]:
    lines = [f"Split protocol: **{s['split_protocol']}**"]
    if s["split_protocol"] == PROTOCOL_RANDOM or s["leaky"]:
        lines += ["", "> " + LEAKY_WARNING]
    else:
        lines[0] += " (every source-tile group is in exactly one split: leak-free)."
    return lines


def write_report_md(path: str | Path, s: dict[str, Any]) -> Path:
    """Render a summary (plus the optional ``calibration``, ``comparison`` and ``figures`` keys
    that the command line adds) as Markdown."""
    cv, boot = s["cancer_vs_benign"], s["bootstrap"]
    lines = [f"# Evaluation of `{s.get('model', 'model')}` on the {s.get('split', '')} split", ""]
    lines += _protocol_lines(s)
    lines += [
        "",
        (f"{s['n']} tiles from {boot['n_groups']} source-tile groups. Intervals: 95% bootstrap "
        f"over groups ({boot['n_resamples']} resamples, seed {boot['seed']}); tiles of one source "
        "tile move together."),
        "",
        "| metric | value | 95% interval |",
        "| --- | --- | --- |",
        f"| accuracy | {_pct(s['accuracy'])} | {_ci(boot['accuracy'])} |",
        (f"| sensitivity (cancer called cancer) | {_pct(cv['sensitivity'])} | "
        f"{_ci(boot['sensitivity'])} |"),
        (f"| specificity (benign called benign) | {_pct(cv['specificity'])} | "
        f"{_ci(boot['specificity'])} |"),
        (f"| **missed cancers** (cancer predicted benign) | {cv['missed_cancers']} of "
        f"{cv['n_cancer']} | |"),
        f"| benign called cancer | {cv['benign_called_cancer']} of {cv['n_benign']} | |",
        f"| macro ROC-AUC (one-vs-rest) | {_num(s['roc_auc_macro_ovr'])} | |",
        f"| macro F1 | {s['macro_f1']:.4f} | |",
        f"| mean loss (cross-entropy) | {s['loss']:.4f} | |",
        f"| expected calibration error (15 bins) | {s['ece']:.4f} | |",
    ]
    if s["roc_auc_note"]:
        lines += ["", f"Note: {s['roc_auc_note']}."]
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | ROC-AUC | tiles |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, m in s["per_class"].items():
        lines.append(
            f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | "
            f"{_num(m['roc_auc'])} | "
            f"{m['support']} |"
        )
    lines += ["", "## Confusion matrix (rows: actual, columns: predicted)", "",
              "| actual \\ predicted | " + " | ".join(CLASS_NAMES) + " |",
              "| --- |" + " --- |" * len(CLASS_NAMES)]
    for name, row in zip(CLASS_NAMES, s["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += _audit_lines(s) + _calibration_lines(s) + _comparison_lines(s) + _figure_lines(s)
    if s.get("skipped_files"):
        lines += ["", f"{len(s['skipped_files'])} unreadable files were skipped: see metrics.json."]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def _audit_lines(s: dict[str, Any]) -> list[str]:
    a = s.get("leak_audit")
    if not a:
        return []
    return [
        "", "## Leak audit", "",
        (f"Near-duplicates of these tiles in the train split, by {a['methods']}: "
         f"{a['n_flagged']} of {a['n']} tiles have one (pairs: `{a['copies_csv']}`, "
         f"thumbnails: `{a['copies_png']}`)."), "",
        "| tiles | n | accuracy | 95% interval |", "| --- | --- | --- | --- |",
        f"| all | {a['n']} | {_pct(a['accuracy'])} | {_ci(s['bootstrap']['accuracy'])} |",
        (f"| with no near-duplicate in train | {a['n_clean']} | {_pct(a['accuracy_clean'])} | "
         f"{_ci(a['accuracy_clean_ci'])} |"),
    ]


def _calibration_lines(s: dict[str, Any]) -> list[str]:
    lines = ["", "## Calibration", "",
             f"Temperature applied: {s.get('temperature', 1.0):.4f}. ECE {s['ece']:.4f}."]
    cal = s.get("calibration")
    if cal:
        lines += [
            "",
            (f"Temperature scaling fitted on the {cal['fitted_on']} split ({cal['n_fit']} tiles): "
            f"T = {cal['temperature']:.4f}, stored in `{cal['stored_in']}` so export and serving "
            "apply it."),
            "",
            "| | ECE | NLL |",
            "| --- | --- | --- |",
            f"| before (T = 1) | {cal['ece_before']:.4f} | {cal['nll_before']:.4f} |",
            (f"| after (T = {cal['temperature']:.3f}) | {cal['ece_after']:.4f} | "
            f"{cal['nll_after']:.4f} |"),
        ]
    return lines


def _comparison_lines(s: dict[str, Any]) -> list[str]:
    cmp_ = s.get("comparison")
    if not cmp_:
        return []
    m = cmp_["mcnemar"]
    return [
        "",
        f"## Comparison with `{cmp_['other_model']}` (McNemar's test, same {s.get('split')} tiles)",
        "",
        "| | this model | other model |",
        "| --- | --- | --- |",
        f"| accuracy | {_pct(s['accuracy'])} | {_pct(cmp_['other_accuracy'])} |",
        (f"| missed cancers | {s['cancer_vs_benign']['missed_cancers']} | "
        f"{cmp_['other_missed_cancers']} |"),
        "",
        f"Only this model right: {m['b']} tiles; only the other right: {m['c']}; both right "
        f"{m['both_right']}, both wrong {m['both_wrong']}. {m['method']}: statistic "
        f"{m['statistic']:.4f}, p = {m['p_value']:.4g}"
        + (" (significant at 0.05)." if m["p_value"] < 0.05 else " (not significant at 0.05)."),
        "",
        ("McNemar treats tiles as independent; copies of one source tile are not, so read a "
        "small p-value with that in mind."),
    ]


def _figure_lines(s: dict[str, Any]) -> list[str]:
    figures = s.get("figures") or {}
    if not figures:
        return []
    lines = ["", "## Figures", ""]
    for caption, name in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    for note in s.get("notes", []):
        lines.append(f"- {note}")
    return lines
