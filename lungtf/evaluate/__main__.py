"""``python -m lungtf.evaluate MODEL_OR_RUN [--splits splits.csv] [--split test] [--out DIR] ...``

Evaluates a run directory, a ``.keras`` file or an exported SavedModel on one split of a split
manifest and writes into ``--out``: ``predictions.csv``, ``metrics.json``, ``report.md``,
``confusion_matrix.csv``/``.png``, ``reliability.png``, ``top_losses.png`` (the worst tile of each
of the ``--top-losses`` worst source tiles) and Grad-CAM overlays of those tiles
(``gradcam_<backbone>.png``: for a run, one per backbone it trained).
``--calibrate`` fits a temperature on the validation split and stores it in ``lungtf.json``;
``--compare OTHER`` adds McNemar's test against another model on the same tiles.
The leak audit (``lungtf.data.split.audit``: the grouping's detector and an independent keypoint
lookup of every val/test tile among the train tiles) writes ``leak_audit.csv`` and
``leak_audit.png`` and reports accuracy on the whole split and on its tiles with no near-duplicate
in train (``--no-audit`` skips it).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from lungtf.constants import CLASS_NAMES, PROTOCOL_GROUPED, class_index
from lungtf.evaluate import (
    LoadedModel,
    calibration,
    gradcam,
    load_model,
    metrics,
    plots,
    report,
    save_temperature,
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m lungtf.evaluate",
        description="Evaluate a run, .keras file or SavedModel on one split of a split manifest: "
        "predictions, metrics with group-bootstrap intervals, calibration, top losses, Grad-CAM.",
    )
    p.add_argument("model", help="run directory, .keras file or SavedModel version directory")
    p.add_argument("--splits", help="split manifest CSV (default: the run's splits.csv)")
    p.add_argument("--data", help="where the images are now when the manifest's paths no longer "
                   "exist: a missing file is read as DATA/<class folder>/<file name>")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", help="output folder (default: <run>/eval-<split>, else ./eval-<split>)")
    p.add_argument("--top-losses", type=int, default=9, metavar="N",
                   help="source tiles in the top-losses and Grad-CAM grids, the worst tile of "
                   "each (0: none)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on the val split and store it in lungtf.json")
    p.add_argument("--compare", metavar="OTHER_MODEL", help="McNemar's test against this model")
    p.add_argument("--no-audit", action="store_true",
                   help="skip the leak audit (near-duplicates of the split's tiles in train)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bootstrap", type=int, default=1000, help="group bootstrap resamples")
    p.add_argument("--seed", type=int, default=42)
    return p


def read_split(manifest: Path, split: str | None, data: str | None) -> tuple[list, str]:
    """Records of one split (``None``: all) and the manifest's protocol; ``data`` re-roots files
    that moved."""
    from lungtf.data.split import read_manifest

    records, protocol = read_manifest(manifest)
    chosen = [r for r in records if split is None or r.split == split]
    if not chosen:
        found = sorted({str(r.split) for r in records})
        raise ValueError(f"no tiles in split {split!r} of {manifest}; it has splits {found}")
    if data:
        chosen = [r if Path(r.path).is_file()
                  else replace(r, path=str(Path(data) / Path(r.path).parent.name / Path(r.path).name))
                  for r in chosen]
    return chosen, protocol


def predict_records(model: LoadedModel, records: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """True class ids and raw probabilities of ``records``, in order, via ``make_dataset``."""
    from lungtf.data.pipeline import make_dataset

    ds = make_dataset(records, model.image_size, batch_size, training=False)
    labels, probs = [], []
    for x, y in ds:
        labels.append(y.numpy())
        probs.append(model.predict_raw(x.numpy()))
    y_true = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    expected = np.array([class_index(r.label) for r in records])
    if len(y_true) != len(records) or (y_true != expected).any():
        raise RuntimeError(
            f"the input pipeline yielded {len(y_true)} tiles for {len(records)} records (a file "
            "failed to decode at run time); run python -m lungtf.data check on the data"
        )
    return y_true, np.concatenate(probs)


def load_pixels(records: list, image_size: int) -> np.ndarray:
    """Raw 0-255 pixels of a few records at ``image_size``, in order."""
    from lungtf.data.pipeline import make_dataset

    ds = make_dataset(records, image_size, max(1, len(records)), training=False)
    return np.concatenate([x.numpy() for x, _ in ds]).astype(np.float32)


def _calibrate(model: LoadedModel, args, manifest: Path, y_true, raw) -> dict:
    val, _ = read_split(manifest, "val", args.data)
    val, _bad = _readable(val)
    y_val, raw_val = predict_records(model, val, args.batch_size)
    t = calibration.fit_temperature(raw_val, y_val)
    stored = save_temperature(model, t)
    after = calibration.apply_temperature(raw, t)
    return {
        "fitted_on": "val",
        "n_fit": len(y_val),
        "temperature": t,
        "stored_in": str(stored),
        "ece_before": calibration.expected_calibration_error(raw, y_true),
        "ece_after": calibration.expected_calibration_error(after, y_true),
        "nll_before": calibration.nll(raw, y_true),
        "nll_after": calibration.nll(after, y_true),
        "evaluated_on": args.split,
    }


def _readable(records: list) -> tuple[list, list]:
    from lungtf.data.ingest import check_images

    return check_images(records)


def _gradcam_models(model: LoadedModel) -> dict[str, object]:
    """Models to explain: every backbone's checkpoint of a run, else the loaded Keras model."""
    if model.run_dir is not None:
        from lungtf.evaluate import _load_keras

        found = {p.parent.name: _load_keras(p) for p in sorted(model.run_dir.glob("*/best.keras"))}
        if found:
            return found
    if model.keras_model is None:
        return {}
    return {str(model.metadata.get("backbone", "model")): model.keras_model}


def _top_losses(model, records, groups, y_true, probs, n, out: Path, summary: dict) -> None:
    """``top_losses.png`` and ``gradcam_<backbone>.png``: the worst tile of each of the ``n``
    worst source tiles (``report.worst_per_group``), listed in ``summary["top_losses"]``."""
    losses = report.tile_losses(probs, y_true)
    top = report.worst_per_group(losses, groups, n)
    chosen = [records[i] for i in top]
    pred = probs[top].argmax(1)
    titles = [plots.tile_title(y_true[i], p, probs[i, p], f"{groups[i]} loss {losses[i]:.2f}")
              for i, p in zip(top, pred)]
    summary["top_losses"] = [
        {"path": records[i].path, "group": groups[i], "label": CLASS_NAMES[y_true[i]],
         "predicted": CLASS_NAMES[p], "loss": float(losses[i])}
        for i, p in zip(top, pred)
    ]  # fmt: skip
    pixels = load_pixels(chosen, model.image_size)
    plots.tile_grid_png(pixels, titles, out / "top_losses.png")
    summary["figures"][
        "Top losses: the worst tile of each of the worst source tiles (actual→predicted, "
        "probability of the prediction; source tile, loss)"
    ] = "top_losses.png"
    explain = _gradcam_models(model)
    if not explain:
        summary["notes"].append("Grad-CAM needs a Keras model; a SavedModel has none.")
    for name, keras_model in explain.items():
        size = int(keras_model.input_shape[1])
        px = pixels if size == model.image_size else load_pixels(chosen, size)
        heat, cam_pred, prob = gradcam.gradcam(keras_model, px)
        big = gradcam.upsample(heat, size)
        cam_titles = [plots.tile_title(y_true[i], p, q, groups[i])
                      for p, q, i in zip(cam_pred, prob, top)]
        plots.tile_grid_png(px, cam_titles, out / f"gradcam_{name}.png", heatmaps=big)
        summary["figures"][
            f"Grad-CAM of {name} on the top losses (evidence for its own prediction: "
            "actual→predicted, probability; source tile)"
        ] = f"gradcam_{name}.png"


def _leak_audit(args, manifest: Path, records, y_true, probs, groups, out: Path) -> dict:
    """Audit the manifest for near-duplicates of the evaluated tiles in train (two independent
    methods, ``lungtf.data.split.audit``) and score the tiles with none apart."""
    from lungtf.data.split import audit, draw_copies, write_audit

    everything, _ = read_split(manifest, None, args.data)
    others, _bad = _readable([r for r in everything if r.split != args.split])
    found = audit(others + records)  # ``records``: the evaluated split, already checked
    write_audit(found, out / "leak_audit.csv")
    draw_copies(found, out / "leak_audit.png")
    clean = np.array([r.path not in found.flagged for r in records])
    pred = probs.argmax(1)
    result = {
        "methods": "log-polar near-duplicate pairs (the grouping's detector) and keypoint "
                   "lookup among the train tiles (SIFT votes + RANSAC similarity)",
        "n": len(records), "n_flagged": int((~clean).sum()), "n_clean": int(clean.sum()),
        "accuracy": float((pred == y_true).mean()),
        "accuracy_clean": float((pred[clean] == y_true[clean]).mean()) if clean.any() else None,
        "accuracy_clean_ci": None, "copies_csv": "leak_audit.csv", "copies_png": "leak_audit.png",
    }
    if clean.any():
        from lungtf.evaluate import metrics

        clean_groups = [g for g, keep in zip(groups, clean) if keep]
        interval = metrics.group_bootstrap(y_true[clean], pred[clean], clean_groups,
                                           n_resamples=args.bootstrap, seed=args.seed)["accuracy"]
        result["accuracy_clean_ci"] = list(interval) if interval else None
    return result


def _compare(other_source: str, records, y_true, probs, batch_size: int) -> dict:
    other = load_model(other_source)
    y_other, raw_other = predict_records(other, records, batch_size)
    pred_other = (raw_other if other.kind == "savedmodel"
                  else calibration.apply_temperature(raw_other, other.temperature)).argmax(1)
    cv = metrics.cancer_view(y_other, pred_other)
    return {
        "other_model": str(other_source),
        "other_accuracy": float((pred_other == y_true).mean()),
        "other_missed_cancers": cv["missed_cancers"],
        "mcnemar": metrics.mcnemar(y_true, probs.argmax(1), pred_other),
    }


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the parsed ``args`` say; returns the summary written to ``metrics.json``."""
    source = Path(args.model)
    if args.calibrate and (source / "saved_model.pb").is_file():
        raise ValueError(
            f"cannot calibrate the SavedModel {source}: its lungtf.json is baked into the "
            "export; calibrate the run directory or .keras file it came from, then export again"
        )
    if not args.splits and not (source / "splits.csv").is_file():
        raise ValueError(f"--splits is required for {source} (not a run directory with splits.csv)")
    model = load_model(source)
    manifest = Path(args.splits) if args.splits else model.default_splits
    records, protocol = read_split(manifest, args.split, args.data)
    records, bad = _readable(records)
    if not records:
        raise ValueError(f"all {len(bad)} tiles of split {args.split!r} are unreadable")
    out = Path(args.out or (model.run_dir or Path(".")) / f"eval-{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    y_true, raw = predict_records(model, records, args.batch_size)
    cal = _calibrate(model, args, manifest, y_true, raw) if args.calibrate else None
    probs = raw if model.kind == "savedmodel" else calibration.apply_temperature(
        raw, model.temperature)
    groups = [r.group or Path(r.path).name for r in records]
    summary = report.summarize(y_true, probs, groups, protocol, args.bootstrap, args.seed)
    summary.update(model=str(args.model), kind=model.kind, split=args.split, manifest=str(manifest),
                   temperature=model.temperature, skipped_files=[vars(b) for b in bad],
                   figures={}, notes=[])
    if cal:
        summary["calibration"] = cal
    report.write_predictions_csv(out / "predictions.csv", [r.path for r in records], groups,
                                 y_true, probs)
    with open(out / "confusion_matrix.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual\\predicted", *CLASS_NAMES])
        writer.writerows([name, *row] for name, row in zip(CLASS_NAMES, summary["confusion_matrix"]))
    plots.confusion_matrix_png(summary["confusion_matrix"], out / "confusion_matrix.png",
                               title=f"{args.split} split ({protocol})")
    curves = {"as evaluated": (calibration.reliability_bins(probs, y_true), summary["ece"])}
    if cal:
        curves = {"before (T = 1)": (calibration.reliability_bins(raw, y_true), cal["ece_before"]),
                  f"after (T = {cal['temperature']:.2f})": curves["as evaluated"]}
    plots.reliability_png(curves, out / "reliability.png")
    summary["figures"].update({"Confusion matrix": "confusion_matrix.png",
                               "Reliability diagram": "reliability.png"})
    if args.top_losses > 0:
        _top_losses(model, records, groups, y_true, probs, args.top_losses, out, summary)
    if not args.no_audit and args.split != "train":
        summary["leak_audit"] = _leak_audit(args, manifest, records, y_true, probs, groups, out)
        summary["figures"]["Leak audit: tiles with a near-duplicate in train, beside it"] = (
            "leak_audit.png")
    if args.compare:
        summary["comparison"] = _compare(args.compare, records, y_true, probs, args.batch_size)
    report.write_metrics_json(out / "metrics.json", summary)
    report.write_report_md(out / "report.md", summary)
    summary["out"] = str(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation command line; returns the exit code (2 on a usage or input error)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        s = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cv = s["cancer_vs_benign"]
    if s["split_protocol"] != PROTOCOL_GROUPED:
        print(f"WARNING: split protocol {s['split_protocol']!r}: these numbers are inflated")
    print(f"{s['split']} accuracy {s['accuracy']:.4f} on {s['n']} tiles ({s['split_protocol']}); "
          f"missed cancers {cv['missed_cancers']}, benign called cancer "
          f"{cv['benign_called_cancer']}; ECE {s['ece']:.4f}")
    if "calibration" in s:
        c = s["calibration"]
        print(f"temperature {c['temperature']:.4f} stored in {c['stored_in']}; "
              f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}")
    print(f"report: {Path(s['out']) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
