"""The demo's "show evidence" part: does the served version have ``explain``, and its overlay.

``explain_support`` asks the server (``GetModelMetadata``, through ``LungClient.signatures``)
which signatures the version that answers has, so a demo in front of a model exported before
``explain`` existed hides its toggle and says why instead of failing on every tile.
``explain_tile`` calls the ``explain`` signature for one file and ``overlay_uri`` draws the answer
with ``lungtf.overlay`` (the picture the client's ``explain`` command writes).
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from lungtf.client import LungClient, LungClientError, Prediction
from lungtf.export import EXPLAIN_SIGNATURE
from lungtf.overlay import overlay_png

OVERLAY_SIZE = 160
"""Side in pixels of the overlay the page shows beside the bars."""


def explain_support(client: LungClient) -> tuple[bool, str]:
    """``(True, "")`` when the version that answers has ``explain``; else ``(False, why)``.

    An unreachable server gives ``(False, "")``: the page already says so elsewhere.
    """
    try:
        served = client.signatures()
    except LungClientError as err:
        if err.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return False, ""
        return False, f"Evidence overlays are unavailable: the server answered {err}."
    names = sorted(served["signatures"])
    if EXPLAIN_SIGNATURE in names:
        return True, ""
    return False, (
        f"Evidence overlays are unavailable: model version {served['version']} served at "
        f"`{client.target}` has no `{EXPLAIN_SIGNATURE}` signature (it has "
        f"{', '.join(f'`{n}`' for n in names)}). Export the model again with this lungtf to "
        "get them."
    )


def explain_tile(client: LungClient, path: str | Path) -> tuple[Prediction, np.ndarray]:
    """The prediction and Grad-CAM heatmap ``[h, w]`` (0-1) of one file from ``explain``."""
    (answer,) = client.explain([path])
    return answer.prediction, np.asarray(answer.heatmap)


def overlay_uri(path: str | Path, heatmap: np.ndarray, label: str) -> str | None:
    """A PNG ``data:`` URI of the tile with its heatmap and ``label``; ``None`` when the file
    cannot be drawn here."""
    try:
        png = overlay_png(path, heatmap, label, size=OVERLAY_SIZE)
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay_label(prediction: Prediction) -> str:
    """The overlay's corner text: the predicted class and its probability (``lung_scc 0.94``)."""
    return f"{prediction.label} {prediction.probabilities[prediction.label]:.2f}"

