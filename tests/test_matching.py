"""``matching.inliers`` gives what OpenCV's cross-checking brute-force matcher gives."""

from __future__ import annotations

import numpy as np
from conftest import lc25000_copy, two_benign_sources
from PIL import Image

from lungtf.data import keypoints, matching


def _reference(views, target) -> int:
    """``matching.inliers`` for one pair as it was written with ``cv2.BFMatcher``."""
    import cv2

    matcher = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True)
    best = 0
    if len(views[0][1]) < keypoints.PAIR_INLIERS or len(target[1]) < keypoints.PAIR_INLIERS:
        return 0
    for points, desc in views:
        matches = matcher.match(desc, target[1])
        if len(matches) >= keypoints.PAIR_INLIERS:
            best = max(best, matching.similarity_inliers(
                points[[m.queryIdx for m in matches]], target[0][[m.trainIdx for m in matches]]))
    return best


def test_batched_inliers_equal_opencv_cross_checked_matcher(shared_data, tmp_path):
    """The matrix-product cross-check gives the brute-force matcher's matches, so the same RANSAC
    inliers, for a copy (zoomed, rotated, mirror-bordered, flipped) of a real benign tile against
    its source (many inliers) and for tiles of another source (few), in blocks larger than
    ``matching.BLOCK``; with ``need`` a pair under it counts 0. Checked: a mutual-nearest test that
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
    targets = [features[i % len(features)] for i in range(matching.BLOCK + 3)]
    for points, desc in features:
        views = [(points, desc), keypoints._mirror(points, desc)]
        expected = np.array([_reference(views, t) for t in targets])
        assert matching.inliers(views, targets).tolist() == expected.tolist()
        needed = matching.inliers(views, targets, need=keypoints.COPY_INLIERS)
        assert (needed[expected >= keypoints.COPY_INLIERS]
                == expected[expected >= keypoints.COPY_INLIERS]).all()
        # the rotation/zoom vote stops no pair of copies, only pairs under ``need``
        voted = matching.inliers(views, targets, need=keypoints.COPY_INLIERS, vote=True)
        copies = needed >= keypoints.COPY_INLIERS
        assert voted[copies].tolist() == needed[copies].tolist()
        assert (voted[~copies] < keypoints.COPY_INLIERS).all()
    # the copies match their source tile (index 0) clearly, the other source's tiles do not
    copy_views = [features[4], keypoints._mirror(*features[4])]
    found = matching.inliers(copy_views, features[:4])
    assert found[0] >= keypoints.COPY_INLIERS > found[2:].max(), found


def test_consistent_counts_matches_agreeing_on_one_rotation_and_zoom():
    """Matches of a copy (every orientation turned by 356-362 degrees, across the 0/360 seam, and
    sizes zoomed 1.6x, with a little noise) all agree; matches with random orientations and
    sizes (chance matches of different tissue) do not. Checked: without the circular seam, or
    with orientation ignored, it fails."""
    rng = np.random.default_rng(0)
    n = 60
    source = np.stack([rng.uniform(0, 224, n), rng.uniform(0, 224, n), rng.uniform(0, 360, n),
                       rng.uniform(2, 12, n)], 1).astype(np.float32)
    target = source.copy()
    target[:, 2] = np.mod(source[:, 2] + 359 + rng.uniform(-3, 3, n), 360)
    target[:, 3] = source[:, 3] * 1.6 * np.exp2(rng.uniform(-0.1, 0.1, n))
    assert matching.consistent(source, target) == n
    chance = target.copy()
    chance[:, 2] = rng.uniform(0, 360, n)
    chance[:, 3] = rng.uniform(2, 12, n)
    assert matching.consistent(source, chance) < 10
    turned_only = chance.copy()
    turned_only[:, 3] = target[:, 3]
    assert matching.consistent(source, turned_only) < 15
