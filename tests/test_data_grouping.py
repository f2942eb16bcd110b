"""Near-duplicate grouping on real files: synthetic rotated/flipped/cropped copies, and LC25000."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import lc25000_copy, two_benign_sources
from PIL import Image, ImageEnhance
from scipy import ndimage
from sklearn.metrics import adjusted_rand_score

from lungtf.constants import CLASS_NAMES
from lungtf.data import grouping, keypoints
from lungtf.data.ingest import Record
from lungtf.data.split import make_split


def _texture(seed: int, size: int) -> Image.Image:
    """A random smooth RGB texture with a per-seed tint (stand-in for a source tile)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(size, size, 3)), (2, 2, 0))
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    tint = rng.uniform(0.5, 1.0, 3)
    return Image.fromarray((255 * noise * tint).astype(np.uint8))


def _variants(src: Image.Image) -> list[Image.Image]:
    """The source plus copies rotated (PIL, up to 25 degrees), flipped, cropped and brightened."""
    side = src.size[0]
    cropped = src.crop((4, 4, side - 4, side - 4)).resize(src.size, Image.BILINEAR)
    return [
        src,
        src.rotate(20, Image.BILINEAR),
        src.rotate(-25, Image.BILINEAR).transpose(Image.FLIP_LEFT_RIGHT),
        ImageEnhance.Brightness(src.transpose(Image.FLIP_TOP_BOTTOM)).enhance(1.15),
        cropped.transpose(Image.ROTATE_90).rotate(8, Image.BILINEAR),
    ]


def write_copies(folder: Path, seed: int, size: int = 96, copies: int = 5) -> list[Path]:
    """Write ``copies`` near-duplicate JPEGs of one random source into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(_variants(_texture(seed, size))[:copies]):
        paths.append(folder / f"src{seed}_{i}.jpeg")
        image.save(paths[-1], quality=92)
    return paths


def test_copies_are_grouped_exactly(tmp_path):
    paths, truth = [], []
    for seed in range(4):
        new = write_copies(tmp_path, seed)
        paths += [str(p) for p in new]
        truth += [seed] * len(new)
    found = grouping.detect_groups(paths)
    assert adjusted_rand_score(truth, found) == 1.0
    assert len(set(found)) == 4


def test_distinct_images_stay_apart(tmp_path):
    paths = []
    for seed in range(10, 16):
        path = tmp_path / f"distinct{seed}.jpeg"
        _texture(seed, 96).save(path, quality=92)
        paths.append(str(path))
    assert len(set(grouping.detect_groups(paths))) == 6
    pairs, scores = grouping.near_duplicates(paths)
    assert len(pairs) == 0 and len(scores) == 0


def test_groups_never_span_labels_and_are_named_by_label(tmp_path):
    paths = [str(p) for p in write_copies(tmp_path, seed=3, copies=4)]
    labels = ["lung_aca", "lung_aca", "lung_n", "lung_n"]
    found = grouping.detect_groups(paths, labels)
    assert found[0] == found[1] and found[2] == found[3] and found[0] != found[2]
    assert found[0].startswith("lung_aca-") and found[2].startswith("lung_n-")


def test_near_duplicate_pairs_are_ordered_and_scored(tmp_path):
    paths = [str(p) for p in write_copies(tmp_path, seed=5)]
    pairs, scores = grouping.near_duplicates(paths)
    assert len(pairs) >= len(paths) - 1
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert (scores > grouping.LOW_THRESHOLD).all() and scores.max() > 0.8


def test_labels_must_match_paths(tmp_path):
    paths = [str(p) for p in write_copies(tmp_path, seed=1, copies=2)]
    with pytest.raises(ValueError, match="1 labels for 2 paths"):
        grouping.detect_groups(paths, ["lung_n"])


@pytest.fixture(scope="module")
def lc25000_groups(shared_data):
    """Automatic groups on every third true group of the shared tiles (~2,000 of 6,036, for time)."""
    with open(shared_data / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    keep = sorted({r["group"] for r in rows})[::3]
    rows = [r for r in rows if r["group"] in set(keep)]
    paths = [str(shared_data / r["path"]) for r in rows]
    labels = [r["label"] for r in rows]
    return rows, paths, labels, grouping.detect_groups(paths, labels)


def test_lc25000_adjusted_rand_index_per_class(lc25000_groups):
    rows, _, labels, found = lc25000_groups
    for name in CLASS_NAMES:
        truth = [r["group"] for r in rows if r["label"] == name]
        mine = [f for f, lab in zip(found, labels) if lab == name]
        assert adjusted_rand_score(truth, mine) >= 0.90, name


def _true_leaks(lc25000_groups, seeds: int = 5) -> list[float]:
    """Leak of automatic 70/20/10 splits measured with the TRUE groups, one value per seed."""
    rows, paths, labels, found = lc25000_groups
    truth = {p: r["group"] for p, r in zip(paths, rows)}
    records = [Record(p, lab, g) for p, lab, g in zip(paths, labels, found)]
    leaks = []
    for seed in range(seeds):
        split = make_split(records, seed=seed)
        train = {truth[r.path] for r in split if r.split == "train"}
        test = [r for r in split if r.split == "test"]
        leaks.append(sum(truth[r.path] in train for r in test) / len(test))
    return leaks


def test_lc25000_leak_goal_half_percent(lc25000_groups):
    """The issue's goal, on every seed: leak <= 0.5% (a random split leaks ~100% here)."""
    leaks = _true_leaks(lc25000_groups)
    assert max(leaks) <= 0.005, leaks


def _offcentre_zoom(src: Image.Image) -> Image.Image:
    """An off-centre 1.7x zoom of ``src``, rotated 90 degrees and mirrored (no shared centre)."""
    side = src.size[0]
    box = (side // 8, side // 4, side // 8 + side * 10 // 17, side // 4 + side * 10 // 17)
    zoomed = src.crop(box).resize(src.size, Image.BICUBIC)
    return zoomed.transpose(Image.ROTATE_90).transpose(Image.FLIP_LEFT_RIGHT)


def test_mirrored_descriptors_match_descriptors_of_the_mirrored_image(tmp_path):
    _texture(7, 224).save(tmp_path / "a.png")
    _texture(7, 224).transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "b.png")
    points, desc = keypoints._sift(str(tmp_path / "a.png"))
    points_m, desc_m = keypoints._sift(str(tmp_path / "b.png"))
    points_m[:, 0] = keypoints.SIZE - 1 - points_m[:, 0]

    def located(query: np.ndarray) -> float:
        """Share of ``query`` descriptors whose nearest mirrored-image descriptor sits at the
        mirrored position of the keypoint (within 1 px)."""
        nearest = np.linalg.norm(query[:, None] - desc_m[None], axis=2).argmin(1)
        return float(np.mean(np.linalg.norm(points[:, :2] - points_m[nearest, :2], axis=1) < 1))

    assert located(desc[:, keypoints._MIRROR]) > 0.6
    assert located(desc) < 0.3


def test_keypoints_join_an_offcentre_zoomed_copy_and_nothing_else(tmp_path):
    paths = [str(p) for p in write_copies(tmp_path, seed=21, size=224)]
    zoomed, other = tmp_path / "zoomed.png", tmp_path / "other.png"
    _offcentre_zoom(_texture(21, 224)).save(zoomed)
    _texture(22, 224).save(other)
    paths += [str(zoomed), str(other)]
    component = np.array([0, 0, 0, 0, 0, 1, 2])
    links = keypoints.link_groups(keypoints.SiftCache(paths, 1), [np.arange(7)], component, small=5)
    joined = grouping.components(np.concatenate([np.stack([np.zeros(5, int), np.arange(5)], 1),
                                                 links]), 7)
    assert joined[5] == joined[0] and joined[6] != joined[0]


def test_strictness_trades_merging_for_purity_and_stages_are_counted(tmp_path):
    """Unmatched small groups: ``safe`` merges them by stain colour, ``strict`` never; every
    stage's joins are counted, and an unknown strictness is refused with the allowed names."""
    paths = []
    for s in range(3):  # three sources with five copies each ...
        paths += [str(p) for p in write_copies(tmp_path / "a", seed=s)]
    for s in range(3, 6):  # ... and lone images that match nothing
        paths.append(str(write_copies(tmp_path / "b", seed=s, copies=1)[0]))
    labels = ["lung_n"] * len(paths)
    safe_stages, strict_stages = {}, {}
    safe = grouping.detect_groups(paths, labels, stages=safe_stages)
    strict = grouping.detect_groups(paths, labels, strictness="strict", stages=strict_stages)
    assert len(set(strict)) > len(set(safe))
    for stages, found in ((safe_stages, safe), (strict_stages, strict)):
        joined = sum(v for k, v in stages.items() if k.startswith("joined"))
        assert stages["log-polar groups"] - joined == stages["groups"] == len(set(found))
    assert strict_stages["joined by stain colour"] == 0 < safe_stages["joined by stain colour"]
    with pytest.raises(ValueError, match="strict"):
        grouping.detect_groups(paths, labels, strictness="loose")


def test_zoomed_rotated_mirror_bordered_copies_of_real_tiles_join_their_source(shared_data,
                                                                                 tmp_path):
    """Copies of three real benign source tiles (zoomed 1.6-2.5x off-centre, rotated by any
    angle, kaleidoscope corners, flipped; one only rotated with mirrored corners) each join their
    source's group, and the three sources stay three groups (merging everything would fail).

    Sources from the tuning third of the shared groups. Before the soft-image gate the
    upsampled copies correlated with other sources' tiles and merged two of the three sources."""
    import cv2

    with open(shared_data / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "lung_n"]
    sources = sorted({r["group"] for r in rows})[:9:3]
    reflect, reflect101 = cv2.BORDER_REFLECT, cv2.BORDER_REFLECT_101
    specs = [(2.0, 37, (0.3, -0.2), (True, False), reflect),
             (1.6, 200, (-0.4, 0.3), (False, True), reflect101),
             (2.5, 123, (0.5, 0.5), (True, True), reflect),
             (1.0, 70, (0.0, 0.0), (False, False), reflect101),
             (1.8, 300, (-0.6, -0.5), (False, True), reflect)]
    paths, truth, copy = [], [], []
    for source in sources:
        members = [str(shared_data / r["path"]) for r in rows if r["group"] == source]
        paths += members
        truth += [source] * len(members)
        copy += [False] * len(members)
        with Image.open(members[0]) as im:
            image = np.asarray(im.convert("RGB"))
        for i, spec in enumerate(specs):
            path = tmp_path / f"{source}-copy{i}.jpeg"
            Image.fromarray(lc25000_copy(image, *spec)).save(path, quality=90)
            paths.append(str(path))
            truth.append(source)
            copy.append(True)
    found = grouping.detect_groups(paths, ["lung_n"] * len(paths))
    of_source = {s: {f for f, t, c in zip(found, truth, copy) if t == s and not c} for s in sources}
    assert all(len(groups) == 1 for groups in of_source.values()), of_source
    assert len(set().union(*of_source.values())) == len(sources), of_source  # not merged
    for f, t, c in zip(found, truth, copy):
        assert not c or of_source[t] == {f}, (t, f, of_source)


def test_weak_correlation_joining_two_groups_needs_keypoints(shared_data, tmp_path):
    """A weak NCC pair (below ``CONFIRM``), or one with a soft image, between two groups counts
    only when keypoints confirm it: kept between a tile and its zoomed, rotated copy, refused
    between two sources' tiles; strong pairs are never checked."""
    import cv2

    paths, image = two_benign_sources(shared_data)
    copy = tmp_path / "copy.jpeg"
    Image.fromarray(lc25000_copy(image, 1.7, 130, (0.4, -0.3), (True, False),
                                  cv2.BORDER_REFLECT)).save(copy, quality=90)
    paths.append(str(copy))
    pairs = np.array([[0, 1], [2, 3], [1, 2], [0, 4]])  # within, within, across, tile-copy
    scores = np.array([0.9, 0.9, 0.55, 0.4], np.float32)
    sift = keypoints.SiftCache(paths, 1)
    kept, refused = grouping._confirm(pairs, scores, sift, grouping.CONFIRM)
    component = grouping.components(kept, len(paths))
    assert refused == 1
    assert component[0] == component[1] == component[4] != component[2] == component[3]
    # a soft pair (an image with little fine detail) needs keypoints even at a higher NCC
    scores = np.array([0.9, 0.9, 0.7, 0.7], np.float32)
    soft = np.array([False, False, True, True])
    kept, refused = grouping._confirm(pairs, scores, sift, grouping.CONFIRM, soft)
    component = grouping.components(kept, len(paths))
    assert refused == 1
    assert component[0] == component[1] == component[4] != component[2] == component[3]



def test_strongly_zoomed_soft_copy_is_found_inside_its_source(shared_data, tmp_path):
    """A copy of a real benign tile zoomed 2.47x about an off-centre point, rotated 149 degrees
    with mirrored corners (soft; neither correlation nor keypoints join it) joins its source by
    the zoomed template match, with stain-colour attachment off (``attach=0``) so that colour
    cannot place it, and the five real sources (the four others of closest stain colour) stay
    five groups.

    Sources from the tuning third of the shared groups. Before the template match the copy
    stayed a group of its own here (checked: it fails on the code before ``zoomed``)."""
    import cv2

    with open(shared_data / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "lung_n"]
    sources = ["lung_n-234", "lung_n-116", "lung_n-035", "lung_n-017", "lung_n-225"]
    paths, truth = [], []
    for source in sources:
        members = [str(shared_data / r["path"]) for r in rows if r["group"] == source]
        paths += members
        truth += [source] * len(members)
    with Image.open(shared_data / "lung_n" / "lungn4724.jpeg") as im:  # a lung_n-234 tile
        image = np.asarray(im.convert("RGB"))
    copy = tmp_path / "copy.jpeg"
    Image.fromarray(lc25000_copy(image, 2.474, 149.4, (0.987, 0.219), (False, False),
                                  cv2.BORDER_REFLECT_101)).save(copy, quality=90)
    paths.append(str(copy))
    stages = {}
    found = grouping.detect_groups(paths, ["lung_n"] * len(paths), attach=0, stages=stages)
    of_source = {s: {f for f, t in zip(found, truth) if t == s} for s in sources}
    assert all(len(groups) == 1 for groups in of_source.values()), of_source
    assert len(set().union(*of_source.values())) == len(sources), of_source  # not merged
    assert found[-1] in of_source["lung_n-234"], (found[-1], of_source)
    assert stages["joined by zoomed template match"] == 1
