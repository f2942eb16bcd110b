"""Ingest: the three input layouts, the unknown-class error, and the broken-file checks."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import png_bomb, write_tile
from PIL import Image

from lungtf.constants import CLASS_NAMES
from lungtf.data.ingest import (
    BadFile,
    Record,
    check_image,
    check_images,
    load_records,
    write_bad_report,
)


def test_class_folder_layout(tiny_folder: Path):
    records = load_records(tiny_folder)
    assert len(records) == 24
    assert [r.label for r in records] == [c for c in CLASS_NAMES for _ in range(8)]
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in records)
    assert records == sorted(records, key=lambda r: (CLASS_NAMES.index(r.label), r.path))
    assert records[0] == Record(str(tiny_folder / "lung_aca" / "lung_aca0.jpeg"), "lung_aca")


def test_extra_files_beside_class_folders_and_nesting(tiny_folder: Path):
    (tiny_folder / "groups.csv").write_text("path,label,group\n")
    (tiny_folder / "lung_n" / "notes.txt").write_text("not an image")
    outer = tiny_folder.parent
    assert load_records(outer) == load_records(tiny_folder)  # followed one level down
    assert len(load_records(tiny_folder)) == 24


def test_lc25000_root_leaves_colon_out(tiny_folder: Path, caplog):
    root = tiny_folder.parent / "lung_colon_image_set"
    root.mkdir()
    tiny_folder.rename(root / "lung_image_sets")
    write_tile(root / "colon_image_sets" / "colon_aca" / "colonca1.jpeg", seed=1)
    with caplog.at_level(logging.INFO, logger="lungtf.data.ingest"):
        records = load_records(root)
    assert len(records) == 24
    assert {r.label for r in records} == set(CLASS_NAMES)
    assert "colon_image_sets" in caplog.text and "leaving out" in caplog.text


def test_unknown_class_folder_is_an_error(tiny_folder: Path):
    write_tile(tiny_folder / "colon_n" / "x.jpeg", seed=3)
    with pytest.raises(ValueError) as err:
        load_records(tiny_folder)
    message = str(err.value)
    assert "colon_n" in message
    assert all(name in message for name in CLASS_NAMES)


def test_folder_without_classes_is_an_error(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"no class folders.*\['a', 'b'\]"):
        load_records(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_records(tmp_path / "nowhere")


def test_csv_manifest_relative_and_absolute_paths(tiny_folder: Path, tmp_path: Path):
    manifest = tiny_folder.parent / "manifest.csv"
    absolute = str(tiny_folder / "lung_scc" / "lung_scc3.jpeg")
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "split", "protocol"])
        w.writerow(["lung_image_sets/lung_n/lung_n1.jpeg", "lung_n", "g1", "val", "grouped"])
        w.writerow([absolute, "lung_scc", "", "", "grouped"])
    records = load_records(manifest)
    assert records == [
        Record(str(tiny_folder / "lung_n" / "lung_n1.jpeg"), "lung_n", "g1", "val"),
        Record(absolute, "lung_scc", None, None),
    ]
    plain = tmp_path / "plain.csv"
    plain.write_text(f"path,label\n{absolute},lung_scc\n")
    assert load_records(plain) == [Record(absolute, "lung_scc")]


@pytest.mark.parametrize(
    "text, match",
    [
        ("path,label\nx.jpeg,colon_aca\n", "unknown label 'colon_aca'.*lung_aca, lung_n, lung_scc"),
        ("path,label,split\nx.jpeg,lung_n,holdout\n", "unknown split 'holdout'.*train, val, test"),
        ("file,class\nx.jpeg,lung_n\n", r"columns \['file', 'class'\].*path,label"),
    ],
)
def test_bad_manifest_is_an_error(tmp_path: Path, text: str, match: str):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_records(manifest)


def _broken_files(folder: Path) -> dict[str, str | None]:
    """Write one file of each kind into ``folder``; map name -> expected reason prefix (None: ok)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = write_tile(folder / "good.jpeg", seed=7, size=48)
    data = good.read_bytes()
    (folder / "truncated.jpeg").write_bytes(data[: len(data) // 2])
    (folder / "zero.jpeg").write_bytes(b"")
    (folder / "text.jpeg").write_text("this is not a JPEG\n")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48), np.uint8)).save(folder / "gray.jpeg")
    Image.fromarray(rng.integers(0, 255, (48, 48, 4), np.uint8)).save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (16, 48, 3), np.uint8)).save(folder / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).convert("CMYK").save(
        folder / "cmyk.jpeg"
    )
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(
        folder / "gif.png", format="GIF"
    )
    return {
        "good.jpeg": None,
        "gray.jpeg": None,  # kept: decode_image(channels=3) replicates the gray channel
        "alpha.png": None,  # kept: decode_image(channels=3) drops the alpha channel
        "truncated.jpeg": "cannot decode",
        "zero.jpeg": "empty file",
        "text.jpeg": "not an image",
        "tiny.png": "too small: 48x16",
        "cmyk.jpeg": "colour mode CMYK",
        "gif.png": "format GIF",
    }


def test_broken_files_are_reported_and_skipped(tmp_path: Path):
    expected = _broken_files(tmp_path / "lung_aca")
    records = load_records(tmp_path)
    assert len(records) == len(expected)
    good, bad = check_images(records)
    reasons = {Path(b.path).name: b.reason for b in bad}
    for name, reason in expected.items():
        if reason is None:
            assert name not in reasons
            assert check_image(str(tmp_path / "lung_aca" / name)) is None
        else:
            assert reasons[name].startswith(reason), (name, reasons[name])
    assert sorted(Path(r.path).name for r in good) == sorted(
        n for n, why in expected.items() if why is None
    )
    report = tmp_path / "bad.csv"
    write_bad_report(bad, report)
    with open(report, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [BadFile(r["path"], r["reason"]) for r in rows] == bad


def test_min_side_and_missing_file(tmp_path: Path):
    path = write_tile(tmp_path / "a.png", seed=1, size=40)
    assert check_image(str(path), min_side=32) is None
    assert check_image(str(path), min_side=64).startswith("too small: 40x40")
    assert check_image(str(tmp_path / "gone.png")).startswith("cannot read")


def test_shared_real_tiles(shared_data: Path):
    records = load_records(shared_data)  # groups.csv and README.md sit beside the class folders
    assert len(records) == 6036
    assert {r.label for r in records} == set(CLASS_NAMES)
    assert records == sorted(records, key=lambda r: r.path)


def test_cli_check(tmp_path: Path, capsys):
    from lungtf.data.__main__ import main

    _broken_files(tmp_path / "data" / "lung_scc")
    write_tile(tmp_path / "data" / "lung_aca" / "a.jpeg", seed=1)
    report = tmp_path / "bad_files.csv"
    assert main(["check", "--data", str(tmp_path / "data"), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert lines["lung_aca"] == ["1", "1", "0"]
    assert lines["lung_scc"] == ["9", "3", "6"]
    assert lines["total"] == ["10", "4", "6"]
    assert f"bad: {tmp_path / 'data' / 'lung_scc' / 'zero.jpeg'}: empty file (0 bytes)" in out
    with open(report, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6


def test_cli_check_without_usable_images(tmp_path: Path, capsys):
    from lungtf.data.__main__ import main

    (tmp_path / "lung_n").mkdir()
    (tmp_path / "lung_n" / "empty.png").write_bytes(b"")
    assert main(["check", "--data", str(tmp_path)]) == 1
    assert "no usable images" in capsys.readouterr().out


def test_files_outside_the_data_root_are_refused(tiny_folder: Path, tmp_path: Path):
    """Symlinks leading out of a folder dataset, and manifest rows with ``..`` or a symlink on
    the way, are refused by default; ``root`` also holds absolute rows; ``confine=False`` reads."""
    outside = write_tile(tmp_path / "elsewhere" / "secret.jpeg", seed=5)
    (tiny_folder / "lung_n" / "link.jpeg").symlink_to(outside)
    with pytest.raises(ValueError, match=r"1 file\(s\) lead out of the data root.*link.jpeg"):
        load_records(tiny_folder)
    assert len(load_records(tiny_folder, confine=False)) == 25
    (tiny_folder / "lung_n" / "link.jpeg").unlink()
    (tiny_folder / "lung_n" / "more").symlink_to(outside.parent, target_is_directory=True)
    assert len(load_records(tiny_folder)) == 24  # a symlinked folder is not walked into
    (tiny_folder / "lung_n" / "more").unlink()
    (tiny_folder / "via-link").symlink_to(outside.parent, target_is_directory=True)
    inside = tiny_folder / "lung_aca" / "lung_aca0.jpeg"
    manifest = tiny_folder / "m.csv"
    for row in ("../elsewhere/secret.jpeg", str(tiny_folder / "via-link" / "secret.jpeg"),
                str(tiny_folder / "lung_aca" / ".." / ".." / "elsewhere" / "secret.jpeg")):
        manifest.write_text(f"path,label\nlung_aca/lung_aca0.jpeg,lung_aca\n{row},lung_n\n")
        with pytest.raises(ValueError, match="lie outside the data root"):
            load_records(manifest)
        assert [r.path for r in load_records(manifest, confine=False)][1] == str(outside)
    manifest.write_text(f"path,label\n{inside},lung_aca\n{outside},lung_n\n")
    assert len(load_records(manifest)) == 2  # canonical absolute rows, as split manifests hold
    with pytest.raises(ValueError, match=r"1 file\(s\).*secret.jpeg"):
        load_records(manifest, root=tiny_folder)


def test_huge_images_are_refused_from_their_header(tmp_path: Path):
    big = tmp_path / "big.png"
    Image.new("L", (5000, 5000)).save(big)  # 25 M pixels: PIL opens it without complaint
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())  # 20000 x 20000 in 389 KB
    start = time.monotonic()
    assert check_image(str(big)) == "too large: 5000x5000 px (at most 16777216 pixels)"
    assert check_image(str(bomb)).startswith("too large")
    assert time.monotonic() - start < 1  # neither was decoded
    assert check_image(str(big), max_pixels=25_000_000) is None


def test_cli_check_allows_outside_root_on_request(tiny_folder: Path, tmp_path: Path, capsys):
    from lungtf.data.__main__ import main

    (tiny_folder / "lung_n" / "link.jpeg").symlink_to(write_tile(tmp_path / "x.jpeg", seed=9))
    with pytest.raises(ValueError, match="lead out of the data root"):
        main(["check", "--data", str(tiny_folder)])
    assert main(["check", "--data", str(tiny_folder), "--allow-outside-root"]) == 0
    assert "total           25      25     0" in capsys.readouterr().out
