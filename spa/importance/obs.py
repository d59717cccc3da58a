"""Group Optimal Brain Surgeon: which input channels of a set of layers to remove, and how
to update the kept weights so each layer's output changes least.

For one layer with weights W (out x D) and inputs X (D x n), H = X X^T + damping. Removing
the columns S costs ``tr(W_S [(H^-1)_SS]^-1 W_S^T)`` and the best update of the other columns
is ``-W_S [(H^-1)_SS]^-1 (H^-1)_S,:``. A channel owns a block of columns in every consumer
(a conv's kh*kw taps, a flattened channel's H*W features); its cost is the sum over
consumers. Channels go greedily, cheapest first, with H^-1 downdated after each removal
(a few channels per step on wide layers: one BLAS update instead of many).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Consumer", "greedy_obs", "damped_inverse"]


@dataclass
class Consumer:
    """One layer that reads the group's channels."""

    weight: np.ndarray            # (out, D) float64, updated in place by greedy_obs
    hinv: np.ndarray              # (D, D) inverse of the damped Hessian, downdated in place
    columns: list[np.ndarray]     # per channel, its columns in ``weight``
    shared: bool = False          # read by several groups: later groups need H^-1 downdated

    def costs(self, channels) -> np.ndarray:
        channels = list(channels)
        out = np.zeros(len(channels))
        by_width: dict[int, list[int]] = {}
        for i, j in enumerate(channels):
            by_width.setdefault(len(self.columns[j]), []).append(i)
        for width, positions in by_width.items():
            if width == 0:
                continue
            # all channels of one width at once, in chunks that keep memory bounded
            chunk = max(1, int(2e7 // max(1, width * width + width * self.weight.shape[0])))
            for start in range(0, len(positions), chunk):
                pos = positions[start:start + chunk]
                cols = np.stack([self.columns[channels[i]] for i in pos])          # (m, b)
                blocks = self.hinv[cols[:, :, None], cols[:, None, :]]             # (m, b, b)
                w = self.weight[:, cols].transpose(1, 2, 0)                        # (m, b, out)
                out[pos] = np.sum(w * np.linalg.solve(blocks, w), axis=(1, 2))
        return out

    def remove(self, channels, last: bool = False):
        """Remove channels jointly; ``last`` skips the H^-1 downdate nobody will read."""
        cols = np.concatenate([self.columns[j] for j in channels]) if channels else np.array([], int)
        if len(cols) == 0:
            return
        block = self.hinv[np.ix_(cols, cols)]
        if last:
            # W_S [(H^-1)_SS]^-1 first: (out x s) instead of (s x D) before the product
            a = np.linalg.solve(block, self.weight[:, cols].T).T
            self.weight -= a @ self.hinv[cols, :]
            self.weight[:, cols] = 0.0
            return
        coef = np.linalg.solve(block, self.hinv[cols, :])   # [(H^-1)_SS]^-1 (H^-1)_S,:
        self.weight -= self.weight[:, cols] @ coef
        self.weight[:, cols] = 0.0
        self.hinv -= self.hinv[:, cols] @ coef
        self.hinv[:, cols] = 0.0
        self.hinv[cols, :] = 0.0


def damped_inverse(h: np.ndarray, damping: float = 0.01, float32_above: int = 2048) -> np.ndarray:
    """(H + damping * mean(diag H) * I)^-1, in float64 (float32 for very wide layers, where
    the damping keeps the condition number low and the inverse costs 2 D^3)."""
    h = np.array(h, dtype=np.float64)
    d = np.diag(h)
    lam = damping * (float(d.mean()) if d.size and d.mean() > 0 else 1.0)
    h[np.diag_indices_from(h)] += lam
    if len(h) > float32_above:
        return np.linalg.inv(h.astype(np.float32)).astype(np.float64)
    return np.linalg.inv(h)


def greedy_obs(consumers: list[Consumer], n_channels: int, n_remove: int, steps: int = 32,
               max_dim: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Remove ``n_remove`` of ``n_channels`` channels; return (removed, cost per channel at
    the time it was removed, or at the end for the kept ones). Updates consumers in place.

    Downdating H^-1 costs D^2 per removed column; when a consumer is wider than ``max_dim``
    the channels are chosen on their first costs and removed in one joint, exact update."""
    if any(c.hinv.shape[0] > max_dim for c in consumers):
        steps = 1
    alive = list(range(n_channels))
    removed: list[int] = []
    final_cost = np.zeros(n_channels)
    per_step = max(1, int(np.ceil(n_remove / steps)))
    while len(removed) < n_remove:
        cost = sum((c.costs(alive) for c in consumers), np.zeros(len(alive)))
        take = min(per_step, n_remove - len(removed))
        order = np.argsort(cost, kind="stable")[:take]
        chosen = [alive[i] for i in order]
        for i in order:
            final_cost[alive[i]] = cost[i]
        last = len(removed) + len(chosen) == n_remove
        for c in consumers:
            c.remove(chosen, last=last and not c.shared)
        removed.extend(chosen)
        alive = [j for j in alive if j not in set(chosen)]
    return np.array(sorted(removed), dtype=np.int64), final_cost
