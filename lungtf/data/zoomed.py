"""Find a soft, strongly zoomed-in copy inside its source: template matching at the source's scale.

A copy zoomed in 1.5-2.5x about an off-centre point shows a small part of its source, upsampled:
it has little fine detail, so few SIFT keypoints (8-16 on the shared tiles), and it shares no
centre with its source, so the log-polar correlation misses it too. Shrunk back by its zoom its
detail returns, and it is a piece of its source. ``join_zoomed`` cuts the central disc of such an
image (its corners may be mirrored or blank, the disc never is), shrinks it by each of ``ZOOMS``,
rotates it every ``ANGLE_STEP`` degrees, mirrored or not, and finds each of these templates in a
few members of every candidate group: the disc-masked normalised cross-correlation at every
position, computed with FFTs for all templates of one zoom at once. The copy's own source scores
above the other groups; a smooth image correlates well with any tissue, so it is the margin over
the second best group that counts (``MARGIN``), not the score.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from scipy import fft

SIZE = 112
"""Side in pixels the candidate group members are matched at."""
ZOOMS = (1.25, 1.6, 2.0, 2.5)
"""Zooms (copy relative to a member of its source's group) the templates are shrunk by."""
ANGLE_STEP = 20
"""Degrees between the rotations of each template."""
DISC = 0.47
"""Radius of the template disc as a share of the image side (inside the border of any copy)."""
MEMBERS = 16
"""Evenly spaced members of each candidate group searched. A copy shows part of its source,
which not every member of the source's group shows: with 6 members the own group of 2 of 9 soft
images on the tuning third ranked below another group, with 16 none did."""
MARGIN = 0.1
"""Correlation by which the best candidate group must beat the second best to be joined when
unsure images are otherwise left alone (``grouping.ZOOM_MARGIN``, ``strict``).

On the tuning third of the shared benign tiles (one copy zoomed 1.8-2.5x of each of 34 sources,
matched against its own and 8 other groups), the own group scored best by 0.107 or more for 33
copies (second for one); among the other groups alone the best beat the second by at most 0.099."""


def _grey(path: str, size: int) -> np.ndarray:
    """A ``size`` x ``size`` float32 grey image of ``path``."""
    grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError(f"cannot decode image {path} for template matching")
    return cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)


class Templates:
    """The central disc of one image, shrunk by every zoom, rotated and mirrored, as spectra.

    The image is read at twice ``SIZE``, so a template shrunk by zoom ``z`` has the scale of its
    source at ``SIZE`` when the image is a ``z``-times zoomed-in copy. Per zoom: the conjugate
    spectra of the zero-mean, unit-norm masked templates and of the mask.
    """

    def __init__(self, path: str):
        image = _grey(path, 2 * SIZE)
        self.zooms = []
        for zoom in ZOOMS:
            side = round(SIZE / zoom)
            small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
            half = int(DISC * side)
            centre = (side - 1) / 2
            offset = np.arange(2 * half) - half + 0.5
            mask = (offset[:, None] ** 2 + offset[None] ** 2 <= half**2).astype(np.float32)
            cut = slice(side // 2 - half, side // 2 + half)
            views = []
            for view in (small, np.ascontiguousarray(small[:, ::-1])):
                for angle in np.arange(0, 360, ANGLE_STEP):
                    turn = cv2.getRotationMatrix2D((centre, centre), float(angle), 1)
                    views.append(cv2.warpAffine(view, turn, (side, side),
                                                flags=cv2.INTER_LINEAR)[cut, cut])
            views = np.stack(views) * mask
            views -= mask * (views.sum((1, 2), keepdims=True) / mask.sum())
            views /= np.linalg.norm(views, axis=(1, 2), keepdims=True) + 1e-6
            self.zooms.append((2 * half, mask.sum(),
                               np.conj(fft.rfft2(views, (SIZE, SIZE))).astype(np.complex64),
                               np.conj(fft.rfft2(mask, (SIZE, SIZE))).astype(np.complex64)))

    def best(self, image: np.ndarray) -> float:
        """Highest masked normalised cross-correlation of any template anywhere in ``image``."""
        spectrum = fft.rfft2(image)
        squares = fft.rfft2(image.astype(np.float64) ** 2)
        best = -1.0
        for side, area, templates, mask in self.zooms:
            valid = SIZE - side + 1
            num = fft.irfft2(templates * spectrum, (SIZE, SIZE))[:, :valid, :valid]
            total = fft.irfft2(mask * spectrum, (SIZE, SIZE))[:valid, :valid]
            energy = fft.irfft2(mask * squares, (SIZE, SIZE))[:valid, :valid]
            spread = np.sqrt(np.maximum(energy - total**2 / area, 1e-3 * area))
            best = max(best, float((num.max(0) / spread).max()))
        return best


def group_scores(paths: list[str], query: int, groups: list[np.ndarray], workers: int,
                 cache: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Best correlation of image ``query``'s templates in ``MEMBERS`` members of each group.

    Args:
        paths: image files.
        query: index of the (soft) image looked for.
        groups: index arrays of the candidate groups' members.
        workers: threads.
        cache: grey ``SIZE`` images by index, filled as they are read.
    """
    cache = {} if cache is None else cache
    templates = Templates(paths[query])
    chosen = [g[np.linspace(0, len(g) - 1, min(MEMBERS, len(g))).round().astype(int)]
              for g in groups]
    flat = [int(i) for c in chosen for i in c]
    for i in set(flat) - set(cache):
        cache[i] = _grey(paths[i], SIZE)
    with ThreadPoolExecutor(workers) as pool:  # the FFTs release the GIL
        scores = list(pool.map(lambda i: templates.best(cache[i]), flat))
    out, start = [], 0
    for c in chosen:
        out.append(max(scores[start:start + len(c)]))
        start += len(c)
    return np.array(out)


def join_zoomed(paths: list[str], component: np.ndarray, queries: list[int],
                candidates: list[np.ndarray], workers: int, margin: float = MARGIN,
                scores: list | None = None) -> np.ndarray:
    """Index pairs joining each query image to the candidate group it is found in.

    Args:
        paths: image files.
        component: current group of each image.
        queries: images to place (soft images of small groups).
        candidates: per query, the group ids (``component`` values) to search.
        workers: threads.
        margin: correlation by which the best group must beat the second best (``MARGIN``).
        scores: if given, filled with ``(query, groups, correlations)`` per query.

    Returns:
        int array ``[M, 2]`` of image index pairs to add to the near-duplicate graph.
    """
    cache: dict[int, np.ndarray] = {}
    links = []
    for query, groups in zip(queries, candidates):
        if len(groups) < 2:
            continue
        members = [np.flatnonzero(component == g) for g in groups]
        found = group_scores(paths, query, members, workers, cache)
        if scores is not None:
            scores.append((query, np.asarray(groups), found))
        first, second = np.sort(found)[::-1][:2]
        if first - second >= margin:
            links.append((query, members[int(found.argmax())][0]))
    return np.array(links, int).reshape(-1, 2)
