"""PNG figures of an evaluation: confusion matrix, reliability diagram, tile grids with titles.

matplotlib runs on the Agg backend (no display needed, safe in threads and on servers); every
function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lungtf.constants import CLASS_NAMES
from lungtf.evaluate.calibration import ReliabilityBins


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def confusion_matrix_png(
    cm: np.ndarray | list, path: str | Path, class_names: tuple[str, ...] = CLASS_NAMES, title: str = ""
) -> Path:
    """Counts per (true, predicted) class with the row share in brackets."""
    cm = np.asarray(cm)
    rows = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(class_names) + 1.5, 1.4 * len(class_names) + 1))
    ax.imshow(cm / rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            share = cm[i, j] / rows[i, 0]
            ax.text(j, i, f"{cm[i, j]}\n({share:.0%})", ha="center", va="center",
                    color="white" if share > 0.5 else "black")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def reliability_png(
    curves: dict[str, tuple[ReliabilityBins, float]], path: str | Path, title: str = ""
) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin, one curve per entry.

    Args:
        curves: label (e.g. ``"before"``, ``"after T=1.8"``) → (bins, ECE); the ECE goes in the
            legend. Empty bins are left out.
        path: PNG to write.
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
    for label, (bins, ece) in curves.items():
        used = bins.count > 0
        ax.plot(bins.confidence[used], bins.accuracy[used], "o-", label=f"{label} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left")
    ax.set_title(title or "reliability diagram")
    return _save(fig, path)


def tile_grid_png(
    images: np.ndarray,
    titles: list[str],
    path: str | Path,
    heatmaps: np.ndarray | None = None,
    ncols: int = 4,
    alpha: float = 0.45,
) -> Path:
    """A grid of tiles with a title above each, optionally with a heatmap drawn over each tile.

    Args:
        images: ``[N, H, W, 3]`` raw 0-255 pixels.
        titles: one title per tile.
        path: PNG to write.
        heatmaps: optional ``[N, H, W]`` values in [0, 1] (e.g. Grad-CAM), drawn with the ``jet``
            colour map at opacity ``alpha``.
        ncols: tiles per row.
        alpha: heatmap opacity.
    """
    images = np.asarray(images)
    if len(images) != len(titles) or len(images) == 0:
        raise ValueError(
            f"need one title per image and at least one image; got {len(images)} images, "
            f"{len(titles)} titles"
        )
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, image, title) in enumerate(zip(axes.flat, images, titles)):
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
        if heatmaps is not None:
            ax.imshow(heatmaps[k], cmap="jet", alpha=alpha, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
