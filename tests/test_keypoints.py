"""``link_groups`` at its FLANN settings still joins hard copies of real tiles."""

from __future__ import annotations

import numpy as np
from conftest import lc25000_copy, two_benign_sources
from PIL import Image

from lungtf.data import keypoints


def test_link_groups_joins_a_zoomed_rotated_mirror_bordered_copy_to_its_source(shared_data,
                                                                                tmp_path):
    """With the FLANN search at ``CHECKS``, a copy of a real benign tile zoomed 1.8x about an
    off-centre point, rotated 200 degrees, mirror-bordered and mirrored joins the group of its
    source's tiles, not the other source's nor one of 30 other real benign tiles (distractors in
    the index). Checked: without the mirrored queries it is joined to nothing."""
    import csv

    import cv2

    paths, image = two_benign_sources(shared_data)
    copy = tmp_path / "copy.jpeg"
    Image.fromarray(lc25000_copy(image, 1.8, 200, (-0.6, 0.5), (True, False),
                                  cv2.BORDER_REFLECT_101)).save(copy, quality=90)
    paths.append(str(copy))
    with open(shared_data / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "lung_n"]
    sources = sorted({r["group"] for r in rows})
    paths += [str(shared_data / r["path"]) for r in rows if r["group"] in sources[10:40:1]][::7][:30]
    component = np.concatenate([[0, 0, 1, 1, 2], np.arange(3, len(paths) - 2)])
    links = keypoints.link_groups(keypoints.SiftCache(paths, 2), [np.arange(len(paths))],
                                  component, small=2)
    of_copy = {int(component[b if a == 4 else a]) for a, b in links.tolist() if 4 in (a, b)}
    assert of_copy == {0}, links


def test_join_large_joins_pieces_of_one_source_and_not_two_sources(shared_data, tmp_path):
    """Two sources, each split into two large groups: 6 of its real tiles, and 6 copies of its
    other tiles zoomed in 1.3-1.9x off-centre, rotated and mirror-bordered (the pieces a large
    realistic set left apart). ``join_large``, given the image pairs ``link_groups`` verified,
    joins each source's pieces and never the two sources, nor 3 groups of other real benign
    tiles. Checked: with ``LARGE_PAIRS`` above what
    the pieces reach (26) nothing is joined."""
    import csv

    import cv2

    with open(shared_data / "groups.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "lung_n"]
    sources = sorted({r["group"] for r in rows})
    paths, component = [], []
    rng = np.random.default_rng(3)
    for s, source in enumerate(sources[0:6:3]):
        tiles = [str(shared_data / r["path"]) for r in rows if r["group"] == source]
        paths += tiles[:6]
        component += [2 * s] * 6
        for k, tile in enumerate(tiles[6:12]):
            with Image.open(tile) as im:
                image = np.asarray(im.convert("RGB"))
            copy = tmp_path / f"copy{s}_{k}.jpeg"
            Image.fromarray(lc25000_copy(image, rng.uniform(1.3, 1.9), rng.uniform(0, 360),
                                          tuple(rng.uniform(-0.8, 0.8, 2)), (k % 2 == 0, False),
                                          cv2.BORDER_REFLECT)).save(copy, quality=90)
            paths.append(str(copy))
            component.append(2 * s + 1)
    for g, source in enumerate(sources[20:50:10]):
        paths += [str(shared_data / r["path"]) for r in rows if r["group"] == source][:6]
        component += [4 + g] * 6
    component = np.array(component)
    sift, evidence = keypoints.SiftCache(paths, 2), []
    keypoints.link_groups(sift, [np.arange(len(paths))], component, 5, evidence)
    links = keypoints.join_large(sift, component, 5, evidence)
    joined = {tuple(sorted((int(component[a]), int(component[b])))) for a, b in links.tolist()}
    assert joined == {(0, 1), (2, 3)}, joined
