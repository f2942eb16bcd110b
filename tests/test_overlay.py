"""lungtf.overlay: the heatmap lands where it is hot, in jet colours, with a readable label."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lungtf import overlay


def test_jet_runs_blue_to_red() -> None:
    colours = overlay.jet(np.array([0.0, 0.5, 1.0, 2.0]))
    assert colours[0].argmax() == 2 and colours[2].argmax() == 0  # blue at 0, red at 1
    assert colours[1][1] == 255  # green in the middle
    np.testing.assert_array_equal(colours[3], colours[2])  # clipped


def test_overlay_heats_the_hot_corner_and_labels_the_other(tmp_path) -> None:
    grey = np.full((64, 64, 3), 128, np.uint8)
    path = tmp_path / "tile.png"
    Image.fromarray(grey).save(path)
    heat = np.zeros((4, 4), np.float32)
    heat[3, 3] = 1.0  # bottom-right cell hot
    out = overlay.overlay(path, heat, label="lung_scc 0.94", size=128)
    px = np.asarray(out, np.int32)
    assert out.size == (128, 128) and out.mode == "RGB"
    assert px[120, 120, 0] > px[120, 120, 2] + 40  # hot: (dark) red
    assert px[64, 64, 2] > px[64, 64, 0] + 30  # cold: blue tint
    corner = px[:12, :40]
    assert corner.min() < 30 and corner.max() > 220  # white text on black
    png = overlay.overlay_png(path.read_bytes(), heat)
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    with pytest.raises(ValueError, match=r"heatmap must be \[h, w\]"):
        overlay.overlay(grey, heat[None])
