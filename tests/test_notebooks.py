"""The notebooks are stored without outputs and execute headless (nbclient) against a tiny run.

The kernel is the ``python3`` kernel of this interpreter (jupyter_client starts ``python3``
kernels with ``sys.executable``, so a fresh ``make test`` venv works). Parameters reach the
notebooks through environment variables, which the kernel inherits. Executed copies are left in
``test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import nbformat
import pytest
from conftest import SHARED_DATA
from nbclient import NotebookClient
from PIL import Image
from test_serving import launch, wait_ready

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_data.ipynb", "02_evaluate.ipynb", "03_serving_client.ipynb")


def execute(name: str, artifacts_dir: Path) -> nbformat.NotebookNode:
    """Run a notebook top to bottom (a failing cell raises) and keep the executed copy."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    nbformat.write(nb, artifacts_dir / name.replace(".ipynb", ".executed.ipynb"))
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook showed as text or Markdown."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts += [data.get("text/markdown", ""), data.get("text/plain", "")]
    return "\n".join(parts)


def data_of(run: Path) -> Path:
    """The class-folder dataset a run was trained on (the parent of its class folders)."""
    with open(run / "splits.csv", newline="", encoding="utf-8") as fh:
        return Path(next(csv.DictReader(fh))["path"]).parents[1]


def images_shown(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


def test_notebooks_are_stored_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == list(NAMES)
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs"


def test_01_data(tiny_run, tmp_path, monkeypatch, artifacts_dir):
    """On the shared real tiles when present (6 whole groups per class for the audit), else on
    the tiny run's tiles; one kernel either way, to keep the suite short."""
    shared = Path(os.environ.get("LUNGTF_SHARED_DATA", SHARED_DATA))
    data = shared if (shared / "groups.csv").is_file() else data_of(tiny_run)
    monkeypatch.setenv("LUNGTF_DATA", str(data))
    monkeypatch.setenv("LUNGTF_GROUPS_PER_CLASS", "6")
    monkeypatch.setenv("LUNGTF_OUT", str(tmp_path))
    nb = execute("01_data.ipynb", artifacts_dir)
    text = text_of(nb)
    assert "| lung_aca |" in text and "Groups from groups.csv" in text
    assert "| grouped |" in text and "| random (leaky) |" in text
    assert " from 18 groups." in text  # 6 whole groups x 3 classes
    assert (tmp_path / "batch.png").stat().st_size > 1000
    assert images_shown(nb) >= 3


def test_02_evaluate(tiny_run, tmp_path, monkeypatch, artifacts_dir):
    monkeypatch.setenv("LUNGTF_RUN", str(tiny_run))
    monkeypatch.setenv("LUNGTF_OUT", str(tmp_path))
    monkeypatch.setenv("LUNGTF_TOP_LOSSES", "4")
    nb = execute("02_evaluate.ipynb", artifacts_dir)
    text = text_of(nb)
    assert "Split protocol: **grouped**" in text and "missed cancers" in text
    assert "Fitted temperature T =" in text
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert f"| accuracy | {metrics['accuracy']:.3f} |" in text
    backbones = [p.parent.name for p in tiny_run.glob("*/best.keras")]
    # Confusion matrix, top losses, one Grad-CAM grid per backbone, reliability diagram.
    assert images_shown(nb) == 3 + len(backbones)
    assert json.loads((tiny_run / "best" / "lungtf.json").read_text())["temperature"] == 1.0


@pytest.fixture
def dev_server(tiny_run, tmp_path):
    """``python -m lungtf.serving serve`` on a free loopback port, serving the tiny run's export."""
    log = tmp_path / "server.log"
    proc = launch(["--model-base-path", str(tiny_run / "best" / "saved_model")], log)
    try:
        yield wait_ready(proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_03_serving_client(tiny_run, dev_server, tmp_path, monkeypatch, artifacts_dir):
    data = data_of(tiny_run)
    monkeypatch.setenv("LUNGTF_TARGET", dev_server)
    monkeypatch.setenv("LUNGTF_TILES", str(data))
    monkeypatch.setenv("LUNGTF_OUT", str(tmp_path))
    nb = execute("03_serving_client.ipynb", artifacts_dir)
    text = text_of(nb)
    assert "AVAILABLE" in text and "| image size | 64 px |" in text
    for cls in ("lung_aca", "lung_n", "lung_scc"):
        assert f"| {cls}0.jpeg | {cls} |" in text
    assert (tmp_path / "served_predictions.png").stat().st_size > 1000
    # overlays from the explain signature: one grid of the tiles asked, one misclassified tile
    assert "has no `explain` signature" not in text
    assert (tmp_path / "served_evidence.png").stat().st_size > 1000
    if "No misclassified tile among the 60 tiles asked." not in text:
        assert "Misclassified: **" in text and " of 60 tiles asked were wrong" in text
        assert Image.open(tmp_path / "misclassified_evidence.png").size == (224, 224)
    assert images_shown(nb) == 2 + ("Misclassified: **" in text)
