"""Evidence overlays: a tile with its Grad-CAM heatmap blended over it and a label in the corner.

One function for every place that draws the served ``explain`` answer (the client's
``explain`` command, the demo, the notebooks), so they all show the same picture. It needs only
numpy and Pillow (no matplotlib, no TensorFlow); the colours are the ``jet`` colour map the
evaluation report's Grad-CAM grids use (``lungtf.evaluate.plots``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lungtf.constants import MAX_IMAGE_PIXELS

ALPHA = 0.45
"""Heatmap opacity, as in ``lungtf.evaluate.plots.tile_grid_png``."""


def jet(values: np.ndarray) -> np.ndarray:
    """``jet`` colours (uint8 RGB, ``[..., 3]``) of values in [0, 1]: blue, cyan, yellow, red."""
    x = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0], np.float32)), 0.0, 1.0)
    return (255.0 * rgb + 0.5).astype(np.uint8)


def open_tile(image: Any) -> Image.Image:
    """An RGB PIL image from a file path, JPEG/PNG bytes, a PIL image or ``[H, W, 3]`` pixels.

    Raises:
        ValueError: for an image larger than ``MAX_IMAGE_PIXELS`` (read from its header).
    """
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, (str, Path)):
        image = Image.open(image)
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image of {image.width} x {image.height} pixels; at most {MAX_IMAGE_PIXELS} allowed"
        )
    return image.convert("RGB")


def overlay(
    image: Any, heatmap: np.ndarray, label: str = "", size: int | None = None, alpha: float = ALPHA
) -> Image.Image:
    """The tile with ``heatmap`` blended over it and ``label`` in the top-left corner.

    Args:
        image: the tile (see ``open_tile``).
        heatmap: ``[h, w]`` values in [0, 1] (the ``explain`` signature's ``heatmap``), resized
            bilinearly to the tile.
        label: text for the corner, e.g. ``"lung_scc 0.94"``; none when empty.
        size: side of the (square) result in pixels; the tile's own size when ``None``.
        alpha: heatmap opacity.

    Returns:
        An RGB PIL image.
    """
    tile = open_tile(image)
    if size is not None:
        tile = tile.resize((size, size), Image.Resampling.BILINEAR)
    heat = np.asarray(heatmap, np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be [h, w]; got shape {list(heat.shape)}")
    heat = Image.fromarray(np.clip(heat, 0.0, 1.0)).resize(tile.size, Image.Resampling.BILINEAR)
    colours = jet(np.asarray(heat))
    blended = (1.0 - alpha) * np.asarray(tile, np.float32) + alpha * colours
    out = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    if label:
        draw = ImageDraw.Draw(out)
        pad, points = max(2, out.width // 100), max(8, out.width // 14)
        font = ImageFont.load_default(size=points)
        while draw.textlength(label, font=font) > out.width - 2 * pad and points > 6:
            points -= 1
            font = ImageFont.load_default(size=points)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=(0, 0, 0))
        draw.text((pad - left, pad - top), label, fill=(255, 255, 255), font=font)
    return out


def overlay_png(image: Any, heatmap: np.ndarray, label: str = "", size: int | None = None) -> bytes:
    """``overlay`` encoded as PNG bytes."""
    buf = io.BytesIO()
    overlay(image, heatmap, label, size).save(buf, format="PNG")
    return buf.getvalue()
