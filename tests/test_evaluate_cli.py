"""``python -m lungtf.evaluate`` in-process on a tiny trained run: files, numbers, options, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lungtf.constants import CLASS_NAMES, PROTOCOL_RANDOM
from lungtf.evaluate import plots
from lungtf.evaluate.__main__ import main
from lungtf.evaluate.calibration import apply_temperature


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def probabilities(rows: list[dict]) -> np.ndarray:
    return np.array([[float(r[c]) for c in CLASS_NAMES] for r in rows])


PANELS: dict[str, list[tuple[str, object, object]]] = {}
"""PNG name -> (title, title box, axes box) of every titled panel, as drawn by ``run_eval``."""


def record_panels(save):
    """Wrap ``plots._save``: measure each panel's title on the drawn figure, then save."""

    def spy(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        PANELS[Path(path).name] = [
            (ax.get_title(), ax.title.get_window_extent(renderer), ax.get_window_extent(renderer))
            for ax in fig.axes if ax.get_title()
        ]  # fmt: skip
        return save(fig, path)

    return spy


@pytest.fixture(scope="module")
def run_eval(tiny_run, tmp_path_factory) -> Path:
    """The default evaluation of the tiny run's best model on its test split (3 source tiles of
    3 tiles each, so the 4 worst tiles repeat a source tile)."""
    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", record_panels(plots._save))
        argv = [str(tiny_run), "--out", str(out), "--top-losses", "4", "--bootstrap", "200"]
        assert main(argv) == 0
    return out


def test_run_directory_writes_every_output(tiny_run, run_eval):
    names = {p.name for p in run_eval.iterdir()}
    backbones = {p.parent.name for p in tiny_run.glob("*/best.keras")}
    assert backbones, "the tiny run has no <backbone>/best.keras"
    assert names >= {
        "predictions.csv", "metrics.json", "report.md", "confusion_matrix.csv",
        "confusion_matrix.png", "reliability.png", "top_losses.png",
        *(f"gradcam_{b}.png" for b in backbones),
    }  # fmt: skip
    test_rows = [r for r in read_csv(tiny_run / "splits.csv") if r["split"] == "test"]
    rows = read_csv(run_eval / "predictions.csv")
    assert list(rows[0]) == ["path", "group", "label", "predicted", *CLASS_NAMES, "loss"]
    assert [r["path"] for r in rows] == [r["path"] for r in test_rows]
    assert [r["group"] for r in rows] == [r["group"] for r in test_rows]
    probs = probabilities(rows)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    losses = np.array([float(r["loss"]) for r in rows])
    true = [CLASS_NAMES.index(r["label"]) for r in rows]
    picked = np.maximum(probs[np.arange(len(rows)), true], 1e-12)  # losses clip at 1e-12
    np.testing.assert_allclose(losses, -np.log(picked), rtol=1e-5, atol=1e-6)

    m = json.loads((run_eval / "metrics.json").read_text())
    right = sum(r["label"] == r["predicted"] for r in rows)
    assert m["accuracy"] == pytest.approx(right / len(rows)) and m["n"] == len(rows)
    assert m["split_protocol"] == "grouped" and m["leaky"] is False
    assert np.sum(m["confusion_matrix"]) == len(rows)
    assert m["bootstrap"]["unit"] == "group" and m["bootstrap"]["n_groups"] == len(
        {r["group"] for r in rows}
    )
    low, high = m["bootstrap"]["accuracy"]
    assert low <= m["accuracy"] <= high
    # The same tiles and model as training's own test metrics in lungtf.json.
    meta = json.loads((tiny_run / "best" / "lungtf.json").read_text())
    assert m["accuracy"] == pytest.approx(meta["test_metrics"]["accuracy"], abs=1e-6)
    assert m["cancer_vs_benign"]["missed_cancers"] == meta["test_metrics"]["missed_cancers"]
    report = (run_eval / "report.md").read_text()
    assert "Split protocol: **grouped**" in report and "WARNING" not in report
    assert "missed cancers" in report and "95% interval" in report
    assert (run_eval / "confusion_matrix.csv").read_text().startswith(
        "actual\\predicted," + ",".join(CLASS_NAMES)
    )


def test_top_losses_show_the_worst_tile_of_each_worst_source_tile(tiny_run, run_eval):
    rows = read_csv(run_eval / "predictions.csv")
    ranked = sorted(rows, key=lambda r: -float(r["loss"]))
    assert len({r["group"] for r in ranked[:4]}) < 4, "premise: the 4 worst repeat a source tile"
    worst: dict[str, dict] = {}
    for r in ranked:
        worst.setdefault(r["group"], r)
    expected = list(worst.values())[:4]
    shown = json.loads((run_eval / "metrics.json").read_text())["top_losses"]
    assert [s["path"] for s in shown] == [r["path"] for r in expected]
    backbones = [p.parent.name for p in tiny_run.glob("*/best.keras")]
    for png in ["top_losses.png", *(f"gradcam_{b}.png" for b in backbones)]:
        titles = [t for t, _, _ in PANELS[png]]
        # what a person reads: one panel per source tile, its id on the title's second line
        assert [t.split("\n")[1].split()[0] for t in titles] == [r["group"] for r in expected]
    first = PANELS["top_losses.png"][0][0].split("\n")[0]
    r = expected[0]
    p = float(r[r["predicted"]])
    assert first == f"{r['label'][5:]}\u2192{r['predicted'][5:]} {p:.2f}"  # e.g. aca→scc 0.94


def test_panel_titles_fit_their_panels(run_eval):
    assert {"top_losses.png", "gradcam_resnet34.png"} <= set(PANELS)
    for png, panels in PANELS.items():
        for k, (title, box, axes) in enumerate(panels):
            where = f"{png} panel {k} {title!r}"
            assert axes.x0 - 1 <= box.x0 and box.x1 <= axes.x1 + 1, f"{where} wider than its panel"
            assert box.y0 >= axes.y1 - 1, f"{where} overlaps its tile"
            for j, (_, other_box, other_axes) in enumerate(panels):
                if j != k:
                    assert not box.overlaps(other_box), f"{where} runs into panel {j}'s title"
                    assert not box.overlaps(other_axes), f"{where} runs into panel {j}'s tile"


def test_long_titles_are_shrunk_then_elided(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5, 1.5))
    ax.imshow(np.zeros((8, 8, 3), np.uint8))
    fig.canvas.draw()
    plots.fit_title(ax, "lung_aca\u2192lung_scc 0.94\n" + "x" * 80)
    renderer = fig.canvas.get_renderer()
    assert ax.title.get_window_extent(renderer).width <= ax.get_window_extent(renderer).width
    first, second = ax.get_title().split("\n")
    assert first == "lung_aca\u2192lung_scc 0.94" and "\u2026" in second
    plt.close(fig)


def test_leaky_manifest_is_reported_as_inflated_and_data_reroots_moved_images(
    tiny_run, tmp_path, capsys
):
    # The run's manifest relabelled as a random split, with its images "moved" elsewhere.
    rows = read_csv(tiny_run / "splits.csv")
    data = Path(rows[0]["path"]).parents[1]
    moved = tmp_path / "leaky.csv"
    with open(moved, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {**r, "path": str(tmp_path / "gone" / Path(r["path"]).relative_to(data)),
             "protocol": PROTOCOL_RANDOM}
            for r in rows
        )  # fmt: skip
    out = tmp_path / "out"
    argv = [str(tiny_run), "--splits", str(moved), "--data", str(data), "--out", str(out),
            "--top-losses", "0", "--bootstrap", "50"]
    assert main(argv) == 0
    assert "inflated" in capsys.readouterr().out
    assert all(r["path"].startswith(str(data)) for r in read_csv(out / "predictions.csv"))
    assert json.loads((out / "metrics.json").read_text())["leaky"] is True
    report = (out / "report.md").read_text()
    assert "**random (leaky)**" in report
    assert "**WARNING: these numbers come from a random (leaky) split.**" in report


def test_savedmodel_matches_keras_and_mcnemar_compares(tiny_run, run_eval, tmp_path):
    (version,) = (tiny_run / "best" / "saved_model").iterdir()
    out = tmp_path / "sm"
    argv = [str(version), "--splits", str(tiny_run / "splits.csv"), "--out", str(out),
            "--top-losses", "2", "--bootstrap", "50", "--compare", str(tiny_run / "best" / "model.keras")]
    assert main(argv) == 0
    served = probabilities(read_csv(out / "predictions.csv"))
    np.testing.assert_allclose(served, probabilities(read_csv(run_eval / "predictions.csv")),
                               atol=1e-5)
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "savedmodel" and "Grad-CAM needs a Keras model" in m["notes"][0]
    mc = m["comparison"]["mcnemar"]
    assert (mc["b"], mc["c"], mc["p_value"]) == (0, 0, 1.0)  # the same model, exported
    assert "McNemar" in (out / "report.md").read_text()


def test_calibrate_fits_on_val_and_stores_temperature(tiny_run, run_eval, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    out = tmp_path / "cal"
    assert main([str(run), "--calibrate", "--out", str(out), "--top-losses", "0",
                 "--bootstrap", "50"]) == 0
    assert "stored in" in capsys.readouterr().out
    t = json.loads((run / "best" / "lungtf.json").read_text())["temperature"]
    m = json.loads((out / "metrics.json").read_text())
    cal = m["calibration"]
    assert cal["temperature"] == t == m["temperature"] and t != 1.0
    n_val = sum(r["split"] == "val" for r in read_csv(run / "splits.csv"))
    assert cal["fitted_on"] == "val" and cal["n_fit"] == n_val
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(cal)
    raw = probabilities(read_csv(run_eval / "predictions.csv"))
    scaled = probabilities(read_csv(out / "predictions.csv"))
    np.testing.assert_allclose(scaled, apply_temperature(raw, t), atol=1e-4)
    assert "Temperature scaling fitted on the val split" in (out / "report.md").read_text()


def test_errors_say_what_was_received(tiny_run, tmp_path, capsys):
    assert main([str(tmp_path), "--splits", str(tiny_run / "splits.csv")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (version,) = (tiny_run / "best" / "saved_model").iterdir()
    assert main([str(version), "--splits", str(tiny_run / "splits.csv"), "--calibrate"]) == 2
    assert "calibrate the run directory" in capsys.readouterr().err
    assert main([str(tiny_run / "best" / "model.keras")]) == 2
    assert "--splits is required" in capsys.readouterr().err


def test_leak_audit_scores_the_tiles_without_a_copy_in_train_apart(tiny_run, run_eval, tmp_path):
    # The default evaluation audited the grouped split: nothing of its test tiles is in train.
    m = json.loads((run_eval / "metrics.json").read_text())
    assert m["leak_audit"]["n_flagged"] == 0 and m["leak_audit"]["n_clean"] == m["n"]
    assert m["leak_audit"]["accuracy_clean"] == pytest.approx(m["accuracy"])
    assert "## Leak audit" in (run_eval / "report.md").read_text()
    # Put rotated and mirrored copies of two test tiles into train: the audit must flag exactly
    # those two and score the others apart.
    from PIL import Image

    rows = read_csv(tiny_run / "splits.csv")
    test = [r for r in rows if r["split"] == "test"]
    copied = [test[0]["path"], test[-1]["path"]]
    extra = []
    for i, path in enumerate(copied):
        with Image.open(path) as im:
            copy = im.transpose(Image.ROTATE_90).transpose(Image.FLIP_LEFT_RIGHT)
        target = tmp_path / "copies" / Path(path).parent.name / f"copy{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        copy.save(target)
        extra.append({**test[0 if i == 0 else -1], "path": str(target), "split": "train",
                      "group": f"copy-{i}"})
    manifest = tmp_path / "leaky.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + extra)
    out = tmp_path / "out"
    argv = [str(tiny_run), "--splits", str(manifest), "--out", str(out), "--top-losses", "0",
            "--bootstrap", "50"]
    assert main(argv) == 0
    audit = json.loads((out / "metrics.json").read_text())["leak_audit"]
    assert audit["n_flagged"] == 2 and audit["n_clean"] == len(test) - 2
    predictions = read_csv(out / "predictions.csv")
    clean = [r for r in predictions if r["path"] not in copied]
    assert audit["accuracy_clean"] == pytest.approx(
        sum(r["label"] == r["predicted"] for r in clean) / len(clean))
    flagged = {r["path"] for r in read_csv(out / "leak_audit.csv")}
    assert flagged <= set(copied)
    assert (out / "leak_audit.png").is_file()
