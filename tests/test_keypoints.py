"""The keypoint matcher's fast paths give what the plain OpenCV matcher gives."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lungtf.data import keypoints
from tests.conftest import lc25000_copy, two_benign_sources


def _reference(views, target) -> int:
    """``keypoints._inliers`` for one pair as it was written with ``cv2.BFMatcher``."""
    import cv2

    matcher = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True)
    best = 0
    if len(views[0][1]) < keypoints.PAIR_INLIERS or len(target[1]) < keypoints.PAIR_INLIERS:
        return 0
    for points, desc in views:
        matches = matcher.match(desc, target[1])
        if len(matches) >= keypoints.PAIR_INLIERS:
            best = max(best, keypoints._similarity_inliers(
                points[[m.queryIdx for m in matches]], target[0][[m.trainIdx for m in matches]]))
    return best


def test_batched_inliers_equal_opencv_cross_checked_matcher(shared_data, tmp_path):
    """The matrix-product cross-check gives the brute-force matcher's matches, so the same RANSAC
    inliers, for a copy (zoomed, rotated, mirror-bordered, flipped) of a real benign tile against
    its source (many inliers) and for tiles of another source (few), in blocks larger than
    ``_BLOCK``; with ``need`` a pair under it counts 0. Checked: a mutual-nearest test that
    ignores the mirrored view, or a block offset bug, makes it fail."""
    import cv2

    paths, image = two_benign_sources(shared_data)
    for k, (zoom, angle, flip) in enumerate([(1.6, 130, (True, False)), (2.2, 250, (False, True))]):
        copy = tmp_path / f"copy{k}.jpeg"
        Image.fromarray(lc25000_copy(image, zoom, angle, (0.5, -0.4), flip,
                                      cv2.BORDER_REFLECT)).save(copy, quality=90)
        paths.append(str(copy))
    sift = keypoints.SiftCache(paths, 2)
    features = sift.get(range(len(paths)))
    targets = [features[i % len(features)] for i in range(keypoints._BLOCK + 3)]
    for points, desc in features:
        views = [(points, desc), keypoints._mirror(points, desc)]
        expected = np.array([_reference(views, t) for t in targets])
        assert keypoints._inliers(views, targets).tolist() == expected.tolist()
        needed = keypoints._inliers(views, targets, need=keypoints.COPY_INLIERS)
        assert (needed[expected >= keypoints.COPY_INLIERS]
                == expected[expected >= keypoints.COPY_INLIERS]).all()
    # the copies match their source tile (index 0) clearly, the other source's tiles do not
    copy_views = [features[4], keypoints._mirror(*features[4])]
    found = keypoints._inliers(copy_views, features[:4])
    assert found[0] >= keypoints.COPY_INLIERS > found[2:].max(), found


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
