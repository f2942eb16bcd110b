"""Shared fixtures: tiny real image folders in tmp_path and the shared real LC25000 tiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungtf.constants import CLASS_NAMES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lc25000-lung-224"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The 6,036 real LC25000 lung tiles beside the checkout; skips when they are absent."""
    root = Path(os.environ.get("LUNGTF_SHARED_DATA", SHARED_DATA))
    if not (root / "groups.csv").is_file():
        pytest.skip(f"real LC25000 tiles not found at {root} (needs ../shared/data/lc25000-lung-224)")
    return root


def write_tile(path: Path, seed: int, size: int = 40, cls: int = 0) -> Path:
    """Write a small synthetic RGB tile whose colour depends on the class, so it is learnable."""
    rng = np.random.default_rng(seed)
    base = np.zeros((size, size, 3), np.float32)
    base[..., cls % 3] = 160.0
    img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A class-folder dataset: 3 classes x 8 tiny JPEG tiles (40 px), real files on disk."""
    root = tmp_path / "lung_image_sets"
    for c, name in enumerate(CLASS_NAMES):
        for i in range(8):
            write_tile(root / name / f"{name}{i}.jpeg", seed=100 * c + i, cls=c)
    return root


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave files for a person to look at (screenshots, plots)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
