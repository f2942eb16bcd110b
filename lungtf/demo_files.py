"""The files the web demo opens and serves: example tiles and thumbnails.

The page may serve exactly its example files, so each must be a JPEG/PNG (by suffix and by
header) whose resolved path lies inside its example folder, or inside the run's data root for a
run's test tiles; a symlink or ``..`` leading elsewhere is skipped. Thumbnails open only JPEG and
PNG, refuse images above ``MAX_IMAGE_PIXELS`` from the header, and shrink while decoding.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from lungtf.client import IMAGE_SUFFIXES
from lungtf.constants import CLASS_NAMES
from lungtf.data.ingest import within_pixel_cap

IMAGE_FORMATS = ("JPEG", "PNG")
"""What the page opens itself (thumbnails, examples); the server decodes the same two."""


def thumbnail_uri(path: str | Path, size: int = 96) -> str | None:
    """A small JPEG ``data:`` URI of an image file, or ``None`` when it cannot be shown here.

    Only JPEG and PNG are opened, the size is read from the header and anything above
    ``MAX_IMAGE_PIXELS`` is refused before decoding; JPEGs decode at a reduced scale (``draft``)
    and every image shrinks before it is converted to RGB.
    """
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            if not within_pixel_cap(img.width, img.height):
                return None
            img.draft("RGB", (size, size))  # JPEG: decode at 1/2..1/8 scale; PNG: no effect
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def interleave(groups: dict[str, list[Path]], prefix: str, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` ``(absolute path, prefix + group)`` pairs, one tile of each group in turn
    (groups and tiles sorted), so every class appears among the first examples."""
    queues = [(name, sorted(paths)) for name, paths in sorted(groups.items())]
    picked: list[tuple[str, str]] = []
    for i in range(max((len(q) for _, q in queues), default=0)):
        picked += [(str(q[i].resolve()), prefix + name) for name, q in queues if i < len(q)]
    return picked[:limit]


def is_example_tile(path: Path, root: Path) -> bool:
    """True for a JPEG/PNG file (by suffix and by header) whose resolved path lies inside
    ``root`` (resolved): a symlink or ``..`` leading elsewhere is not an example."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    try:
        real = path.resolve(strict=True)
        if not (real.is_file() and real.is_relative_to(root.resolve())):
            return False
        with Image.open(real, formats=IMAGE_FORMATS):
            return True
    except (OSError, ValueError, RuntimeError):  # missing, unreadable, not JPEG/PNG, link loop
        return False


def run_data_root(run_dir: Path, data_root: str | Path | None) -> Path:
    """Where a run's test tiles must lie: ``data_root``, else the data root of its
    ``config.yaml`` (``data.data_root``, else ``data.data``).

    Raises:
        FileNotFoundError: when neither names an existing folder or CSV manifest.
    """
    import yaml

    if data_root is None and (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        data = config.get("data") or {}
        data_root = data.get("data_root") or data.get("data")
    root = Path(data_root) if data_root else None
    if root is None or not root.exists():
        raise FileNotFoundError(
            f"--run {run_dir}: its config.yaml names no data folder ({root or 'none'}); pass "
            "--data-root DIR, the folder its test tiles must lie in"
        )
    return root if root.is_dir() else root.parent


def find_examples(
    folders: Sequence[str | Path] = (),
    run_dir: str | Path | None = None,
    per_source: int = 6,
    data_root: str | Path | None = None,
) -> list[tuple[str, str]]:
    """Example tiles as ``(resolved path, caption)``: from image folders and a run's test split.

    Only ``is_example_tile`` files are taken, so the page can serve exactly these files.

    Args:
        folders: folders of JPEG/PNG tiles, searched recursively (a class folder, or a root with
            one sub-folder per class); captioned with the folder that holds each tile.
        run_dir: a training run directory; tiles of its ``splits.csv`` with ``split == test``,
            captioned ``test: <label>``. Relative paths resolve against the run directory.
        per_source: the most examples taken from each folder and from the run, alternating
            between sub-folders or classes.
        data_root: the folder the run's tiles must lie in (default: the data of its
            ``config.yaml``).

    Raises:
        FileNotFoundError: a folder, run directory, its ``splits.csv`` or its data root does not
            exist.
    """
    out: list[tuple[str, str]] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"--examples folder not found: {folder}")
        by_folder: dict[str, list[Path]] = {}
        for path in folder.rglob("*"):
            if is_example_tile(path, folder):
                by_folder.setdefault(path.parent.name, []).append(path)
        out += interleave(by_folder, "", per_source)
    if run_dir is not None:
        manifest = Path(run_dir) / "splits.csv"
        if not manifest.is_file():
            raise FileNotFoundError(f"--run needs a run directory with splits.csv; got {run_dir}")
        root = run_data_root(Path(run_dir), data_root)
        by_label: dict[str, list[Path]] = {}
        with open(manifest, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("split") == "test" and row.get("label") in CLASS_NAMES:
                    path = Path(row["path"])
                    path = path if path.is_absolute() else manifest.parent / path
                    if is_example_tile(path, root):
                        by_label.setdefault(row["label"], []).append(path)
        out += interleave(by_label, "test: ", per_source)
    return out
