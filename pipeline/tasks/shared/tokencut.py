"""TokenCut: unsupervised salient-region segmentation by a normalized cut of the token graph.

Cells are nodes; two cells are joined with weight 1 where the cosine similarity of their
features exceeds `tau`, else `eps`. The second smallest generalized eigenvector of (D - A, D)
splits the graph at its mean; the side holding the entry of largest magnitude is the
foreground, of which the connected component holding that entry is kept. Works on any map:
attention keys or block outputs, at token stride or at an SRT stride.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse.linalg import eigsh

TAU = 0.2
EPS = 1e-5


@dataclass
class Bipartition:
    mask: np.ndarray  # [h, w] bool: the salient component
    eigenvector: np.ndarray  # [h, w]: the second smallest generalized eigenvector, foreground side positive
    seed: tuple[int, int]  # the cell of largest |eigenvector|


def tokencut(features: np.ndarray, tau: float = TAU, eps: float = EPS) -> Bipartition:
    """Salient region of a feature map [C, h, w].

    (D - A) v = lambda D v is solved as the symmetric problem D^-1/2 A D^-1/2 u = (1 - lambda) u,
    v = D^-1/2 u: its two largest eigenpairs by Lanczos iterations, whose cost is a few products
    with the n x n affinity (n cells) instead of a dense O(n^3) solve.
    """
    channels, h, w = features.shape
    if h * w < 3:
        raise ValueError(f"a {h}x{w} map has too few cells to cut")
    cells = features.reshape(channels, h * w).T.astype(np.float32)
    cells /= np.maximum(np.linalg.norm(cells, axis=1, keepdims=True), 1e-12)
    affinity = np.where(cells @ cells.T > tau, np.float32(1), np.float32(eps))
    scale = 1 / np.sqrt(affinity.sum(1))
    affinity *= scale[:, None]
    affinity *= scale[None, :]
    start = np.random.default_rng(0).uniform(0.5, 1.5, h * w)  # fixed: the same map gives the same cut
    _, vectors = eigsh(affinity, k=2, which="LA", v0=start)
    vector = vectors[:, 0] * scale  # eigsh sorts ascending: column 0 is the second largest
    foreground = vector > vector.mean()
    seed = int(np.argmax(np.abs(vector)))
    if not foreground[seed]:
        vector, foreground = -vector, ~foreground
    components, _ = ndimage.label(foreground.reshape(h, w))
    seed_cell = np.unravel_index(seed, (h, w))
    return Bipartition(components == components[seed_cell], vector.reshape(h, w), (int(seed_cell[0]), int(seed_cell[1])))
