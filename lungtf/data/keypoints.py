"""Keypoint verification that joins near-duplicate groups the centred log-polar match misses.

Some LC25000 copies are zoomed about an off-centre point, cropped or translated (two source tiles
can even overlap), so the log-polar NCC of ``grouping``, which assumes a common centre, splits
their source into several groups, and a split group leaks. SIFT keypoints are invariant to
rotation, scale and translation; a flip is handled by mirroring the descriptors. A RANSAC
similarity fit (rotation, uniform scale, translation) on the matched keypoints verifies a pair:
copies share tens of geometrically consistent matches, different tissue only a few.

Per label, a few representatives of every group (every member of a small group) go into a
FLANN index; each representative, as shot and mirrored, queries it; pairs of images with enough
matches are verified. A small group is joined to the group it matches best; two large groups
only on strong evidence, since merging two large groups costs the most purity.

A copy left alone after that (its keypoints drowned among a whole label's in the index), or
joined to a group only by a weak correlation, gets a direct check, ``join_unsure``:
cross-checked brute-force matches against a few members of each group that a global descriptor
puts near it: summed over a group's representatives, a copy's own group scores several times the
inliers of any other group.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from lungtf.data import matching

SIZE = 224
"""Side in pixels every image is resized to before keypoint detection."""
FEATURES = 300
"""SIFT keypoints kept per image (the strongest)."""
NEIGHBOURS = 8
"""Nearest database descriptors taken per query descriptor."""
PAIR_INLIERS = matching.PAIR_INLIERS
SMALL_EVIDENCE = 15
"""Inliers, summed over the image pairs of two groups, that join a small group to the other.

LC25000 copies zoomed about an off-centre point match single members of their group with only
5-30 inliers, but they match most members, so the sum separates them from other tissue."""
LARGE_INLIERS = 50
"""Inliers of one image pair that join two large groups (overlapping sources reach ~40)."""
REPRESENTATIVES = 5
"""Members of a large group that stand for it in the index."""
LARGE_PAIRS = 5
"""Representative pairs (of ``REPRESENTATIVES`` x ``REPRESENTATIVES``) with ``COPY_INLIERS`` that
join two large groups in ``join_large``.

At 15,000 tiles with realistic copies (``bench/grouping.py --copies realistic --tiles 15000``),
sources split into two large groups matched in 15-18 of the 25 pairs (best pair 25-34 inliers,
under ``LARGE_INLIERS``); 150 random pairs of other large groups of one class, in none (99th
percentile; best pair 6 inliers)."""
THOROUGH = 20
"""Members of each candidate group that ``join_unsure`` matches a *thorough* unit against.

A strongly zoomed-in copy shows a small part of its source and, upsampled, has few keypoints
(~40 of ``FEATURES``); only the few members of its group that show the same part match it, and
five evenly spaced representatives often miss them all. Its few keypoints make each match cheap.
Only pairs reaching ``COPY_INLIERS`` count then: chance pairs (4-8 inliers) summed over that many
members would reach ``SMALL_EVIDENCE``."""
CANDIDATES = 6
"""Database images, most voted for by a query's keypoints, that ``cross_matches`` verifies."""
COPY_INLIERS = 10
"""RANSAC inliers of one image pair that make it a confirmed copy in ``cross_matches``.

On the shared LC25000 tiles (30 source tiles per class, a random split) every test tile with a
copy in train reached it, and no test tile without one did (those stay at 4-8)."""
TREES = 4
"""Randomised KD-trees of the FLANN index of ``link_groups`` and ``cross_matches``."""
CHECKS = 32
"""Leaf descriptors FLANN compares per query descriptor in ``link_groups`` (its cost per query).

64 before; at 32 the search takes about half as long, and on the tuning third with realistic
copies (``bench/grouping.py --part tune --copies realistic --tiles 3000``) the keypoint links
joined 855 groups instead of 860, the direct check 22 instead of 17, with the same final groups."""
_MIRROR = np.arange(128).reshape(4, 4, 8)[::-1][:, :, (-np.arange(8)) % 8].ravel()
"""Permutation that turns a SIFT descriptor into that of the left-right mirrored patch."""


class SiftCache:
    """SIFT features of image files, computed once, in parallel, on first use."""

    def __init__(self, paths: list[str], workers: int):
        self.paths, self.workers = paths, workers
        self.features: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(points, descriptors)`` of the images ``indices`` (indices into ``paths``)."""
        indices = [int(i) for i in indices]
        missing = sorted(set(indices) - set(self.features))
        if missing:
            with ThreadPoolExecutor(self.workers) as pool:
                self.features.update(zip(missing, pool.map(_sift, [self.paths[i] for i in missing])))
        return [self.features[i] for i in indices]


def _sift(path: str) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints ``[n, 4]`` (x, y, orientation in degrees, size) and descriptors ``[n, 128]``
    of a ``SIZE`` grey image."""
    grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError(f"cannot decode image {path} for keypoint matching")
    grey = cv2.resize(grey, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    found, desc = cv2.SIFT_create(nfeatures=FEATURES).detectAndCompute(grey, None)
    if desc is None:
        return np.zeros((0, 4), np.float32), np.zeros((0, 128), np.float32)
    return np.float32([(*k.pt, k.angle, k.size) for k in found]), desc


def _mirror(points: np.ndarray, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints and descriptors of the left-right mirrored image, from the image's own."""
    mirrored = points.copy()
    mirrored[:, 0] = SIZE - 1 - mirrored[:, 0]
    mirrored[:, 2] = np.mod(180 - mirrored[:, 2], 360)  # orientation (y down): reversed
    return mirrored, np.ascontiguousarray(desc[:, _MIRROR])


def _views(points: np.ndarray, desc: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """An image's keypoints as shot and mirrored, the ``views`` of ``matching.inliers``."""
    return [(points, desc), _mirror(points, desc)]


def _one_to_one(key: np.ndarray, query: np.ndarray, db: np.ndarray,
                distance: np.ndarray) -> np.ndarray:
    """Indices of matches kept so that, per image pair ``key``, every keypoint is used once.

    The closest match wins. Without this, many query keypoints matched to one database
    keypoint fit a degenerate zero-scale transform with many "inliers".
    """
    keep = np.argsort(distance, kind="stable")
    for ids in (query, db):
        code = key[keep] * (int(ids.max(initial=0)) + 1) + ids[keep]
        keep = keep[np.sort(np.unique(code, return_index=True)[1])]
    return keep


def _verify(query_points: np.ndarray, db_points: np.ndarray, key: np.ndarray,
            images: int) -> list[tuple[int, int, int]]:
    """RANSAC similarity inliers ``(query image, db image, inliers)`` of matches grouped by key.

    ``key`` is ``query image * images + db image`` per (one-to-one) match; pairs with fewer than
    ``PAIR_INLIERS`` matches or inliers, or a fitted zoom beyond 4x either way, are left out.
    """
    order = np.argsort(key, kind="stable")
    key, query_points, db_points = key[order], query_points[order], db_points[order]
    keys, starts, counts = np.unique(key, return_index=True, return_counts=True)
    found = []
    for k, start, count in zip(keys, starts, counts):
        if count < PAIR_INLIERS:
            continue
        part = slice(start, start + count)
        n = matching.similarity_inliers(query_points[part], db_points[part])
        if n >= PAIR_INLIERS:
            found.append((int(k // images), int(k % images), n))
    return found


def _index(desc: np.ndarray) -> cv2.flann_Index:
    """A FLANN KD-tree index of ``desc``, built the same way every time for the same input.

    FLANN shuffles the descriptors and picks split dimensions at random from OpenCV's RNG of the
    calling thread, whose state depends on whatever ran before; seeding it first makes the trees,
    so every approximate search, and so the groups and audit pairs, reproducible run to run.
    """
    cv2.setRNGSeed(0)
    return cv2.flann_Index(desc, {"algorithm": 1, "trees": TREES})


def _knn(index: cv2.flann_Index, query: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """``NEIGHBOURS`` nearest indexed descriptors of each query row, searched in parallel chunks.

    A FLANN search only reads the index, and OpenCV releases the GIL while it runs.
    """
    chunks = np.array_split(query, max(1, min(workers, len(query) // 1000)))
    with ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(
            lambda part: index.knnSearch(part, NEIGHBOURS, params={"checks": CHECKS}), chunks))
    return np.concatenate([h for h, _ in found]), np.concatenate([d for _, d in found])


def _label_links(features: list[tuple[np.ndarray, np.ndarray]], comp: np.ndarray, workers: int,
                 ) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], int],
                            dict[tuple[int, int], int]]:
    """Largest and summed verified inliers per pair of groups ``(a, b)``, ``a < b``, in one label,
    and the verified inliers of each image pair (indices into ``features``).

    Every image pair counts once, with its best inliers over both query directions and both
    mirror states; the sum runs over the image pairs of the two groups.

    Args:
        features: SIFT ``(points, descriptors)`` of the representatives.
        comp: group of each representative.
        workers: threads for the descriptor search.
    """
    owner = np.concatenate([np.full(len(d), i) for i, (_, d) in enumerate(features)])
    points = np.concatenate([p for p, _ in features])
    desc = np.concatenate([d for _, d in features])
    pair_best: dict[tuple[int, int], int] = {}
    if len(desc) > NEIGHBOURS:
        index = _index(desc)
        for query_points, query in _views(points, desc):
            hits, distance = _knn(index, query, workers)
            keep = comp[owner[hits]] != comp[owner][:, None]
            rows, hits, distance = np.nonzero(keep)[0], hits[keep], distance[keep]
            key = owner[rows].astype(np.int64) * len(features) + owner[hits]
            kept = _one_to_one(key, rows, hits, distance)
            rows, hits, key = rows[kept], hits[kept], key[kept]
            for a, b, n in _verify(query_points[rows], points[hits], key, len(features)):
                pair = (min(a, b), max(a, b))
                pair_best[pair] = max(pair_best.get(pair, 0), n)
    best: dict[tuple[int, int], int] = {}
    total: dict[tuple[int, int], int] = {}
    for (a, b), n in pair_best.items():
        pair = (min(comp[a], comp[b]), max(comp[a], comp[b]))
        best[pair] = max(best.get(pair, 0), n)
        total[pair] = total.get(pair, 0) + n
    return best, total, pair_best


def link_groups(sift: SiftCache, members: list[np.ndarray], component: np.ndarray,
                small: int, evidence: list | None = None) -> np.ndarray:
    """Index pairs that join groups verified as copies by keypoint matching.

    Args:
        sift: SIFT features of the images.
        members: index arrays of the images of each label (groups never span labels).
        component: current group of each image.
        small: groups smaller than this are joined to the large group with the most summed
            inliers (at least ``SMALL_EVIDENCE``), else to such a small group; two groups at
            least this large join when one image pair reaches ``LARGE_INLIERS``.
        evidence: if given, extended with ``(image, image, inliers)`` of every image pair
            verified (for ``join_large``).

    Returns:
        int array ``[M, 2]`` of image index pairs to add to the near-duplicate graph.
    """
    sizes = np.bincount(component)
    chosen = np.concatenate([_representatives(component, m, small) for m in members] or [[]])
    chosen = np.unique(chosen.astype(int))
    sift.get(chosen)
    first = {c: i for i, c in reversed(list(enumerate(component)))}
    links = []
    for m in members:
        reps = m[np.isin(m, chosen)]
        best, total, pair_best = _label_links(sift.get(reps), component[reps], sift.workers)
        if evidence is not None:
            evidence += [(int(reps[a]), int(reps[b]), n) for (a, b), n in pair_best.items()]
        small_best: dict[int, tuple[int, tuple[bool, int]]] = {}
        for (a, b), n in total.items():
            if sizes[a] >= small and sizes[b] >= small:
                if best[a, b] >= LARGE_INLIERS:
                    links.append((first[a], first[b]))
                continue
            for one, other in ((a, b), (b, a)):
                # a large group beats any small one: pieces of one source (a few copies, lone
                # copies) that only chose each other would otherwise stay apart from it
                rank = (sizes[other] >= small, n)
                if sizes[one] < small and n >= SMALL_EVIDENCE and rank > small_best.get(
                        one, (0, (False, 0)))[1]:
                    small_best[one] = (other, rank)
        links += [(first[one], first[other]) for one, (other, _) in small_best.items()]
    return np.array(links, int).reshape(-1, 2)


def join_large(sift: SiftCache, component: np.ndarray, small: int,
               evidence: list[tuple[int, int, int]]) -> np.ndarray:
    """Index pairs joining large groups that are pieces of one source.

    A source whose copies formed two large groups before any stage joined them leaks whenever
    the split puts the two on different sides, and ``link_groups`` joins two large groups only
    on one very strong image pair (``LARGE_INLIERS``), which pieces of a zoomed, rotated source
    may never reach. Every pair of large groups holding an image pair that ``link_groups``
    verified with ``COPY_INLIERS`` is matched exhaustively, representative against
    representative, and joined when ``LARGE_PAIRS`` of those pairs reach ``COPY_INLIERS`` (two
    overlapping sources may join too: merging costs a little stratification, a split source
    leaks).

    Args:
        sift: SIFT features of the images.
        component: current group of each image.
        small: groups at least this large are checked.
        evidence: ``(image, image, inliers)`` of image pairs (``link_groups``' ``evidence``).

    Returns:
        int array ``[M, 2]`` of image index pairs to add to the near-duplicate graph.
    """
    sizes = np.bincount(component)
    first = np.unique(component, return_index=True)[1]
    candidates = sorted({(min(component[a], component[b]), max(component[a], component[b]))
                         for a, b, n in evidence if n >= COPY_INLIERS
                         and component[a] != component[b]
                         and min(sizes[component[a]], sizes[component[b]]) >= small})
    groups = {}
    links = []
    for a, b in candidates:
        for c in (a, b):
            if c not in groups:
                groups[c] = _representatives(component, np.flatnonzero(component == c), small)
        targets = sift.get(groups[b])
        strong = 0
        for points, desc in sift.get(groups[a]):
            found = matching.inliers(_views(points, desc), targets, COPY_INLIERS, vote=True)
            strong += int((found >= COPY_INLIERS).sum())
        if strong >= LARGE_PAIRS:
            links.append((first[a], first[b]))
    return np.array(links, int).reshape(-1, 2)


def _representatives(component: np.ndarray, images: np.ndarray, small: int,
                     many: int = REPRESENTATIVES) -> np.ndarray:
    """Evenly spaced ``many`` members of each large group, every member of a small one."""
    chosen = []
    for c in np.unique(component[images]):
        inside = images[component[images] == c]
        take = min(len(inside), many if len(inside) >= small else small)
        chosen.append(inside[np.linspace(0, len(inside) - 1, take).round().astype(int)])
    return np.concatenate(chosen) if chosen else np.zeros(0, int)


def pair_inliers(sift: SiftCache, pairs: np.ndarray) -> np.ndarray:
    """RANSAC similarity inliers of cross-checked matches of each image pair (either mirror state).

    Args:
        sift: SIFT features of the images.
        pairs: int array ``[M, 2]`` of image indices.

    Returns:
        int array ``[M]``: the inliers of each pair (0 when too few keypoints match).
    """
    pairs = np.asarray(pairs, int).reshape(-1, 2)
    sift.get(np.unique(pairs))

    def count(pair: np.ndarray) -> int:
        points, desc = sift.get([pair[0]])[0]
        return int(matching.inliers(_views(points, desc), sift.get([pair[1]]))[0])

    with threadpool_limits(1, "blas"), ThreadPoolExecutor(sift.workers) as pool:
        return np.fromiter(pool.map(count, pairs), int, len(pairs))


def join_unsure(sift: SiftCache, component: np.ndarray, units: list[np.ndarray],
                nearest: np.ndarray, small: int, thorough: np.ndarray | None = None) -> np.ndarray:
    """Index pairs that join each unsure unit of images to the group it matches directly.

    A unit is a few images checked together: the members of a small group, or one image joined
    to its group only by a weak correlation. Up to ``small`` of its images are matched, by
    cross-checked brute force, against the representatives of every other group that holds one
    of their ``nearest`` images; inliers of image pairs reaching ``PAIR_INLIERS`` are summed per
    group, and the group with the largest sum, if at least ``SMALL_EVIDENCE``, is joined. Units
    are checked in parallel (``sift.workers`` threads).

    Args:
        sift: SIFT features of the images.
        component: current group of each image.
        units: int arrays of image indices, each within one group.
        nearest: ``[N, k]`` indices of each image's most similar images of the same label by a
            global descriptor (candidates; a row may be padded with its own index).
        small: images checked per unit, and the size below which a group is represented by
            all its members rather than ``REPRESENTATIVES`` of them.
        thorough: per image, whether a unit holding it is matched against ``THOROUGH``
            members of each candidate group (e.g. soft, zoomed-in images) instead, counting
            only pairs with ``COPY_INLIERS``.

    Returns:
        int array ``[M, 2]`` of image index pairs to add to the near-duplicate graph.
    """
    groups = np.split(np.argsort(component, kind="stable"),
                      np.cumsum(np.bincount(component))[:-1])
    plans = []
    for unit in units:
        unit = np.asarray(unit)[:small]
        deep = thorough is not None and bool(thorough[unit].any())
        candidates = np.setdiff1d(component[nearest[unit].ravel()], [component[unit[0]]])
        reps = [_representatives(component, groups[c], small,
                                 many=THOROUGH if deep else REPRESENTATIVES) for c in candidates]
        plans.append((unit, COPY_INLIERS if deep else PAIR_INLIERS, candidates, reps))
    sift.get(np.concatenate([u for u, *_ in plans] + [r for *_, reps in plans for r in reps]
                            or [[]]).astype(int))

    def check(plan: tuple) -> tuple[int, int] | None:
        unit, need, candidates, reps = plan
        if not len(candidates):
            return None
        owner = np.repeat(np.arange(len(candidates)), [len(r) for r in reps])
        targets = sift.get(np.concatenate(reps))
        evidence = np.zeros(len(candidates), int)
        for points, desc in sift.get(unit):
            found = matching.inliers(_views(points, desc), targets, need,
                                     vote=True)
            evidence += np.bincount(owner, np.where(found >= need, found, 0),
                                    len(candidates)).astype(int)
        if evidence.max() < SMALL_EVIDENCE:
            return None
        return int(unit[0]), int(groups[candidates[evidence.argmax()]][0])

    with threadpool_limits(1, "blas"), ThreadPoolExecutor(sift.workers) as pool:
        links = [link for link in pool.map(check, plans) if link is not None]
    return np.array(links, int).reshape(-1, 2)


def cross_matches(sift: SiftCache, queries: np.ndarray, database: np.ndarray,
                  min_inliers: int = COPY_INLIERS) -> list[tuple[int, int, int]]:
    """The best verified copy in ``database`` of each query image, by keypoints alone.

    Independent of the log-polar grouping and of any group: every descriptor of every database
    image goes into one FLANN index; each query (as shot and mirrored) votes, one vote per query
    keypoint and database image, for the images its descriptors' nearest neighbours belong to;
    the ``CANDIDATES`` most voted-for images are verified by cross-checked matching and a RANSAC
    similarity fit (rotation, zoom, translation). The index is built from a fixed seed, so the
    same images give the same pairs on every run.

    Args:
        sift: SIFT features of the images.
        queries: indices of the images to look up (e.g. the test tiles of one label).
        database: indices of the images to look in (e.g. the training tiles of that label).
        min_inliers: inliers for a pair to count as a copy.

    Returns:
        ``(query, database image, inliers)`` for each query whose best candidate reaches
        ``min_inliers``.
    """
    queries, database = np.asarray(queries, int), np.asarray(database, int)
    features = sift.get(database)
    owner = np.concatenate([np.full(len(d), i) for i, (_, d) in zip(database, features)] or [[]])
    if len(owner) <= NEIGHBOURS or len(queries) == 0:
        return []
    index = _index(np.concatenate([d for _, d in features]))

    def best(query: int) -> tuple[int, int, int]:
        points, desc = sift.get([query])[0]
        views = _views(points, desc)
        votes = [np.zeros(0, np.int64)]
        for flip, (_, view) in enumerate(views):
            if len(view):
                hits, _ = index.knnSearch(view, NEIGHBOURS, params={"checks": 64})
                keypoint = np.arange(len(view))[:, None] + flip * len(view)
                votes.append(((owner[hits].astype(np.int64) << 20) + keypoint).ravel())
        images, counts = np.unique(np.unique(np.concatenate(votes)) >> 20, return_counts=True)
        candidates = images[np.argsort(-counts, kind="stable")[:CANDIDATES]]
        inliers = matching.inliers(views, sift.get(candidates)).tolist()
        top = int(np.argmax(inliers)) if inliers else 0
        return int(query), int(candidates[top]) if inliers else -1, inliers[top] if inliers else 0

    sift.get(queries)
    with threadpool_limits(1, "blas"), ThreadPoolExecutor(sift.workers) as pool:
        return [m for m in pool.map(best, queries.tolist()) if m[2] >= min_inliers]
