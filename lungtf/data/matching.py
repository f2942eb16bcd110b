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


def inliers(views: list[tuple[np.ndarray, np.ndarray]],
            targets: list[tuple[np.ndarray, np.ndarray]], need: int = PAIR_INLIERS) -> np.ndarray:
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
                if len(keep) >= need:
                    found[start + t] = max(found[start + t], similarity_inliers(
                        query_points[keep], points[nearest[v, t, keep]]))
    return found


def similarity_inliers(source: np.ndarray, target: np.ndarray) -> int:
    """RANSAC inliers of a similarity fit ``source -> target``; 0 if it fails or zooms beyond 4x."""
    fit, inliers = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC,
                                               ransacReprojThreshold=3.0)
    if fit is None or not 0.25 <= np.hypot(fit[0, 0], fit[1, 0]) <= 4:
        return 0
    return int(inliers.sum())
