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
the second best group that counts (``MARGIN``), not the score. When the margin is not clear, the
caller may have the image join every group within it (merge when unsure). A sharp image (a real
tile left alone) is searched the same way, unzoomed too. Candidate groups past the stain-colour
nearest ``FINE_GROUPS`` are searched in a few members first (``COARSE``), and only the best few
searched fully, so an own group that colour ranks low is still found.
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
FOUND = 0.6
"""Correlation the best group must reach for a soft image's unclear match to join several groups:
below it the image may be in none of them, and joining them all would merge unrelated large
groups. Soft copies scored 0.82 or more in their own group on the tuning third; unrelated
synthetic textures 0.33-0.39.

A sharp image (a real tile) never joins several groups: on the tuning third (one real tile of
each of 20 benign sources, the 16 groups of closest colour searched), its own group, when present,
beat every other by 0.025 or more (20 of 20, at 0.47-1.0), while among other sources' groups
alone the best two lay within 0.02 for 15 of 20, at up to 0.598. (Looked for after a held-out
run, where 3 real tiles of a source with no other tiles joined two unrelated groups at 0.62.)"""
SHARP_ZOOMS = (1.0, *ZOOMS)
"""Zooms a sharp (not soft) image is searched at: it may be an unzoomed copy too."""
FINE_GROUPS = 12
"""Candidate groups (nearest by stain colour) always searched fully."""
COARSE = 3
"""Members per candidate group in the coarse search that decides which groups past
``FINE_GROUPS`` are searched fully (``MEMBERS``)."""
COARSE_BEST = 4
"""Most candidate groups past ``FINE_GROUPS`` searched fully: the best of those the coarse search
(``COARSE`` members) scores at least as high as every one of the first ``FINE_GROUPS``.

On the tuning third (31 soft images of four realistic-copy runs, copy seeds 0-3, every candidate
searched, the rules replayed on the scores), 2 own groups ranked past 12 by colour (17th, 25th).
With ``grouping``'s safe margin and unclear-match rule, this left 1 image outside its own group
(it scored 0.78-0.81 in every group); searching only the 12 left 3, the coarse search's best 4
without the condition 3, a 56 px thumbnail search (30-degree steps) 2, all 34 groups fully 4."""
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

    def __init__(self, path: str, zooms: tuple[float, ...] = ZOOMS):
        image = _grey(path, 2 * SIZE)
        self.zooms = []
        for zoom in zooms:
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


def group_scores(paths: list[str], query: int | Templates, groups: list[np.ndarray],
                 workers: int, cache: dict[int, np.ndarray] | None = None,
                 members: int = MEMBERS) -> np.ndarray:
    """Best correlation of image ``query``'s templates in ``members`` members of each group.

    Args:
        paths: image files.
        query: index of the image looked for (templates at ``ZOOMS``), or its ``Templates``.
        groups: index arrays of the candidate groups' members.
        workers: threads.
        cache: grey ``SIZE`` images by index, filled as they are read.
        members: evenly spaced members searched per group (``MEMBERS``).
    """
    cache = {} if cache is None else cache
    templates = query if isinstance(query, Templates) else Templates(paths[query])
    chosen = [g[np.linspace(0, len(g) - 1, min(members, len(g))).round().astype(int)]
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
                scores: list | None = None, soft: list[bool] | None = None,
                ambiguous: int = 1) -> np.ndarray:
    """Index pairs joining each query image to the candidate group(s) it is found in.

    All candidate groups are first searched coarsely (``COARSE`` members each); the first
    ``FINE_GROUPS`` and, of the others, up to ``COARSE_BEST`` that score at least as high as any
    of the first are then searched fully (``MEMBERS``). The best group is joined when it beats the
    second by ``margin``; otherwise, for a soft image, when at most ``ambiguous`` groups lie within
    ``margin`` of the best and it reaches ``FOUND``, the image joins all of them (merge when
    unsure: a wrong merge costs a little stratification, a missed pair leaks). A sharp image joins
    only on a clear margin (``FOUND``).

    Args:
        paths: image files.
        component: current group of each image.
        queries: images to place (one image of each small group).
        candidates: per query, the group ids (``component`` values) to search, most likely first.
        workers: threads.
        margin: correlation by which the best group must beat the second best (``MARGIN``).
        scores: if given, filled with ``(query, groups, correlations)`` per query (the fully
            searched groups).
        soft: per query, whether it is soft (a zoomed-in copy: templates at ``ZOOMS``); a sharp
            image is searched at zoom 1 as well (``SHARP_ZOOMS``). Default: all soft.
        ambiguous: most groups an unclear match joins (1: none).

    Returns:
        int array ``[M, 2]`` of image index pairs to add to the near-duplicate graph.
    """
    cache: dict[int, np.ndarray] = {}
    links = []
    soft = [True] * len(queries) if soft is None else soft
    for query, groups, is_soft in zip(queries, candidates, soft):
        groups = np.asarray(groups)
        if len(groups) < 2:
            continue
        zooms = ZOOMS if is_soft else SHARP_ZOOMS
        templates = Templates(paths[query], zooms)
        if len(groups) > FINE_GROUPS:
            coarse = group_scores(paths, templates, [np.flatnonzero(component == g)
                                                     for g in groups], workers, cache, COARSE)
            ahead = FINE_GROUPS + np.flatnonzero(
                coarse[FINE_GROUPS:] >= coarse[:FINE_GROUPS].max())
            ahead = ahead[np.argsort(-coarse[ahead], kind="stable")[:COARSE_BEST]]
            groups = np.concatenate([groups[:FINE_GROUPS], groups[ahead]])
        members = [np.flatnonzero(component == g) for g in groups]
        found = group_scores(paths, templates, members, workers, cache)
        if scores is not None:
            scores.append((query, groups, found))
        order = np.argsort(-found, kind="stable")
        close = order[found[order] > found[order[0]] - margin]
        if len(close) == 1 or (is_soft and len(close) <= ambiguous and found[order[0]] >= FOUND):
            links += [(query, members[k][0]) for k in close]
    return np.array(links, int).reshape(-1, 2)
