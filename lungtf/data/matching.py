"""Cross-checked keypoint matching of one image against many, verified by a RANSAC similarity fit.

``lungtf.data.keypoints`` verifies image pairs with it: the matches of OpenCV's cross-checking
brute-force L2 matcher (a query keypoint and a target keypoint that are each other's nearest),
found for many target images at once by matrix products, then the inliers of a similarity
transform (rotation, uniform zoom, translation) fitted to them by RANSAC.
"""

from __future__ import annotations

import cv2
import numpy as np

PAIR_INLIERS = 6
"""RANSAC inliers for an image pair to count as evidence (chance alone mostly reaches 4-5)."""
FAR = np.float32(4e6)
"""Squared norm given to padding descriptors: farther from any descriptor than any real one."""
BLOCK = 16
"""Target images matched against a query in one matrix product."""
ANGLE_BIN = 10.0
"""Degrees per bin of the rotation vote (``consistent``)."""
ZOOM_BIN = 0.25
"""Octaves per bin of the zoom vote (``consistent``)."""


def _stack(features: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of several images as one zero-padded ``[T, F, 128]`` array and their squared
    norms ``[T, F]`` (``FAR`` for padding)."""
    most = max([len(d) for _, d in features] + [1])
    stacked = np.zeros((len(features), most, 128), np.float32)
    norms = np.full((len(features), most), FAR, np.float32)
    for t, (_, desc) in enumerate(features):
        stacked[t, : len(desc)] = desc
        norms[t, : len(desc)] = (desc * desc).sum(1)
    return stacked, norms


def consistent(source: np.ndarray, target: np.ndarray) -> int:
    """Most matched keypoints that agree on one rotation and zoom, within two bins of each.

    A similarity transform turns every keypoint's SIFT orientation by its rotation and scales its
    size by its zoom, so the matches of a copy pile up in one (rotation, zoom) bin, while chance
    matches spread over all of them (a Hough vote, as in Lowe's SIFT paper). RANSAC inliers agree
    in both, so they are at most about this count.

    Args:
        source, target: matched keypoints ``[n, 4]`` (x, y, orientation in degrees, size), one
            row per match.
    """
    turn = (np.mod(target[:, 2] - source[:, 2], 360) // ANGLE_BIN).astype(int)
    turns = round(360 / ANGLE_BIN)
    zoom = np.floor(np.log2(target[:, 3] / source[:, 3]) / ZOOM_BIN).astype(int)
    zoom -= zoom.min(initial=0)
    votes = np.bincount(np.minimum(turn, turns - 1) * (zoom.max(initial=0) + 2) + zoom,
                        minlength=turns * (zoom.max(initial=0) + 2)).reshape(turns, -1)
    votes = np.concatenate([votes, votes[:1]])  # rotation is circular
    return int((votes[:-1, :-1] + votes[1:, :-1] + votes[:-1, 1:] + votes[1:, 1:]).max())


def inliers(views: list[tuple[np.ndarray, np.ndarray]],
            targets: list[tuple[np.ndarray, np.ndarray]], need: int = PAIR_INLIERS,
            vote: bool = False) -> np.ndarray:
    """Per target, most RANSAC similarity inliers of cross-checked matches from one of ``views``.

    The matches are those of OpenCV's cross-checking brute-force L2 matcher (a query keypoint
    and a target keypoint that are each other's nearest), found for many targets at once by
    matrix products: SIFT descriptors are integer-valued, so the squared distances are exact in
    float32 and ties break the same way (lowest index).

    Args:
        views: ``(points, descriptors)`` of the query image as shot and mirrored (``keypoints._mirror``).
        targets: ``(points, descriptors)`` of the other images.
        need: pairs with fewer cross-checked matches are not fitted and count 0 (at least
            ``PAIR_INLIERS``; inliers never exceed matches, so a caller that counts only pairs
            with ``need`` inliers loses nothing).
        vote: fit only pairs whose matches reach ``need`` in one rotation and zoom
            (``consistent``; points with orientation and size columns), the others count 0.
            Most pairs of different tissue stop there, before RANSAC. On the tuning third of the
            shared tiles with realistic copies (300 benign pairs of a zoomed-in copy and a tile
            of its source, 300 of different sources), no pair reaching 6 or 10 inliers was
            stopped but 2 of 3 chance pairs at 6; RANSAC ran for 23 and 0 of ~295 different
            pairs instead of all.

    Returns:
        int array ``[len(targets)]`` (0 when either image has fewer than ``PAIR_INLIERS``
        keypoints).
    """
    found = np.zeros(len(targets), int)
    need = max(need, PAIR_INLIERS)
    if len(views[0][1]) < PAIR_INLIERS:
        return found
    query = np.stack([d for _, d in views])
    rows = np.arange(query.shape[1])
    query_norms = (query * query).sum(2)[:, :, None, None]
    for start in range(0, len(targets), BLOCK):
        block = targets[start:start + BLOCK]
        stacked, norms = _stack(block)
        distance = query_norms + norms - 2 * (query.reshape(-1, 128) @ stacked.reshape(
            -1, 128).T).reshape(len(views), len(rows), len(block), -1)
        nearest = distance.argmin(3).transpose(0, 2, 1)  # [view, target, query keypoint]
        back = np.take_along_axis(distance.argmin(1), nearest, 2)
        mutual = back == rows
        for t, (points, desc) in enumerate(block):
            if len(desc) < PAIR_INLIERS:
                continue
            for v, (query_points, _) in enumerate(views):
                keep = np.flatnonzero(mutual[v, t])
                if len(keep) < need:
                    continue
                source, target = query_points[keep], points[nearest[v, t, keep]]
                if vote and consistent(source, target) < need:
                    continue
                found[start + t] = max(found[start + t], similarity_inliers(source, target))
    return found


def similarity_inliers(source: np.ndarray, target: np.ndarray) -> int:
    """RANSAC inliers of a similarity fit ``source -> target`` (positions: the first two columns);
    0 if it fails or zooms beyond 4x."""
    source = np.ascontiguousarray(source[:, :2], np.float32)
    target = np.ascontiguousarray(target[:, :2], np.float32)
    fit, inliers = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC,
                                               ransacReprojThreshold=3.0)
    if fit is None or not 0.25 <= np.hypot(fit[0, 0], fit[1, 0]) <= 4:
        return 0
    return int(inliers.sum())
