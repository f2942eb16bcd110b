"""Shared fixtures: tiny real image folders in tmp_path and the shared real LC25000 tiles."""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungtf.constants import CLASS_NAMES
from lungtf.data.hostile import png_bomb  # noqa: F401  (tests import it from here)

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


@pytest.fixture
def offline(monkeypatch) -> None:
    """Route HTTPS through a loopback port nothing listens on: every fetch is refused at once,
    as on a machine without network (the fail-fast-offline tests of the weight loaders)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


def write_tile(path: Path, seed: int, size: int = 40, cls: int = 0) -> Path:
    """Write a small synthetic RGB tile whose colour depends on the class, so it is learnable."""
    rng = np.random.default_rng(seed)
    base = np.zeros((size, size, 3), np.float32)
    base[..., cls % 3] = 160.0
    img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def write_grouped_tiles(root: Path, per_class: int, group_size: int) -> Path:
    """``per_class`` synthetic 40 px tiles per class under ``root/<class>/`` in source groups of
    ``group_size`` consecutive tiles, with ``root/groups.csv`` (path,label,group); returns ``root``."""
    rows = []
    for c, name in enumerate(CLASS_NAMES):
        for i in range(per_class):
            path = write_tile(root / name / f"{name}{i}.jpeg", seed=100 * c + i, cls=c)
            rows.append(f"{name}/{path.name},{name},{name}-{i // group_size}")
    (root / "groups.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    return root


def lc25000_copy(image: np.ndarray, zoom: float, angle: float, centre: tuple[float, float],
                 flip: tuple[bool, bool], border: int) -> np.ndarray:
    """A copy as LC25000's missed ones look: zoomed in about an off-centre point (``centre``: -1..1
    of the reach that keeps the view inside the tile), rotated, corners filled by ``border``
    (mirror reflection: a kaleidoscope border), flipped left-right and/or top-bottom."""
    import cv2

    side = image.shape[0]
    reach = 0.5 * side * (1 - 1 / zoom)
    cx, cy = side / 2 + centre[0] * reach, side / 2 + centre[1] * reach
    warp = cv2.getRotationMatrix2D((cx, cy), angle, zoom)
    warp[:, 2] += (side / 2 - cx, side / 2 - cy)
    out = cv2.warpAffine(image, warp, (side, side), flags=cv2.INTER_CUBIC, borderMode=border)
    out = out[:, ::-1] if flip[0] else out
    return np.ascontiguousarray(out[::-1] if flip[1] else out)


def two_benign_sources(shared_data: Path) -> tuple[list[str], np.ndarray]:
    """Two tiles each of two shared benign source tiles (the 1st and 4th groups), as paths, and
    the first tile's RGB pixels."""
    import csv

    with open(shared_data / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "lung_n"]
    first, second = sorted({r["group"] for r in rows})[:6:3]
    paths = [str(shared_data / r["path"]) for g in (first, second)
             for r in [r for r in rows if r["group"] == g][:2]]
    with Image.open(paths[0]) as im:
        return paths, np.asarray(im.convert("RGB"))


@contextlib.contextmanager
def backbones_from_module(folder: Path, module: str, source: str, names: tuple[str, ...]):
    """Import ``source`` as module ``module`` from a file in ``folder``, so that a child process
    (``lungtf.train.isolate``) can import the backbones it registers too; on exit ``names`` leave
    the registry and the module leaves ``sys.modules`` and the path."""
    from lungtf.models import registry

    (folder / f"{module}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        importlib.import_module(module)
        yield module
    finally:
        for name in names:
            registry._REGISTRY.pop(name, None)
        sys.modules.pop(module, None)
        sys.path.remove(str(folder))


PROBE_SOURCE = '''"""Two-convolution test backbones {listed}; variant ``raise`` fails when built,
variant ``kill`` ends its process with SIGKILL there."""
import os
import signal

import keras

from lungtf.models import register_backbone
from lungtf.models.resnet import IMAGENET_PREPROCESSING, conv_bn, imagenet_preprocess


def probe(variant, input_shape):
    if variant == "raise":
        raise RuntimeError("probe variant raise fails on purpose")
    if variant == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    inputs = keras.Input(input_shape)
    x = conv_bn(conv_bn(inputs, 8, 3, 2, "stem"), 16, 3, 2, "conv")
    return keras.Model(inputs, x, name="probe")


for name in {names!r}:
    register_backbone(name, preprocess=imagenet_preprocess, from_scratch=True,
                      preprocessing=IMAGENET_PREPROCESSING, default_variant={variants[0]!r},
                      variants={variants!r}, description="a two-convolution test backbone")(probe)
'''


def probe_source(*names: str, variants: tuple[str, ...] = ("v1",)) -> str:
    """Source of a module registering backbones ``names``: two convolutions with BatchNorm (8 and
    16 channels, stride 2), from scratch, ImageNet mean/std input, ``variants`` (the first is the
    default; variant ``raise`` fails when built, ``kill`` SIGKILLs its process). Tests of what
    does not depend on the backbone use it (a real one's train step takes 30-70 CPU-seconds to
    trace): imported with ``backbones_from_module``, or run before ``python -m lungtf.train``."""
    return PROBE_SOURCE.format(names=names, listed=", ".join(names), variants=variants)


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


TINY_RUN_BACKBONES = "resnet34"
"""Backbones of the ``tiny_run`` fixture (one: each costs ~100 s of CPU to train and package)."""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished ``python -m lungtf.train`` run directory on tiny synthetic tiles (64 px).

    3 classes x 10 groups x 3 tiles with a ``groups.csv`` beside them, ``TINY_RUN_BACKBONES``
    trained from scratch for one epoch: ``splits.csv`` (grouped), ``comparison.csv``,
    ``<backbone>/best.keras``, ``best/model.keras`` + ``best/lungtf.json`` and
    ``best/saved_model/<version>``. Trained once per session; tests that change it must work on a
    copy.
    """
    from lungtf.train import main

    root = tmp_path_factory.mktemp("tiny_run")
    data = root / "lung_image_sets"
    rows = []
    for c, name in enumerate(CLASS_NAMES):
        for i in range(30):
            path = write_tile(data / name / f"{name}{i}.jpeg", seed=1000 * c + i, size=64, cls=c)
            rows.append(f"{name}/{path.name},{name},{name}-{i // 3}")
    (data / "groups.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    argv = [
        "--data", str(data), "--backbones", TINY_RUN_BACKBONES, "--image-size", "64",
        "--batch-size", "16", "--scratch-epochs", "1", "--weights", "none",
        "--output", str(root / "runs"), "--name", "tiny", "--verbose", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    (run,) = (root / "runs").glob("*-tiny")
    return run
