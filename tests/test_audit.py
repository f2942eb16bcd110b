"""The leak audit's independent keypoint method on real LC25000 tiles (copies across splits)."""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest

from lungtf.data import split as split_mod
from lungtf.data.ingest import Record


@pytest.fixture(scope="module")
def few_groups(shared_data) -> list[Record]:
    """3 whole source-tile groups per class of the shared tiles (~180 tiles), with true groups."""
    by_group = defaultdict(list)
    with open(shared_data / "groups.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_group[row["label"], row["group"]].append(
                Record(str(shared_data / row["path"]), row["label"], row["group"]))
    chosen = []
    for label in sorted({label for label, _ in by_group}):
        groups = sorted(g for lab, g in by_group if lab == label)[:3]
        chosen += [r for g in groups for r in by_group[label, g]]
    return chosen


def _split_by_group(records: list[Record], test_groups: set[str], seed: int) -> list[Record]:
    """Half the test groups' tiles go to train at random (a leak); the others are whole."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        if r.group in test_groups:
            out.append(replace(r, split="test" if rng.random() < 0.5 else "train"))
        else:
            out.append(replace(r, split="train"))
    return out


def test_keypoint_audit_finds_the_copies_a_split_leaks(few_groups, tmp_path):
    groups = sorted({r.group for r in few_groups})
    leaky, whole = set(groups[0::3]), set(groups[1::3])  # the rest: whole in train
    records = []
    for r in _split_by_group(few_groups, leaky, seed=0):
        records.append(replace(r, split="test") if r.group in whole else r)
    report = split_mod.audit(records)
    copies = {path: train for path, split, train, _ in report.copies if split == "test"}
    group_of = {r.path: r.group for r in records}
    twins = [r.path for r in records if r.split == "test" and r.group in leaky]
    alone = [r.path for r in records if r.split == "test" and r.group in whole]
    assert twins and alone
    found = [p for p in twins if p in copies]
    assert len(found) >= 0.95 * len(twins)
    assert all(group_of[copies[p]] == group_of[p] for p in copies)  # no false pair
    assert not any(p in copies for p in alone)
    assert set(report.clean_test) >= set(alone) and not set(report.clean_test) & set(found)
    assert report.leaked >= len(found) and report.group_leaked == len(twins)

    split_mod.write_audit(report, tmp_path / "copies.csv")
    split_mod.draw_copies(report, tmp_path / "copies.png", limit=4)
    with open(tmp_path / "copies.csv", newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == len(report.copies)
    assert (tmp_path / "copies.png").stat().st_size > 1000


def test_audit_command_writes_copies_and_thumbnails(few_groups, tmp_path, capsys):
    records = split_mod.make_split(few_groups[:60] + few_groups[-60:], seed=3, random=True)
    manifest = tmp_path / "random.csv"
    split_mod.write_manifest(records, manifest, split_mod.PROTOCOL_RANDOM)
    from lungtf.data.__main__ import main

    assert main(["audit", str(manifest), "--copies", str(tmp_path / "c.csv"),
                 "--png", str(tmp_path / "c.png")]) == 0
    printed = capsys.readouterr().out
    assert "keypoint-verified copy in train" in printed and "clean test images" in printed
    assert (tmp_path / "c.csv").is_file() and (tmp_path / "c.png").is_file()


def test_keypoint_lookup_gives_the_same_pairs_every_run(shared_data):
    """``cross_matches`` is reproducible: the same images give the same best candidate and inliers
    on every call and in any thread (FLANN's randomised trees are built from a fixed seed).

    Queries from one source tile against four others: no true copy, so every answer is a
    chance-level match among near-tied candidates, the most sensitive case (on the unseeded
    index most answers changed from one call to the next)."""
    from concurrent.futures import ThreadPoolExecutor

    from lungtf.data import keypoints

    with open(shared_data / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "lung_n"]
    groups = sorted({r["group"] for r in rows})[:4]
    rows = [r for r in rows if r["group"] in groups]
    sift = keypoints.SiftCache([str(shared_data / r["path"]) for r in rows], 2)
    group = np.array([r["group"] for r in rows])
    queries, database = np.flatnonzero(group == groups[0])[::3], np.flatnonzero(group != groups[0])

    def lookup() -> list[tuple[int, int, int]]:
        return keypoints.cross_matches(sift, queries, database, min_inliers=0)

    first = lookup()
    again = lookup()  # the first call moved this thread's OpenCV RNG on
    with ThreadPoolExecutor(1) as pool:  # a fresh thread starts from the RNG's initial state
        elsewhere = pool.submit(lookup).result()
    assert len(first) == len(queries) and first == again == elsewhere
