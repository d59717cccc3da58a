"""Group Optimal Brain Surgeon: which input channels of a set of layers to remove, and how
to update the kept weights so each layer's output changes least.

For one layer with weights W (out x D) and inputs X (D x n), H = X X^T + damping. Removing
the columns S costs ``tr(W_S [(H^-1)_SS]^-1 W_S^T)`` and the best update of the other columns
is ``-W_S [(H^-1)_SS]^-1 (H^-1)_S,:``. A channel owns a block of columns in every consumer
(a conv's kh*kw taps, a flattened channel's H*W features); its cost is the sum over
consumers. Channels go greedily, cheapest first, with H^-1 downdated after each removal
(a few channels per step on wide layers: one BLAS update instead of many).

A layer wider than the rows that were sampled for it (a 1-D conv over 1024 channels x 64 taps
sees D = 65536 features in 2048 rows) has a Hessian of low rank plus the damping:
``LowRankConsumer`` keeps the rows X (n x D) and works through the Woodbury identity
(lam I + X^T X)^-1 = (I - X^T (lam I + X X^T)^-1 X) / lam, so nothing D x D is ever formed:
an n x n inverse instead of a D x D one (crepe tiny, data-free: 18 s of inverses -> under 1 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Consumer", "LowRankConsumer", "greedy_obs", "damped_inverse", "damping_of"]


@dataclass
class Consumer:
    """One layer that reads the group's channels."""

    weight: np.ndarray            # (out, D) float64, updated in place by greedy_obs
    hinv: np.ndarray              # (D, D) inverse of the damped Hessian, downdated in place
    columns: list[np.ndarray]     # per channel, its columns in ``weight``
    shared: bool = False          # read by several groups: later groups need H^-1 downdated

    def costs(self, channels) -> np.ndarray:
        return _costs(list(channels), self.columns, self.weight,
                      lambda cols: self.hinv[cols[:, :, None], cols[:, None, :]], lambda width: width * width)

    def remove(self, channels, last: bool = False):
        """Remove channels jointly; ``last`` skips the H^-1 downdate nobody will read."""
        cols = np.concatenate([self.columns[j] for j in channels]) if channels else np.array([], int)
        if len(cols) == 0:
            return
        block = self.hinv[np.ix_(cols, cols)]
        if last:
            # W_S [(H^-1)_SS]^-1 first: (out x s) instead of (s x D) before the product
            a = np.linalg.solve(block, self.weight[:, cols].T).T
            self.weight -= _product(a, self.hinv[cols, :], self.weight)
            self.weight[:, cols] = 0.0
            return
        coef = np.linalg.solve(block, self.hinv[cols, :])   # [(H^-1)_SS]^-1 (H^-1)_S,:
        self.weight -= _product(self.weight[:, cols], coef, self.weight)
        self.weight[:, cols] = 0.0
        self.hinv -= self.hinv[:, cols] @ coef
        self.hinv[:, cols] = 0.0
        self.hinv[cols, :] = 0.0


def _product(a: np.ndarray, b: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``a @ b`` in the memory order of ``like``, so that updating ``like`` in place reads both
    in order: a MatMul's weight (D, out) is updated as its (out, D) transpose, Fortran-ordered."""
    if like.flags.f_contiguous and not like.flags.c_contiguous:
        return (b.T @ a.T).T
    return a @ b


def damping_of(diag: np.ndarray, damping: float) -> float:
    """The absolute damping added to H's diagonal: ``damping`` times its mean."""
    return damping * (float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0)


def damped_inverse(h: np.ndarray, damping: float = 0.01, float32_above: int = 2048) -> np.ndarray:
    """(H + damping * mean(diag H) * I)^-1, in float64 (float32 for very wide layers, where
    the damping keeps the condition number low and the inverse costs 2 D^3)."""
    h = np.array(h, dtype=np.float64)
    h[np.diag_indices_from(h)] += damping_of(np.diag(h), damping)
    if len(h) > float32_above:
        return np.linalg.inv(h.astype(np.float32)).astype(np.float64)
    return np.linalg.inv(h)


@dataclass
class LowRankConsumer:
    """A ``Consumer`` whose damped Hessian is lam I + X^T X, X the n sampled rows (n < D).
    Removing columns is exact: the kept weights are refit to the damped least-squares
    optimum, which is what OBS's joint update of the removed set computes. Woodbury subtracts
    nearly equal terms when lam is small, so the products stay in float64 (float32 left 5e-5
    relative error in the costs)."""

    weight: np.ndarray            # (out, D) float64, updated in place
    rows: np.ndarray              # (n, D)
    lam: float
    columns: list[np.ndarray]
    shared: bool = False

    def __post_init__(self):
        self.rows = np.asarray(self.rows, dtype=np.float64)
        self.alive = np.ones(self.weight.shape[1], dtype=bool)
        self._gram = None

    def gram(self) -> np.ndarray:
        """lam I + X_A X_A^T over the alive columns A (n x n), made once and downdated as
        columns go: forming it costs n^2 D, a downdate n^2 per removed column."""
        if self._gram is None:
            x = self.rows if self.alive.all() else self.rows[:, self.alive]
            self._gram = x @ x.T
            self._gram[np.diag_indices_from(self._gram)] += self.lam
        return self._gram

    def _whitened(self) -> np.ndarray:
        """Y = L^-1 X (n x D), L the Cholesky factor of ``gram()``: X^T G^-1 X = Y^T Y, whose
        blocks on alive columns are all ``costs`` reads. One n x n inverse and a matmul: LAPACK's
        solve with D right-hand sides was 3x slower on a 1024 x 5632 layer."""
        return np.linalg.inv(np.linalg.cholesky(self.gram())) @ self.rows

    def costs(self, channels) -> np.ndarray:
        y = self._whitened()
        squares = []

        def blocks(cols):
            # (H^-1)_cc = (I - Y_c^T Y_c) / lam, one b x b block per channel
            if cols.shape[1] == 1:      # one column each: 1 - |y_c|^2
                if not squares:
                    squares.append(np.einsum("nd,nd->d", y, y))
                return ((1.0 - squares[0][cols[:, 0]]) / self.lam)[:, None, None]
            yc = y[:, cols.ravel()].reshape(len(y), *cols.shape)
            out = -np.einsum("nmb,nmc->mbc", yc, yc, optimize=True)
            out[:, np.arange(cols.shape[1]), np.arange(cols.shape[1])] += 1.0
            return out / self.lam
        return _costs(list(channels), self.columns, self.weight, blocks, lambda width: 2 * len(y) * width)

    def remove(self, channels, last: bool = False):
        cols = np.concatenate([self.columns[j] for j in channels]) if channels else np.array([], int)
        if len(cols) == 0:
            return
        # W_K += W_R H_RK (H_KK)^-1, H_RK = X_R^T X_K, which Woodbury turns into
        # W_R X_R^T (lam I + X_K X_K^T)^-1 X_K: the removed columns' share of the output, refit
        # by the kept ones (no difference of nearly equal terms, and nothing D-sized but X_K).
        # The update is formed over all columns and the removed ones zeroed after: gathering and
        # scattering the kept columns cost more than the products on a 2048 x 5632 layer.
        cols = cols[self.alive[cols]]     # a column already gone has left the Gram
        xr = self.rows[:, cols]
        carried = self.weight[:, cols] @ xr.T                                   # (out, n)
        gram = self.gram()
        gram -= xr @ xr.T
        self.alive[cols] = False
        # the update's last product (out x n x D: most of the time) in float32, as the weights are
        # written; the Gram and the rows, where Woodbury's differences are, stay float64
        self.weight += _product((carried @ np.linalg.inv(gram)).astype(np.float32), self.rows.astype(np.float32),
                                self.weight)
        self.weight[:, ~self.alive] = 0.0
        if last:
            self.rows = self._gram = None   # nobody reads this layer again: free its rows early


def _costs(channels: list, columns, weight, blocks_of, block_size) -> np.ndarray:
    """Each channel's OBS cost tr(W_c B_c^-1 W_c^T), B_c = (H^-1)_cc from ``blocks_of(cols)``
    for a stack of channels (m, b) -> (m, b, b): all channels of one width at once, in chunks
    of about 2e7 elements (``block_size(width)`` per channel besides its weights)."""
    out = np.zeros(len(channels))
    squares = None      # each column's sum of squared weights, for channels of one column
    by_width: dict[int, list[int]] = {}
    for i, j in enumerate(channels):
        by_width.setdefault(len(columns[j]), []).append(i)
    for width, positions in by_width.items():
        if width == 0:
            continue
        chunk = max(1, int(2e7 // max(1, block_size(width) + width * weight.shape[0])))
        for start in range(0, len(positions), chunk):
            pos = positions[start:start + chunk]
            cols = np.stack([columns[channels[i]] for i in pos])               # (m, b)
            if width == 1:      # tr(w B^-1 w^T) with a 1 x 1 B: no batched solve
                if squares is None:
                    squares = np.einsum("od,od->d", weight, weight)
                out[pos] = squares[cols[:, 0]] / blocks_of(cols)[:, 0, 0]
                continue
            w = weight[:, cols].transpose(1, 2, 0)                              # (m, b, out)
            out[pos] = np.sum(w * np.linalg.solve(blocks_of(cols), w), axis=(1, 2))
    return out


def greedy_obs(consumers: list[Consumer], n_channels: int, n_remove: int, steps: int = 32,
               max_dim: int = 2048, ordered: bool = False,
               order: np.ndarray | None = None, after_step=None) -> tuple[np.ndarray, np.ndarray]:
    """Remove ``n_remove`` of ``n_channels`` channels; return (removed, cost per channel at
    the time it was removed, or at the end for the kept ones). Updates consumers in place.
    ``removed`` is sorted, or in the order of removal when ``ordered``. ``order`` removes the
    channels in that order instead of cheapest first (what each costs is still measured).
    ``after_step(removed so far)`` is called after each step, the consumers updated.

    Downdating H^-1 costs D^2 per removed column; when a consumer is wider than ``max_dim``
    the channels are chosen on their first costs and removed in one joint, exact update."""
    if any(c.weight.shape[1] > max_dim for c in consumers):
        steps = 1
    alive = list(range(n_channels))
    removed: list[int] = []
    final_cost = np.zeros(n_channels)
    per_step = max(1, int(np.ceil(n_remove / steps)))
    while len(removed) < n_remove:
        cost = sum((c.costs(alive) for c in consumers), np.zeros(len(alive)))
        take = min(per_step, n_remove - len(removed))
        if order is None:
            picked = np.argsort(cost, kind="stable")[:take]
        else:
            where = {j: i for i, j in enumerate(alive)}
            picked = np.array([where[j] for j in order[len(removed):len(removed) + take]], dtype=np.int64)
        chosen = [alive[i] for i in picked]
        for i in picked:
            final_cost[alive[i]] = cost[i]
        last = len(removed) + len(chosen) == n_remove
        for c in consumers:
            c.remove(chosen, last=last and not c.shared)
        removed.extend(chosen)
        gone = set(chosen)
        alive = [j for j in alive if j not in gone]
        if after_step is not None:
            after_step(len(removed))
    return np.array(removed if ordered else sorted(removed), dtype=np.int64), final_cost
