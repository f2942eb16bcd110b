"""Grouped and random splits, split manifests, the leak audit and the split/audit command line."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
from test_data_grouping import write_copies

from lungtf.constants import CLASS_NAMES, PROTOCOL_GROUPED, PROTOCOL_RANDOM
from lungtf.data import split as split_mod
from lungtf.data.__main__ import main
from lungtf.data.ingest import Record


def _records(groups_per_class: int = 30) -> list[Record]:
    """Records (paths need not exist for splitting) with groups of 1 to 6 images per class."""
    out = []
    for label in CLASS_NAMES:
        for g in range(groups_per_class):
            for i in range(1 + (g * 7 + len(label)) % 6):
                out.append(Record(f"/data/{label}/{g}_{i}.jpeg", label, f"{label}-{g}"))
    return out


def test_grouped_split_keeps_groups_whole_and_stratifies():
    records = _records()
    result = split_mod.make_split(records, (0.7, 0.2, 0.1), seed=3)
    assert [r.path for r in result] == [r.path for r in records]
    splits_of_group: dict[str, set[str]] = {}
    for r in result:
        splits_of_group.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of_group.values())
    for label in CLASS_NAMES:
        count = Counter(r.split for r in result if r.label == label)
        total = sum(count.values())
        for name, ratio in zip(("train", "val", "test"), (0.7, 0.2, 0.1)):
            assert abs(count[name] - ratio * total) <= 6, (label, name, count)


def test_split_is_deterministic_by_seed():
    records = _records()
    first = split_mod.make_split(records, seed=7)
    assert first == split_mod.make_split(records, seed=7)
    assert first != split_mod.make_split(records, seed=8)


def test_random_split_ignores_groups_and_meets_ratios():
    records = [Record(r.path, r.label) for r in _records()]
    result = split_mod.make_split(records, (0.5, 0.25, 0.25), seed=1, random=True)
    for label in CLASS_NAMES:
        count = Counter(r.split for r in result if r.label == label)
        total = sum(count.values())
        assert abs(count["train"] - total / 2) <= 1 and abs(count["test"] - total / 4) <= 1


def test_split_rejects_bad_ratios_and_missing_groups():
    with pytest.raises(ValueError, match=r"got \(0.5, 0.5, 0.5\)"):
        split_mod.make_split(_records(), (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="have no group"):
        split_mod.make_split([Record("/a.jpeg", "lung_n")])


def test_manifest_round_trip(tmp_path):
    records = split_mod.make_split(_records(5), seed=2)
    path = tmp_path / "splits.csv"
    split_mod.write_manifest(records, path, PROTOCOL_RANDOM)
    with open(path, newline="") as fh:
        assert next(csv.reader(fh)) == ["path", "label", "group", "split", "protocol"]
    again, protocol = split_mod.read_manifest(path)
    assert protocol == PROTOCOL_RANDOM and again == records


def test_manifest_rejects_unknown_protocol(tmp_path):
    with pytest.raises(ValueError, match="protocol must be one of"):
        split_mod.write_manifest(split_mod.make_split(_records(2)), tmp_path / "s.csv", "mixed")


def test_kfold_tests_every_group_once_and_balances_classes():
    records = _records()
    folds = split_mod.kfold(records, k=5, seed=3)
    assert len(folds) == 5
    tested_in: dict[str, list[int]] = {}
    for i, fold in enumerate(folds):
        assert [r.path for r in fold] == [r.path for r in records]
        for group in {r.group for r in fold if r.split == "test"}:
            tested_in.setdefault(group, []).append(i)
    assert tested_in.keys() == {r.group for r in records}
    assert all(len(f) == 1 for f in tested_in.values())
    for label in CLASS_NAMES:
        total = sum(r.label == label for r in records)
        for fold in folds:
            n_test = sum(r.label == label and r.split == "test" for r in fold)
            assert abs(n_test - total / 5) <= 6, (label, n_test, total)


def test_kfold_validation_carve_is_whole_training_groups():
    records = _records()
    for fold in split_mod.kfold(records, k=5, seed=1, val_fraction=0.2):
        splits_of_group: dict[str, set[str]] = {}
        for r in fold:
            splits_of_group.setdefault(r.group, set()).add(r.split)
        assert all(len(s) == 1 for s in splits_of_group.values())
        for label in CLASS_NAMES:
            val = {g for g, s in splits_of_group.items() if s == {"val"} and g.startswith(label)}
            train = {g for g, s in splits_of_group.items() if s == {"train"}
                     and g.startswith(label)}
            assert len(val) == round(0.2 * (len(val) + len(train))) and train
    no_carve = split_mod.kfold(records, k=3, seed=1, val_fraction=0)
    assert all(r.split in ("train", "test") for fold in no_carve for r in fold)


def test_kfold_is_deterministic_by_seed_and_checks_its_input():
    records = _records()
    assert split_mod.kfold(records, seed=7) == split_mod.kfold(records, seed=7)
    assert split_mod.kfold(records, seed=7) != split_mod.kfold(records, seed=8)
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        split_mod.kfold(records, k=1)
    with pytest.raises(ValueError, match="has 2 groups; 5-fold CV with a validation carve"):
        split_mod.kfold(_records(2), k=5)
    with pytest.raises(ValueError, match="have no group"):
        split_mod.kfold([Record("/a.jpeg", "lung_n")] * 6, k=2)
    with pytest.raises(ValueError, match="a source group has one label"):
        split_mod.kfold(records + [Record("/x.jpeg", "lung_n", "lung_aca-0")], k=2)


@pytest.fixture
def copies_folder(tmp_path):
    """A class-folder dataset: per class 3 sources x 5 near-duplicate copies, plus one bad file."""
    root = tmp_path / "lung_image_sets"
    for c, label in enumerate(CLASS_NAMES):
        for s in range(3):
            write_copies(root / label, seed=10 * c + s)
    (root / "lung_n" / "broken.jpeg").write_bytes(b"")
    return root


def test_cli_split_detects_groups_and_audit_finds_no_leak(copies_folder, tmp_path, capsys):
    out = tmp_path / "splits.csv"
    assert main(["split", "--data", str(copies_folder), "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "broken.jpeg" in printed and f"protocol: {PROTOCOL_GROUPED}" in printed
    assert "strictness safe" in printed and "joined by stain colour" in printed
    records, protocol = split_mod.read_manifest(out)
    assert protocol == PROTOCOL_GROUPED and len(records) == 45
    by_source: dict[str, set[str]] = {}
    for r in records:
        by_source.setdefault(r.path.rsplit("_", 1)[0], set()).add(r.group)
    assert all(len(g) == 1 for g in by_source.values()) and len(by_source) == 9
    assert main(["audit", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"protocol: {PROTOCOL_GROUPED}" in printed
    assert "cross-split near-duplicate pairs (log-polar detector): 0" in printed
    assert "keypoint-verified copy in train (independent method): 0" in printed


def test_cli_random_split_is_labelled_and_audit_finds_leak(copies_folder, tmp_path, capsys):
    out = tmp_path / "random.csv"
    assert main(["split", "--data", str(copies_folder), "--out", str(out), "--random"]) == 0
    assert "WARNING: random (leaky) split" in capsys.readouterr().out
    records, protocol = split_mod.read_manifest(out)
    assert protocol == PROTOCOL_RANDOM
    report = split_mod.audit(records)
    assert report.pairs and report.leaked > 0 and 0 < report.leak_rate <= 1
    assert main(["audit", str(out)]) == 0
    assert f"protocol: {PROTOCOL_RANDOM}" in capsys.readouterr().out


def test_cli_split_with_groups_file(copies_folder, tmp_path):
    groups = tmp_path / "groups.csv"
    rows = [(p.relative_to(copies_folder).as_posix(), p.parent.name, p.stem.rsplit("_", 1)[0])
            for p in sorted(copies_folder.rglob("src*.jpeg"))]
    with open(groups, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "group"), *rows])
    out = tmp_path / "splits.csv"
    args = ["split", "--data", str(copies_folder), "--out", str(out), "--groups", str(groups)]
    assert main(args) == 0
    records, _ = split_mod.read_manifest(out)
    assert {r.group for r in records} == {g for _, _, g in rows}
