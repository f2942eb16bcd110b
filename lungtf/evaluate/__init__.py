"""Evaluation: metrics, calibration, Grad-CAM, top losses and model comparison on a split.

``python -m lungtf.evaluate MODEL_OR_RUN --splits splits.csv`` is the command line (see
``__main__``). This module loads what is evaluated, so the notebooks use the same code:

- a run directory (``best/model.keras`` + ``best/lungtf.json``; its ``splits.csv`` is the default
  manifest),
- a ``.keras`` file (with a ``lungtf.json`` beside it when there is one),
- an exported SavedModel version directory (its ``predict_pixels`` and ``metadata`` signatures).

Submodules:
    metrics: scikit-learn metrics, the cancer-versus-benign view, group bootstrap, McNemar.
    calibration: expected calibration error, reliability bins, temperature scaling.
    gradcam: Grad-CAM heatmaps on the last convolutional feature map.
    plots: confusion matrix, reliability diagram and tile-grid PNGs.
    report: predictions.csv, metrics.json and report.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungtf.evaluate.calibration import apply_temperature

METADATA_FILE = "lungtf.json"


@dataclass
class LoadedModel:
    """A model ready to predict probabilities from raw 0-255 pixels.

    Attributes:
        source: the path that was given.
        kind: ``run``, ``keras`` or ``savedmodel``.
        image_size: side in pixels the model takes.
        metadata: the ``lungtf.json`` contents (``{}`` when there is none).
        metadata_path: the ``lungtf.json`` file that ``--calibrate`` updates; ``None`` for a
            SavedModel (its copy is an asset baked into the export) or when there is none.
        keras_model: the Keras model (for Grad-CAM); ``None`` for a SavedModel.
        default_splits: the run's ``splits.csv`` when ``source`` is a run directory.
        run_dir: the run directory, when ``source`` is one.
    """

    source: Path
    kind: str
    image_size: int
    metadata: dict[str, Any]
    metadata_path: Path | None
    keras_model: Any
    default_splits: Path | None
    run_dir: Path | None
    _raw: Callable[[np.ndarray], np.ndarray] = field(repr=False)

    @property
    def temperature(self) -> float:
        """The stored temperature (1.0 when uncalibrated)."""
        return float(self.metadata.get("temperature", 1.0))

    def predict_raw(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, 3]`` as the network outputs them (a SavedModel applies its T)."""
        return np.asarray(self._raw(np.asarray(pixels, np.float32)), np.float64)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities as served: temperature-scaled with the stored ``temperature``.

        An exported SavedModel already scales inside its signatures, so only Keras models are
        scaled here; both then give the probabilities a client of the served model sees.
        """
        probs = self.predict_raw(pixels)
        return probs if self.kind == "savedmodel" else apply_temperature(probs, self.temperature)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _load_keras(path: Path) -> Any:
    import keras

    import lungtf.models  # noqa: F401  (registers the custom layers before loading)

    return keras.models.load_model(path, compile=False)


def load_model(source: str | Path) -> LoadedModel:
    """Load a run directory, a ``.keras`` file or a SavedModel version directory.

    Raises:
        ValueError: when ``source`` is none of those, naming what was found.
    """
    source = Path(source)
    if source.is_dir() and (source / "best" / "model.keras").is_file():
        model = _load_keras(source / "best" / "model.keras")
        meta_path = source / "best" / METADATA_FILE
        return LoadedModel(
            source, "run", int(model.input_shape[1]), _read_json(meta_path), meta_path, model,
            source / "splits.csv" if (source / "splits.csv").is_file() else None, source,
            lambda x: model.predict_on_batch(x),
        )
    if source.is_file() and source.suffix == ".keras":
        model = _load_keras(source)
        meta_path = source.parent / METADATA_FILE
        return LoadedModel(
            source, "keras", int(model.input_shape[1]), _read_json(meta_path), meta_path, model,
            None, None, lambda x: model.predict_on_batch(x),
        )
    if source.is_dir() and (source / "saved_model.pb").is_file():
        import tensorflow as tf

        loaded = tf.saved_model.load(str(source))
        missing = {"predict_pixels", "metadata"} - set(loaded.signatures)
        if missing:
            raise ValueError(
                f"SavedModel {source} lacks signatures {sorted(missing)}; it has "
                f"{sorted(loaded.signatures)} (export it with python -m lungtf.export)"
            )
        meta = json.loads(loaded.signatures["metadata"]()["json"].numpy().decode("utf-8"))
        fn = loaded.signatures["predict_pixels"]
        size = int(fn.structured_input_signature[1]["pixels"].shape[1] or meta["image_size"])
        return LoadedModel(
            source, "savedmodel", size, meta, None, None, None, None,
            lambda x: fn(pixels=tf.constant(x))["probabilities"].numpy(),
        )
    found = sorted(p.name for p in source.iterdir())[:10] if source.is_dir() else "no such directory"
    raise ValueError(
        f"{source} is not a run directory (best/model.keras), a .keras file or a SavedModel "
        f"version directory (saved_model.pb); found: {found}"
    )


def save_temperature(model: LoadedModel, temperature: float) -> Path:
    """Store ``temperature`` in the model's ``lungtf.json`` so export and serving apply it.

    Raises:
        ValueError: for a SavedModel (its metadata is baked into the export: calibrate the run or
            ``.keras`` file and export again).
    """
    if model.metadata_path is None:
        raise ValueError(
            f"cannot store a temperature in {model.source} ({model.kind}): calibrate the run "
            "directory or .keras file it was exported from, then export again"
        )
    model.metadata["temperature"] = float(temperature)
    from lungtf.train.rundir import write_text  # atomic: lungtf.json is never half written

    write_text(model.metadata_path, json.dumps(model.metadata, indent=2) + "\n")
    return model.metadata_path
