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


def short_class(name: str) -> str:
    """A class name short enough for a panel title: ``lung_scc`` -> ``scc``."""
    return name.removeprefix("lung_")


def tile_title(actual: int, predicted: int, probability: float, source: str = "") -> str:
    """A tile's panel title: ``aca→scc 0.94`` (actual → predicted, probability of the
    prediction), then the source tile id on a second line when given."""
    head = f"{short_class(CLASS_NAMES[actual])}\u2192{short_class(CLASS_NAMES[predicted])} "
    head += f"{probability:.2f}"
    return f"{head}\n{source}" if source else head


def _elide(line: str, keep: int) -> str:
    """``line`` cut to ``keep`` characters with an ellipsis in the middle."""
    if len(line) <= keep:
        return line
    left = keep // 2
    return line[:left] + "\u2026" + line[len(line) - (keep - 1 - left):]


def fit_title(ax: plt.Axes, title: str, fontsize: float = 9, min_fontsize: float = 6) -> None:
    """Set ``ax``'s title so that it is no wider than the axes: the font shrinks down to
    ``min_fontsize``, then the longest lines lose characters in the middle (``lung_…-158``).

    The figure must have been drawn once (``fig.canvas.draw()``) so the axes have their size.
    """
    renderer = ax.figure.canvas.get_renderer()
    room = ax.get_window_extent(renderer).width
    text = ax.set_title(title, fontsize=fontsize)
    width = text.get_window_extent(renderer).width
    if width > room:
        text.set_fontsize(max(min_fontsize, fontsize * room / width))
    lines = title.split("\n")
    while text.get_window_extent(renderer).width > room:
        longest = max(range(len(lines)), key=lambda k: len(lines[k]))
        if len(lines[longest]) <= 2:
            break
        lines[longest] = _elide(lines[longest], len(lines[longest]) - 1)
        text.set_text("\n".join(lines))


def tile_grid_png(
    images: np.ndarray,
    titles: list[str],
    path: str | Path,
    heatmaps: np.ndarray | None = None,
    ncols: int = 4,
    alpha: float = 0.45,
) -> Path:
    """A grid of tiles with a title above each, optionally with a heatmap drawn over each tile.

    Titles may have several lines (``tile_title``); each is fitted to its panel (``fit_title``),
    so neighbouring titles never run into each other.

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
    lines = max(t.count("\n") + 1 for t in titles)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.4 * ncols, (2.4 + 0.2 * lines) * nrows), squeeze=False,
        gridspec_kw={"wspace": 0.08, "hspace": 0.1 * lines + 0.05},
    )
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, image) in enumerate(zip(axes.flat, images)):
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
        if heatmaps is not None:
            ax.imshow(heatmaps[k], cmap="jet", alpha=alpha, vmin=0, vmax=1)
    fig.canvas.draw()
    for ax, title in zip(axes.flat, titles):
        fit_title(ax, title)
    return _save(fig, path)
