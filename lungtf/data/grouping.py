"""Automatic near-duplicate grouping: which images are flipped/rotated/zoomed copies of one source.

LC25000 made ~20 augmented tiles from every source tile (flips, rotations up to 25 degrees and
zoom about the centre). A split that puts two copies of one source on both sides leaks, so the
copies must share a group. This module finds those groups for any folder of images, with no
learned features and no downloads:

1. Every image becomes a small band-passed grey image sampled on a **log-polar grid** around its
   centre. A rotation about the centre is then a circular shift along the angle axis, a flip
   reverses the angle axis, and a zoom about the centre is a shift along the log-radius axis
   (``lungtf.data.logpolar``).
2. **Candidates**: the magnitude of the Fourier transform over angle is invariant to rotation and
   flips; pooled over radius bands it is a descriptor whose cosine nearest neighbours (within a
   label) are likely copies.
3. **Verification**: the normalised cross-correlation (NCC) of a central log-polar band of one
   image against the other's, maximised over every rotation (FFT over angle), both flip states
   and the zoom shift that the spectrum magnitudes suggest. Copies mostly reach ~0.9; different
   tissue stays below ``THRESHOLD``. A lower NCC also counts when the two images' stain colour
   statistics agree (``LOW_THRESHOLD``, ``COLOUR_GATE``). A pair with a *soft* image (little
   fine detail: upsampled by a zoom, or blurred; ``SOFT``) counts alone only above
   ``SOFT_THRESHOLD``: smooth patterns of different tissue correlate well, and such a copy would
   otherwise become a hub merging unrelated sources. Below it, and below ``CONFIRM`` for any
   pair, a pair that joins two groups needs keypoint inliers (``keypoints.pair_inliers``).
4. Verified pairs are joined into groups (connected components). Images left in small groups get
   a second, wider candidate search.
5. Copies zoomed about an off-centre point, cropped or translated share no centre with their
   source, so the log-polar match misses them: ``keypoints.link_groups`` joins groups whose
   SIFT keypoints agree under a RANSAC similarity fit (a small group to the group it matches
   best, two large groups only on strong evidence); a group still small, or an image joined only
   by a colour-gated correlation, is then matched directly (``keypoints.join_unsure``) against
   the groups of its nearest images by descriptor.
6. Two large groups that are pieces of one source (their representatives match pair after
   pair, though no single pair as strongly as ``link_groups`` asks of two large groups) are
   joined (``keypoints.join_large``; not under ``strict``).
7. One image of each group still small (its soft image if it has one: a copy zoomed in so far
   that it has few keypoints) is looked for inside members of the ``ZOOM_GROUPS`` large groups
   of closest stain colour (past the first ``zoomed.FINE_GROUPS`` only the best of a coarse
   search), shrunk back by its zoom (a sharp image also unzoomed), at every rotation
   (``zoomed.join_zoomed``), and joins the group it is found in best by ``ZOOM_MARGIN`` over
   the second; under ``safe``, a soft image's unclear match joins every group within the margin
   (``ZOOM_AMBIGUOUS``).
8. Groups still small join the large group of closest stain colour: splitting a true group
   leaks while merging two does not.

Measured on the 6,036 shared LC25000 tiles by ``bench/grouping.py``.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from lungtf.constants import GROUPING_STRICTNESS
from lungtf.data import keypoints, logpolar, zoomed

THRESHOLD = 0.5
"""NCC above which two images are near-duplicates (LC25000: copies median ~0.9, others < 0.47)."""
LOW_THRESHOLD = 0.35
"""Lower NCC that also counts when the two images' stain colour is close (``COLOUR_GATE``)."""
COLOUR_GATE = 1.5
"""Colour-statistics distance (standardised per label) under which ``LOW_THRESHOLD`` applies."""
SOFT = 0.16
"""Fine-to-coarse band energy ratio (``logpolar.Features.softness``): under it an image is *soft*.

An upsampled (zoomed-in) or blurred image has little fine detail; its band-passed log-polar
pattern is smooth, and smooth patterns of different tissue correlate well at some rotation and
zoom (NCC 0.5-0.84 between different sources on the tuning third of the shared tiles with
generated zoomed copies), so a soft copy became a hub merging unrelated sources. Real shared
tiles stay above (1st percentile 0.16); copies zoomed in 1.5x or more mostly fall below."""
COLOUR_NEIGHBOURS = 20
"""Images of closest stain colour whose groups the direct keypoint check also tries."""
SOFT_THRESHOLD = 0.9
"""NCC above which a pair with a soft image counts alone; below, keypoints must confirm it
(``keypoints.COPY_INLIERS``), as for a weak pair (``CONFIRM``)."""
CONFIRM = 0.6
"""NCC under which a pair joining two groups needs ``keypoints.COPY_INLIERS`` to count.

A weak correlation (``THRESHOLD`` to ``CONFIRM``, or colour-gated from ``LOW_THRESHOLD``) is the
only link of some copies to another source; a second, independent check keeps it from merging
two sources. A copy whose weak pair is refused is matched by keypoints in the later stages."""
STRICTNESS = dict(zip(GROUPING_STRICTNESS, (9.0, 3.0, 0.0)))
"""``detect_groups``'s ``strictness`` -> the largest stain-colour distance at which a group still
small after every matching stage joins a large group. A wrongly merged pair costs a little
stratification; a missed pair leaks. ``safe`` (the default) joins nearly every small group,
``strict`` none (purer groups, more leak)."""
ZOOM_GROUPS = 36
"""Large groups of closest stain colour that an image of a small group is searched in
(``zoomed.join_zoomed``; the first ``zoomed.FINE_GROUPS`` fully, the others coarsely first). On
the tuning third with realistic copies, 9 soft images' own groups ranked 0-9 by colour; held out
(seen, not tuned on) 2 of 5 ranked past 12 (one source's group merged with another's, which
moved its mean colour). Stain colour alone attached 3 of the 9 tuning images to another source."""
ZOOM_AMBIGUOUS = dict(zip(GROUPING_STRICTNESS, (3, 1, 1)))
"""``detect_groups``'s ``strictness`` -> the most candidate groups a small group's soft image joins
when none beats the others by ``ZOOM_MARGIN`` (all within the margin of the best;
``zoomed.join_zoomed``): ``safe`` merges when unsure, ``balanced`` and ``strict`` leave such an
image to the stain-colour stage. On the tuning third (31 soft images of four realistic-copy
runs, rules replayed on their scores) with 36 candidates: 1 image left outside its own group and
7 groups joined to an image of another source (6 by unclear matches), against 3 and 3 when
unclear matches go to stain colour, 5 and 5 with 12 candidates and that (the rule before)."""
ZOOM_MARGIN = dict(zip(GROUPING_STRICTNESS, (0.02, 0.05, zoomed.MARGIN)))
"""``detect_groups``'s ``strictness`` -> the margin by which an image of a small group must
match one candidate group better than any other to join it alone (``zoomed.join_zoomed``);
below it the image joins every group within the margin (``ZOOM_AMBIGUOUS``) or is left to the
stain-colour stage. On the tuning third the 9 such images of two runs with
realistic copies matched their own source best, by 0.023-0.23. When the own group is not among
the candidates, stain colour would attach the image to another source too; ``strict`` asks for
the margin unrelated groups did not reach (``zoomed.MARGIN``)."""


class _Prepared:
    """Decoded features of a set of images, with their per-label member lists."""

    def __init__(self, paths: list[str], labels: list[str] | None, workers: int | None):
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"labels must match paths one to one; got {len(labels)} labels for "
                             f"{len(paths)} paths")
        self.workers = workers or os.cpu_count() or 1
        with ThreadPoolExecutor(self.workers) as pool:
            loaded = list(pool.map(logpolar.load, paths))
        self.features = logpolar.Features(np.stack([grey for grey, _ in loaded]))
        keys = np.asarray(labels if labels is not None else [""] * len(paths))
        self.members = [np.flatnonzero(keys == key) for key in dict.fromkeys(keys)]
        colour = np.stack([c for _, c in loaded])
        for m in self.members:
            colour[m] = (colour[m] - colour[m].mean(0)) / (colour[m].std(0) + 1e-6)
        self.colour = colour

    def pairs(self, threshold: float, low_threshold: float, colour_gate: float, neighbours: int,
              retry_neighbours: int, small: int) -> tuple[np.ndarray, np.ndarray]:
        """Verified pairs and their NCC (see ``near_duplicates``)."""
        n = len(self.colour)
        pairs, scores = np.zeros((0, 2), int), np.zeros(0, np.float32)
        seen = np.zeros(0, np.int64)
        queries = self.members
        for k in (neighbours, retry_neighbours):
            found = [logpolar.neighbours(self.features.descriptor, m, q, k)
                     for m, q in zip(self.members, queries)]
            new = np.unique(np.sort(np.concatenate(found), axis=1), axis=0)
            codes = new[:, 0].astype(np.int64) * n + new[:, 1]
            new, seen = new[~np.isin(codes, seen)], np.union1d(seen, codes)
            score = logpolar.similar(self.features, new, self.workers)
            distance = np.linalg.norm(self.colour[new[:, 0]] - self.colour[new[:, 1]], axis=1)
            keep = (score > threshold) | ((score > low_threshold) & (distance < colour_gate))
            pairs, scores = np.concatenate([pairs, new[keep]]), np.concatenate([scores, score[keep]])
            component = components(pairs, n)
            sizes = np.bincount(component)[component]
            queries = [m[sizes[m] < small] for m in self.members]
        return pairs, scores

    def soft(self, pairs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Which ``pairs`` hold a soft image (``SOFT``) and score at most ``SOFT_THRESHOLD``."""
        return (self.features.softness[pairs].min(1, initial=np.inf) < SOFT) & (
            scores <= SOFT_THRESHOLD)

    def nearest(self, k: int) -> np.ndarray:
        """``[N, k]`` indices of each image's ``k`` nearest images of its label by descriptor.

        Rows of labels with ``k`` or fewer other images are padded with the image's own index.
        """
        nearest = np.repeat(np.arange(len(self.colour))[:, None], k, axis=1)
        for m in self.members:
            found = logpolar.neighbours(self.features.descriptor, m, m, k)
            if len(found):
                nearest[m, : len(found) // len(m)] = found[:, 1].reshape(len(m), -1)
        return nearest

    def nearest_colour(self, k: int) -> np.ndarray:
        """``[N, k]`` indices of each image's ``k`` nearest images of its label by stain colour
        (padded with the image's own index like ``nearest``).

        A zoomed-in copy keeps its source's stain but not its log-polar descriptor, so these are
        the candidates the descriptor misses."""
        nearest = np.repeat(np.arange(len(self.colour))[:, None], k, axis=1)
        for m in self.members:
            take = min(k, len(m) - 1)
            if take < 1:
                continue
            for block in np.array_split(m, -(-len(m) // 1024)):
                distance = np.linalg.norm(self.colour[block, None] - self.colour[None, m], axis=2)
                distance[block[:, None] == m[None, :]] = np.inf
                nearest[block, :take] = m[np.argpartition(distance, take - 1, axis=1)[:, :take]]
        return nearest

    def zoom_queries(self, component: np.ndarray, small: int
                     ) -> tuple[list[int], list[np.ndarray], list[bool]]:
        """One image of each group smaller than ``small`` (its first soft image, ``SOFT``, else
        its first), per such image the ``ZOOM_GROUPS`` large groups of its label of closest stain
        colour (mean over the group), nearest first, to search it in (``zoomed.join_zoomed``),
        and whether it is soft."""
        sizes = np.bincount(component)
        soft = self.features.softness < SOFT
        queries, candidates, softs = [], [], []
        for m in self.members:
            large = np.unique(component[m][sizes[component[m]] >= small])
            if len(large) < 2:
                continue
            centre = np.stack([self.colour[m][component[m] == c].mean(0) for c in large])
            for c in np.unique(component[m][sizes[component[m]] < small]):
                inside = m[component[m] == c]
                query = int(inside[soft[inside]][0] if soft[inside].any() else inside[0])
                distance = np.linalg.norm(centre - self.colour[query], axis=1)
                queries.append(query)
                candidates.append(large[np.argsort(distance, kind="stable")[:ZOOM_GROUPS]])
                softs.append(bool(soft[query]))
        return queries, candidates, softs

    def attach(self, component: np.ndarray, small: int, max_distance: float) -> np.ndarray:
        """Join each group smaller than ``small`` to the large group of closest stain colour.

        Copies of one source whose geometry the matcher cannot verify (LC25000 has some) would
        otherwise form their own small groups, and a split group leaks; joining a small group to
        the wrong large one costs purity but leaks no more than leaving it alone.
        """
        sizes = np.bincount(component)
        links = []
        for m in self.members:
            comps = np.unique(component[m])
            large = comps[sizes[comps] >= small]
            if not len(large):
                continue
            centre = np.stack([self.colour[m][component[m] == c].mean(0) for c in large])
            for c in comps[sizes[comps] < small]:
                inside = m[component[m] == c]
                distance = np.linalg.norm(centre - self.colour[inside].mean(0), axis=1)
                if distance.min() < max_distance:
                    target = large[distance.argmin()]
                    links.append((inside[0], m[component[m] == target][0]))
        first = np.unique(component, return_index=True)[1]
        own = np.stack([np.arange(len(component)), first[component]], 1)
        return components(np.concatenate([own, np.array(links, int).reshape(-1, 2)]),
                           len(component))


def near_duplicates(
    paths: list[str],
    labels: list[str] | None = None,
    threshold: float = THRESHOLD,
    low_threshold: float = LOW_THRESHOLD,
    colour_gate: float = COLOUR_GATE,
    neighbours: int = 20,
    retry_neighbours: int = 60,
    small: int = 5,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Find verified near-duplicate pairs (flips, rotations, zoom/crop about the centre, brightness).

    Args:
        paths: image files (any format PIL reads).
        labels: one label per path; images of different labels are never paired. ``None``
            treats all images as one label.
        threshold: NCC above which a candidate pair is a near-duplicate.
        low_threshold: lower NCC that counts when the colour statistics are within
            ``colour_gate``.
        colour_gate: colour-statistics distance (standardised per label) for ``low_threshold``.
        neighbours: candidates per image in the first pass.
        retry_neighbours: candidates per image for images whose group is still smaller than
            ``small`` after the first pass (a missed copy splits a group, and a split group leaks).
        small: group size below which the wider second search runs.
        workers: threads for decoding and matching (default: all CPUs).

    Returns:
        ``(pairs, scores)``: int array ``[M, 2]`` of index pairs ``i < j`` into ``paths`` and their
        NCC scores.

    Raises:
        ValueError: if ``labels`` is given with a length other than ``len(paths)``.
    """
    if len(paths) < 2:
        return np.zeros((0, 2), int), np.zeros(0, np.float32)
    prepared = _Prepared(paths, labels, workers)
    pairs, scores = prepared.pairs(threshold, low_threshold, colour_gate, neighbours,
                                   retry_neighbours, small)
    unsure = prepared.soft(pairs, scores)
    refused = np.flatnonzero(unsure)[keypoints.pair_inliers(
        keypoints.SiftCache(paths, prepared.workers), pairs[unsure]) < keypoints.COPY_INLIERS]
    keep = np.setdiff1d(np.arange(len(pairs)), refused)
    return pairs[keep], scores[keep]


def _confirm(pairs: np.ndarray, scores: np.ndarray, sift: keypoints.SiftCache,
             confirm: float, soft: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``pairs`` with their unsure ones (NCC below ``confirm``, or ``soft``) that join two groups
    of the other pairs kept only when ``keypoints.pair_inliers`` reaches
    ``keypoints.COPY_INLIERS``.

    Refused pairs are replaced by self-pairs (the same index twice) so ``pairs`` keeps its
    alignment with ``scores``. Returns the pairs and how many were refused."""
    strong = (scores >= confirm) & (True if soft is None else ~soft)
    component = components(pairs[strong], int(pairs.max(initial=0)) + 1)
    check = np.flatnonzero(~strong & (component[pairs[:, 0]] != component[pairs[:, 1]]))
    if not len(check):
        return pairs, 0
    refused = check[keypoints.pair_inliers(sift, pairs[check]) < keypoints.COPY_INLIERS]
    pairs = pairs.copy()
    pairs[refused, 1] = pairs[refused, 0]
    return pairs, len(refused)


class _Clock:
    """Wall seconds between successive ``lap`` calls, by name."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now


def components(pairs: np.ndarray, n: int) -> np.ndarray:
    """Connected-component index of each of ``n`` nodes joined by index ``pairs`` ``[M, 2]``."""
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def detect_groups(
    paths: list[str],
    labels: list[str] | None = None,
    attach: float | None = None,
    small: int = 5,
    workers: int | None = None,
    strictness: str = "safe",
    stages: dict[str, int] | None = None,
    timings: dict[str, float] | None = None,
    **options,
) -> list[str]:
    """One near-duplicate group id per path.

    Groups are the connected components of the ``near_duplicates`` pairs, joined further where
    ``keypoints.link_groups`` verifies SIFT matches between them (off-centre zoom, crop,
    translation) and where ``keypoints.join_unsure`` matches a small group, or an image joined
    only by a colour-gated correlation, directly against the groups of its nearest images; then
    every group still smaller than ``small`` joins the large group (same label) of closest stain
    colour when that colour distance is below ``attach`` (erring on the side of merging:
    splitting a true group leaks, merging two does not).

    Args:
        paths: image files.
        labels: one label per path; groups never span labels.
        attach: largest colour distance (Euclidean over colour statistics standardised per
            label) for joining a small group; default from ``strictness``: ``safe`` 9 joins
            nearly every small group (tuned on LC25000, where that lowers the leak most);
            ``0`` disables joining.
        small: group size below which a group is joined to a large one (and searched wider).
        workers: threads for decoding and matching (default: all CPUs).
        strictness: ``STRICTNESS`` key: how readily small groups are merged (``safe`` merges
            when unsure).
        stages: if given, filled with the group count after the log-polar pairs, the weak
            correlations a keypoint check refused (``CONFIRM``), the groups each later stage
            joined (``keypoint links``, ``direct keypoint check``, ``large groups joined by
            keypoints``, ``zoomed template match``, ``stain colour``), the images the zoomed
            stage searched and its seconds, and the final ``groups``.
        timings: if given, filled with the wall seconds of each stage (``log-polar``,
            ``keypoint confirm``, ``keypoint links``, ``direct keypoint check``, ``large groups``,
            ``zoomed``, ``stain colour``; SIFT features are extracted by the first stage that
            needs them).
        **options: tuning passed on as in ``near_duplicates`` (``threshold``, ``neighbours``, ...),
            and ``confirm`` (``CONFIRM``).

    Returns:
        ``"<label>-g<number>"`` per path (``"g<number>"`` without labels), numbered by first
        appearance, so the result is deterministic for a given input order.
    """
    if strictness not in STRICTNESS:
        raise ValueError(f"strictness must be one of {sorted(STRICTNESS)}; got {strictness!r}")
    attach = STRICTNESS[strictness] if attach is None else attach
    if not paths:
        return []
    clock = _Clock()
    prepared = _Prepared(paths, labels, workers)
    confirm = options.pop("confirm", CONFIRM)
    settings = {"threshold": THRESHOLD, "low_threshold": LOW_THRESHOLD,
                "colour_gate": COLOUR_GATE, "neighbours": 20, "retry_neighbours": 60, **options}
    pairs, scores = prepared.pairs(small=small, **settings)
    sift = keypoints.SiftCache(paths, prepared.workers)
    clock.lap("log-polar")
    pairs, refused = _confirm(pairs, scores, sift, confirm, prepared.soft(pairs, scores))
    weak = np.setdiff1d(pairs, pairs[scores > settings["threshold"]])  # only colour-gated pairs
    counts = {"log-polar groups": len(np.unique(components(pairs, len(paths)))),
              "weak or soft correlations refused by keypoints": refused}
    clock.lap("keypoint confirm")
    evidence: list[tuple[int, int, int]] = []
    pairs = np.concatenate([pairs, keypoints.link_groups(
        sift, prepared.members, components(pairs, len(paths)), small, evidence)])
    component = components(pairs, len(paths))
    counts["joined by keypoint links"] = counts["log-polar groups"] - len(np.unique(component))
    clock.lap("keypoint links")
    sizes = np.bincount(component)
    units = [np.flatnonzero(component == c) for c in np.flatnonzero((sizes > 0) & (sizes < small))]
    units += [np.array([i]) for i in weak if sizes[component[i]] >= small]
    pairs = np.concatenate([pairs, keypoints.join_unsure(
        sift, component, units, np.concatenate([prepared.nearest(settings["retry_neighbours"]),
                                                prepared.nearest_colour(COLOUR_NEIGHBOURS)], 1),
        small, thorough=prepared.features.softness < SOFT)])
    before = len(np.unique(component))
    component = components(pairs, len(paths))
    counts["joined by direct keypoint check"] = before - len(np.unique(component))
    clock.lap("direct keypoint check")
    if strictness != "strict":
        pairs = np.concatenate([pairs, keypoints.join_large(sift, component, small, evidence)])
    before = len(np.unique(component))
    component = components(pairs, len(paths))
    counts["large groups joined by keypoints"] = before - len(np.unique(component))
    clock.lap("large groups")
    started = time.perf_counter()
    queries, candidates, soft = prepared.zoom_queries(component, small)
    pairs = np.concatenate([pairs, zoomed.join_zoomed(
        paths, component, queries, candidates, prepared.workers, ZOOM_MARGIN[strictness],
        soft=soft, ambiguous=ZOOM_AMBIGUOUS[strictness])])
    before = len(np.unique(component))
    component = components(pairs, len(paths))
    counts["joined by zoomed template match"] = before - len(np.unique(component))
    counts["images searched by zoomed template match"] = len(queries)
    counts["zoomed template match seconds"] = round(time.perf_counter() - started)
    clock.lap("zoomed")
    before = len(np.unique(component))
    component = prepared.attach(component, small, attach)
    counts["joined by stain colour"] = before - len(np.unique(component))
    counts["groups"] = len(np.unique(component))
    clock.lap("stain colour")
    if stages is not None:
        stages.update(counts)
    if timings is not None:
        timings.update(clock.laps)
    names: dict[int, str] = {}
    out = []
    for index, comp in enumerate(component):
        if comp not in names:
            prefix = f"{labels[index]}-" if labels is not None else ""
            names[comp] = f"{prefix}g{len(names) + 1:04d}"
        out.append(names[comp])
    return out
