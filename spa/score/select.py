"""Which calibration samples to use when the pool holds more than asked for (PASER, Zhao et al.
2024: choose calibration data for coverage, not at random).

The pool runs through the model once; each sample is described by the model's own outputs
(centred, reduced to their leading principal directions), these are clustered into as
many clusters as samples are asked for (k-means), and the sample nearest each centre is kept:
one per cluster, so every region of what the model does is represented once."""

from __future__ import annotations

import numpy as np


def diverse_samples(features: np.ndarray, count: int, seed: int = 0, iterations: int = 20,
                    restarts: int = 4) -> np.ndarray:
    """Indices of ``count`` rows of ``features`` (samples x dims), one nearest each k-means
    centre, sorted."""
    n = len(features)
    if count >= n:
        return np.arange(n)
    x = features.reshape(n, -1).astype(np.float64)
    # one scale for all dims: scaling each to unit variance let noise in flat dims split clusters
    x = (x - x.mean(0)) / (x.std() + 1e-12)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    x = u[:, :32] * s[:32]
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):                  # k-means finds local optima: keep the tightest of a few
        centres = _kmeans(x, count, rng, iterations)
        sse = float(_distances(x, centres).min(axis=1).sum())
        if best is None or sse < best[0]:
            best = (sse, centres)
    centres = best[1]
    dist = _distances(x, centres)                                    # (n, count)
    chosen: list[int] = []
    for k in np.argsort(dist.min(axis=0)):    # each centre takes its nearest sample not yet taken
        order = np.argsort(dist[:, k])
        chosen.append(int(next(i for i in order if i not in chosen)))
    return np.sort(np.array(chosen))


def _kmeans(x: np.ndarray, count: int, rng, iterations: int) -> np.ndarray:
    n = len(x)
    centres = [x[rng.integers(n)]]
    for _ in range(1, count):                  # k-means++: far points are likelier centres
        d = _distances(x, np.array(centres)).min(axis=1).clip(min=0)
        centres.append(x[rng.choice(n, p=d / d.sum()) if d.sum() > 0 else rng.integers(n)])
    centres = np.array(centres)
    for _ in range(iterations):
        label = np.argmin(_distances(x, centres), axis=1)
        for k in range(count):
            if np.any(label == k):
                centres[k] = x[label == k].mean(0)
    return centres


def _distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distances (n, k), without an n x k x dims temporary."""
    return (x ** 2).sum(1)[:, None] - 2 * x @ centres.T + (centres ** 2).sum(1)[None, :]


def select_feeds(model, count: int, layout, feed_batches, seed: int = 0) -> np.ndarray:
    """Which ``count`` samples of the pool to use, chosen by ``diverse_samples`` on the
    model's outputs; ``feed_batches`` is the pool as feed dicts, in order."""
    from ..runtime import session
    sess = session(model)
    parts = []
    for feeds in feed_batches:
        outs = [y for y in sess.run(None, feeds) if y.dtype.kind == "f" and y.ndim and y.size]
        n = layout.count(feeds)
        parts.append(np.concatenate([y.reshape(n, -1) if len(y) == n else np.broadcast_to(y.reshape(1, -1), (n, y.size))
                                     for y in outs], axis=1))
    return diverse_samples(np.concatenate(parts), count, seed)
