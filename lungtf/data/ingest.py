"""Read a lung tile dataset into ``Record``s and check every file before training.

Three input layouts are accepted, so the same code reads the Kaggle download, a hand-placed copy
and a split manifest:

* a class-folder dataset: one sub-folder per class in ``CLASS_NAMES`` (LC25000's
  ``lung_image_sets/``), possibly with other files beside them (``groups.csv``, a README);
* the original LC25000 root ``lung_colon_image_set/`` holding ``lung_image_sets/`` and
  ``colon_image_sets/`` — the colon tiles are left out, as in the study, and the log says so;
* a CSV manifest ``path,label[,group[,split[,protocol]]]`` (relative paths resolve against the
  CSV's folder).

A folder whose only sub-folder holds one of those layouts (e.g. what kagglehub unpacks) is
followed down. ``check_images`` then opens every file: a broken file is reported and skipped,
so one bad tile never stops an epoch; so is an image whose header declares more than
``MAX_IMAGE_PIXELS`` (4096 x 4096), before anything is decoded.

Confinement (``confine=True``, the default): every file must lie inside the *data root*, so a
dataset cannot make training read files elsewhere. The data root is ``root`` when given, else
the class root of a folder dataset, else a manifest's own folder. A file whose resolved path
leaves the data root (a symlink leading out, a manifest row with ``..``) is refused with
``ValueError``. A manifest's absolute rows are held to ``root`` when one is given; without one
they must be canonical (no ``..``, no symlink on the way), because the split manifests lungtf
writes list absolute paths to data kept elsewhere. ``confine=False`` (``--allow-outside-root``)
turns the check off.

Colour policy: grayscale (``L``, ``LA``), palette (``P``) and alpha (``RGBA``) images are *kept*
and converted to RGB by the pipeline (``tf.io.decode_image(channels=3)`` replicates gray and drops
alpha). Other modes (CMYK, 16-bit, float) and formats other than JPEG/PNG are reported as bad.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lungtf.constants import CLASS_NAMES, MAX_IMAGE_PIXELS, SPLIT_NAMES

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpeg", ".jpg", ".png")
"""File name endings read from class folders (case-insensitive); other files are ignored."""

IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG")
"""Formats (as PIL names them) that the pipeline decodes."""

CONVERTIBLE_MODES: tuple[str, ...] = ("RGB", "L", "LA", "P", "RGBA")
"""PIL colour modes that ``decode_image(channels=3)`` turns into RGB; anything else is bad."""

LC25000_LUNG = "lung_image_sets"
LC25000_COLON = "colon_image_sets"


def within_pixel_cap(width, height, max_pixels: int = MAX_IMAGE_PIXELS):
    """True when a ``width`` x ``height`` header is at most ``max_pixels`` (and each side >= 1).

    The one size rule of ingest, the demo, the training pipeline and the exported signatures
    (``lungtf.data.pipeline.checked_size``). It takes Python ints or integer tensors: each side
    is held to ``1..max_pixels`` as well, so in int64 graphs the product is only trusted when it
    cannot wrap. A PNG header declares each side as an unsigned 32-bit number, and
    0xFFFFFFFF x 0xFFFFFFFF wraps to a negative int64 that would pass ``w * h <= max_pixels``.
    ``&`` (not ``and``) so tensors combine element-wise; for ints it is the same truth.
    """
    sides_ok = (width >= 1) & (height >= 1) & (width <= max_pixels) & (height <= max_pixels)
    return sides_ok & (width * height <= max_pixels)


@dataclass(frozen=True)
class Record:
    """One image: absolute ``path``, class ``label`` (from ``CLASS_NAMES``), optional source-tile
    ``group`` and ``split`` (``train``/``val``/``test``)."""

    path: str
    label: str
    group: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class BadFile:
    """A file that cannot be used for training, and why (a short human-readable reason)."""

    path: str
    reason: str


def load_records(
    source: str | os.PathLike, root: str | os.PathLike | None = None, confine: bool = True
) -> list[Record]:
    """Read every image of a dataset folder or CSV manifest.

    Args:
        source: a class-folder dataset, the LC25000 root, a folder holding one of these as its
            only sub-folder, or a CSV manifest ``path,label[,group[,split[,protocol]]]``.
        root: the data root every file must lie in (see the module docstring); default: the
            class root of a folder dataset, or the manifest's folder.
        confine: refuse files outside the data root (default); ``False`` reads them.

    Returns:
        Records with absolute paths; folder datasets sorted by class then path, manifests in file
        order.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: unknown class folders or labels, a manifest without ``path``/``label``
            columns, a folder that holds no class folders, or (``confine``) files outside the
            data root.
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"dataset not found: {src} (expected a folder or a CSV manifest)")
    if src.is_file():
        records = _read_csv(src)
        if confine:
            _confine(records, src, Path(root) if root is not None else None)
        return records
    class_root = find_class_root(src.resolve())
    records: list[Record] = []
    skipped = 0
    for label in sorted(p.name for p in _subdirs(class_root)):
        for path in sorted((class_root / label).rglob("*")):
            if not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                records.append(Record(str(path), label))
            else:
                skipped += 1
    if skipped:
        log.info("ignored %d non-image files (suffix not in %s) under %s", skipped,
                 ", ".join(IMAGE_SUFFIXES), class_root)
    if confine:
        inside = Path(root).resolve() if root is not None else class_root
        _refuse([r.path for r in records if not Path(r.path).resolve().is_relative_to(inside)],
                f"lead out of the data root {inside} (symlinks)")
    missing = sorted(set(CLASS_NAMES) - {r.label for r in records})
    if missing:
        log.warning("no images for class(es) %s under %s", ", ".join(missing), class_root)
    return records


def _refuse(paths: list[str], why: str) -> None:
    if paths:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise ValueError(
            f"{len(paths)} file(s) {why}: {shown}. Only files inside the data root are read; "
            "name the right root (root=, --data-root) or turn the check off "
            "(confine=False, --allow-outside-root)"
        )


def _confine(records: list[Record], manifest: Path, root: Path | None) -> None:
    """Refuse manifest rows outside the data root (see the module docstring)."""
    with open(manifest, newline="", encoding="utf-8") as fh:
        written = [Path((row.get("path") or "").strip()).expanduser() for row in csv.DictReader(fh)]
    inside = (root or manifest.parent).resolve()
    outside = []
    for as_written, record in zip(written, records):
        real = Path(record.path)
        if as_written.is_absolute() and root is None:
            if ".." in as_written.parts or os.path.abspath(as_written) != str(real):  # a symlink
                outside.append(str(as_written))
        elif not real.is_relative_to(inside):
            outside.append(str(as_written))
    _refuse(outside, f"of {manifest} lie outside the data root {inside}")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_class_root(folder: Path, depth: int = 0) -> Path:
    """Return the folder whose sub-folders are the classes.

    Follows the LC25000 root (``lung_image_sets/``, colon left out) and folders whose only
    sub-folder holds the dataset (as kagglehub unpacks it), at most three levels down.

    Raises:
        ValueError: unknown class folders, or no class folders at all.
    """
    subdirs = _subdirs(folder)
    names = [p.name for p in subdirs]
    if any(n in CLASS_NAMES for n in names):
        unknown = [n for n in names if n not in CLASS_NAMES]
        if unknown:
            raise ValueError(
                f"unknown class folder(s) {unknown} in {folder} (found {names}); "
                f"allowed class folders are {', '.join(CLASS_NAMES)}"
            )
        return folder
    if LC25000_LUNG in names:
        if LC25000_COLON in names:
            log.info("LC25000 root %s: using %s/, leaving out %s/ (colon tiles, as in the study)",
                     folder, LC25000_LUNG, LC25000_COLON)
        return find_class_root(folder / LC25000_LUNG, depth + 1)
    if len(subdirs) == 1 and depth < 3:
        return find_class_root(subdirs[0], depth + 1)
    raise ValueError(
        f"no class folders in {folder} (found sub-folders {names}); expected one sub-folder per "
        f"class ({', '.join(CLASS_NAMES)}), the LC25000 root with {LC25000_LUNG}/, "
        f"or a CSV manifest path,label[,group]"
    )


def _read_csv(path: Path) -> list[Record]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if "path" not in columns or "label" not in columns:
            raise ValueError(
                f"manifest {path} has columns {columns}; it needs path,label "
                f"and may add group,split,protocol"
            )
        rows = list(reader)
    records = []
    for line, row in enumerate(rows, start=2):
        label, split = row["label"].strip(), (row.get("split") or "").strip() or None
        if label not in CLASS_NAMES:
            raise ValueError(
                f"{path}:{line}: unknown label {label!r}; allowed are {', '.join(CLASS_NAMES)}"
            )
        if split is not None and split not in SPLIT_NAMES:
            raise ValueError(
                f"{path}:{line}: unknown split {split!r}; allowed are {', '.join(SPLIT_NAMES)}"
            )
        file = Path(row["path"].strip()).expanduser()
        file = file if file.is_absolute() else path.parent / file
        group = (row.get("group") or "").strip() or None
        records.append(Record(str(file.resolve()), label, group, split))
    return records


def check_image(
    path: str, min_side: int = 32, max_pixels: int = MAX_IMAGE_PIXELS
) -> str | None:
    """Return why ``path`` cannot be trained on, or ``None`` when it is usable.

    The size is read from the header first: an image above ``max_pixels`` is refused before it
    is decoded. Otherwise the whole image is decoded (JPEGs at 1/8 scale via PIL's ``draft``,
    which still reads every byte of the compressed data), so truncated files are caught, not
    only bad headers.
    """
    try:
        size = os.path.getsize(path)
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as img:
            if img.format not in IMAGE_FORMATS:
                return f"format {img.format} is not one of {', '.join(IMAGE_FORMATS)}"
            if img.mode not in CONVERTIBLE_MODES:
                return f"colour mode {img.mode} is not RGB or convertible to RGB"
            width, height = img.size
            if min(width, height) < min_side:
                return f"too small: {width}x{height} px (smallest side must be >= {min_side})"
            if not within_pixel_cap(width, height, max_pixels):
                return f"too large: {width}x{height} px (at most {max_pixels} pixels)"
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except UnidentifiedImageError:
        return "not an image (unrecognised content)"
    except Image.DecompressionBombError:  # PIL's own limit, above ours: refused at open
        return f"too large: more than {max_pixels} pixels"
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot decode: {err}"
    return None


def check_images(
    records: list[Record], min_side: int = 32, workers: int | None = None
) -> tuple[list[Record], list[BadFile]]:
    """Open every file in parallel threads and split the records into usable and bad.

    Args:
        records: what ``load_records`` returned.
        min_side: images whose smaller side is below this many pixels are reported as too small.
        workers: decoding threads (PIL releases the GIL while decoding); default CPU count + 2.

    Returns:
        ``(good, bad)``: good records in input order, and one ``BadFile`` per unusable file.
    """
    workers = workers or (os.cpu_count() or 1) + 2
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda r: check_image(r.path, min_side), records, chunksize=64))
    good = [r for r, why in zip(records, reasons) if why is None]
    bad = [BadFile(r.path, why) for r, why in zip(records, reasons) if why is not None]
    for b in bad:
        log.warning("skipping %s: %s", b.path, b.reason)
    return good, bad


def write_bad_report(bad: list[BadFile], path: str | os.PathLike) -> None:
    """Write the bad files as a ``path,reason`` CSV (a header only when none are bad)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason"])
        writer.writerows((b.path, b.reason) for b in bad)


def read_bad_report(path: str | os.PathLike) -> list[BadFile]:
    """The bad files of a ``path,reason`` CSV that ``write_bad_report`` wrote, in its order."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [BadFile(row["path"], row["reason"]) for row in csv.DictReader(fh)]


def _check_command(args: argparse.Namespace) -> int:
    records = load_records(args.data, args.data_root, confine=not args.allow_outside_root)
    good, bad = check_images(records, min_side=args.min_side)
    total, usable = Counter(r.label for r in records), Counter(r.label for r in good)
    print(f"{'class':<10} {'files':>7} {'usable':>7} {'bad':>5}")
    for name in CLASS_NAMES:
        print(f"{name:<10} {total[name]:>7} {usable[name]:>7} {total[name] - usable[name]:>5}")
    print(f"{'total':<10} {len(records):>7} {len(good):>7} {len(bad):>5}")
    for b in bad:
        print(f"bad: {b.path}: {b.reason}")
    if args.report:
        write_bad_report(bad, args.report)
        print(f"bad-file report written to {args.report}")
    if not good:
        print(f"no usable images in {args.data}")
        return 1
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``check``: count images per class and list the files training would skip."""
    p = subparsers.add_parser(
        "check", help="check every image (decodable JPEG/PNG, RGB-convertible, not tiny)",
        description="Open every image of a dataset and report the ones training would skip.",
    )
    p.add_argument("--data", required=True,
                   help="class-folder dataset, LC25000 root, or CSV manifest path,label[,group]")
    p.add_argument("--report", help="write the bad files as a path,reason CSV here")
    p.add_argument("--min-side", type=int, default=32,
                   help="smallest allowed image side in pixels (default 32)")
    p.add_argument("--data-root",
                   help="folder every file must lie in (default: the class root, or the "
                        "manifest's folder)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read files outside the data root (symlinks or manifest rows leading out)")
    p.set_defaults(func=_check_command)
