"""Log-polar features of many images: the grouping's rotation-, flip- and zoom-tolerant matcher.

Every image becomes a small band-passed grey image sampled on a log-polar grid around its centre,
so a rotation about the centre is a circular shift along the angle axis, a flip reverses the angle
axis, and a zoom about the centre is a shift along the log-radius axis (``lungtf.data.grouping``
describes how the stages use it).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage, sparse

SIZE = 112
"""Side in pixels every image is resized to before matching."""
ANGLES = 128
"""Angle samples of the log-polar grid (rotation resolution 2.8 degrees)."""
LOG_STEP = 0.04
"""Log-radius step of the grid: one row is a 4% zoom."""
RADII = (2.7, 54.0)
"""Innermost and outermost sampled radius (pixels at ``SIZE``): zoom up to ~3x either way."""
TEMPLATE = (12.0, 32.0)
"""Radius band (pixels at ``SIZE``) of the template that is searched for in the other image."""

def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode an image: ``SIZE`` x ``SIZE`` float32 grey array and its colour statistics.

    The colour statistics (optical-density percentiles, means, spreads and channel correlations)
    describe the stain of the source slide; copies of one source share them even when a
    distortion defeats the geometric match.
    """
    with Image.open(path) as im:
        im.draft("RGB", (SIZE, SIZE))
        rgb = im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    grey = np.asarray(rgb.convert("L"), np.float32)
    density = -np.log((np.asarray(rgb.reduce(4), np.float32).reshape(-1, 3) + 1) / 256)
    spread = density.std(0)
    corr = np.corrcoef(density.T)[np.triu_indices(3, 1)] if spread.min() > 0 else np.zeros(3)
    colour = np.concatenate([np.percentile(density, [10, 25, 50, 75, 90], axis=0).ravel(),
                             density.mean(0), spread, corr])
    return grey, colour


@lru_cache(maxsize=1)
def grid() -> tuple[sparse.csr_matrix, int, int, int]:
    """Bilinear log-polar sampling matrix and the template rows.

    Returns:
        ``(matrix, rows, template_start, template_rows)``: ``matrix @ image.ravel()`` is the
        ``rows x ANGLES`` log-polar image; the template is rows ``template_start`` onwards.
    """
    rows = int(np.log(RADII[1] / RADII[0]) / LOG_STEP) + 1
    radius = RADII[0] * np.exp(LOG_STEP * np.arange(rows))
    theta = np.arange(ANGLES) * 2 * np.pi / ANGLES
    centre = (SIZE - 1) / 2
    y = (centre + radius[:, None] * np.sin(theta)).ravel()
    x = (centre + radius[:, None] * np.cos(theta)).ravel()
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - y0, x - x0
    cols = np.concatenate([y0 * SIZE + x0, (y0 + 1) * SIZE + x0, y0 * SIZE + x0 + 1,
                           (y0 + 1) * SIZE + x0 + 1])
    vals = np.concatenate([(1 - fy) * (1 - fx), fy * (1 - fx), (1 - fy) * fx, fy * fx])
    matrix = sparse.csr_matrix((vals, (np.tile(np.arange(y.size), 4), cols)),
                               shape=(y.size, SIZE * SIZE), dtype=np.float32)
    start = round(np.log(TEMPLATE[0] / RADII[0]) / LOG_STEP)
    length = round(np.log(TEMPLATE[1] / TEMPLATE[0]) / LOG_STEP)
    return matrix, rows, start, length


class Features:
    """Log-polar spectra, template spectra, window statistics and descriptors of many images."""

    def __init__(self, images: np.ndarray):
        matrix, rows, start, length = grid()
        fine = ndimage.gaussian_filter(images, (0, 0.7, 0.7))
        coarse = ndimage.gaussian_filter(images, (0, 4, 4), truncate=3.0)
        middle = ndimage.gaussian_filter(images, (0, 1.4, 1.4))
        self.softness = ((fine - middle) ** 2).mean((1, 2)) / (
            ((middle - coarse) ** 2).mean((1, 2)) + 1e-6)
        band = fine - coarse
        del middle
        polar = (matrix @ band.reshape(len(band), -1).T).T.reshape(len(band), rows, ANGLES)
        self.start, self.length = start, length
        self.spectra = np.fft.rfft(polar, axis=2).astype(np.complex64)
        template = polar[:, start:start + length]
        template = template - template.mean((1, 2), keepdims=True)
        template /= np.linalg.norm(template, axis=(1, 2), keepdims=True) + 1e-6
        self.template = np.fft.rfft(template, axis=2).astype(np.complex64)
        zero = np.zeros((len(polar), 1))
        self.cum = np.concatenate([zero, np.cumsum(polar.sum(2), 1)], 1)
        self.cum_sq = np.concatenate([zero, np.cumsum((polar**2).sum(2), 1)], 1)
        magnitude = np.abs(self.spectra[:, :, 1:33]).reshape(len(polar), rows, 8, 4).sum(3)
        self.pad = 1 << int(np.ceil(np.log2(rows + length)))
        self.mag_search = np.fft.rfft(magnitude, self.pad, axis=1).astype(np.complex64)
        self.mag_template = np.conj(np.fft.rfft(
            np.abs(self.template[:, :, 1:33]).reshape(len(polar), length, 8, 4).sum(3),
            self.pad, axis=1)).astype(np.complex64)
        self.mag_cum = np.concatenate([zero, np.cumsum((magnitude**2).sum(2), 1)], 1)
        magnitude = np.log1p(np.abs(self.spectra[:, :, 1:33]))
        pooled = magnitude[:, : rows // 9 * 9].reshape(len(polar), 9, rows // 9, 32).mean(2)
        desc = pooled.reshape(len(polar), -1)
        desc = desc - desc.mean(0)
        self.descriptor = (desc / (np.linalg.norm(desc, axis=1, keepdims=True) + 1e-6)).astype(
            np.float32)

    def ncc(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Best NCC of ``first``'s template in ``second`` over rotations, flips and zoom shifts.

        The zoom shift is found first from the rotation- and flip-invariant spectrum magnitudes
        (a cheap correlation along log-radius); the full correlation over every rotation and both
        flips is then evaluated only at that shift and its two neighbours.
        """
        rows, length = self.spectra.shape[1], self.length
        template = self.template[first]
        corr = np.fft.irfft(np.einsum("prf,prf->pr", self.mag_search[second],
                                      self.mag_template[first]), self.pad, axis=1)
        energy = self.mag_cum[second]
        corr = corr[:, : rows - length + 1] / np.sqrt(
            np.maximum(energy[:, length:] - energy[:, :-length], 1e-6))
        best_top = corr.argmax(1)
        best = np.full(len(first), -1.0, np.float32)
        size = length * ANGLES
        for offset in (-1, 0, 1):
            top = np.clip(best_top + offset, 0, rows - length)
            total = self.cum[second, top + length] - self.cum[second, top]
            energy = self.cum_sq[second, top + length] - self.cum_sq[second, top]
            scale = np.sqrt(np.maximum(energy - total**2 / size, 1e-6)).astype(np.float32)
            part = self.spectra[second[:, None], top[:, None] + np.arange(length)]
            for flip in (np.conj(part), part):
                corr = np.fft.irfft(np.einsum("prf,prf->pf", template, flip), ANGLES, axis=1)
                np.maximum(best, corr.max(1) / scale, out=best)
        return best


def similar(features: Features, pairs: np.ndarray, workers: int) -> np.ndarray:
    """Symmetric NCC (the larger of both directions) of index pairs, in parallel chunks."""
    if len(pairs) == 0:
        return np.zeros(0, np.float32)
    chunks = np.array_split(np.arange(len(pairs)), max(1, len(pairs) // 2000))

    def score(chunk: np.ndarray) -> np.ndarray:
        a, b = pairs[chunk, 0], pairs[chunk, 1]
        return np.maximum(features.ncc(a, b), features.ncc(b, a))

    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(score, chunks)))


def neighbours(desc: np.ndarray, members: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Pairs ``(query, neighbour)`` of each query's ``k`` nearest members by cosine similarity."""
    k = min(k, len(members) - 1)
    if k < 1 or len(queries) == 0:
        return np.zeros((0, 2), int)
    nearest = []
    for block in np.array_split(queries, -(-len(queries) // 1024)):
        sim = desc[block] @ desc[members].T
        sim[block[:, None] == members[None, :]] = -np.inf
        nearest.append(np.argpartition(-sim, k - 1, axis=1)[:, :k])
    return np.stack([np.repeat(queries, k), members[np.concatenate(nearest).ravel()]], 1)
