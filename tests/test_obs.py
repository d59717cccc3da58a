"""OBS against brute force: same removed columns -> same weights and error as least squares."""

import numpy as np

from spa.score.obs import Consumer, damped_inverse, greedy_obs


def least_squares(w, x, kept):
    """argmin_V ||W X - V X_kept||^2, solved directly."""
    v, *_ = np.linalg.lstsq(x[kept].T, (w @ x).T, rcond=None)
    return v.T


def test_obs_matches_least_squares_on_linear_layer():
    rng = np.random.default_rng(0)
    d, out, n = 12, 5, 400
    x = rng.standard_normal((d, n)) * rng.uniform(0.2, 2, (d, 1))
    x[3] = x[1] * 0.9 + 0.1 * x[3]                         # correlated inputs: compensation matters
    w = rng.standard_normal((out, d))
    h = x @ x.T
    c = Consumer(w.copy(), np.linalg.inv(h), [np.array([j]) for j in range(d)])
    removed, _ = greedy_obs([c], d, 5, steps=5)
    kept = np.setdiff1d(np.arange(d), removed)
    v = least_squares(w, x, kept)
    np.testing.assert_allclose(c.weight[:, kept], v, atol=1e-6)
    assert np.all(c.weight[:, removed] == 0)
    err_obs = np.linalg.norm(w @ x - c.weight @ x) ** 2
    err_ls = np.linalg.norm(w @ x - v @ x[kept]) ** 2
    assert abs(err_obs - err_ls) <= 1e-6 * max(1, err_ls)


def test_obs_block_columns_match_least_squares():
    """A channel owning several columns (conv taps) is removed as a block."""
    rng = np.random.default_rng(1)
    channels, taps, out, n = 6, 3, 4, 500
    d = channels * taps
    x = rng.standard_normal((d, n))
    w = rng.standard_normal((out, d))
    cols = [np.arange(j * taps, (j + 1) * taps) for j in range(channels)]
    c = Consumer(w.copy(), np.linalg.inv(x @ x.T), cols)
    removed, _ = greedy_obs([c], channels, 3, steps=2)      # 2 channels per step, then 1
    kept = np.concatenate([cols[j] for j in range(channels) if j not in removed])
    np.testing.assert_allclose(c.weight[:, kept], least_squares(w, x, kept), atol=1e-6)


def test_compensation_never_worse_than_none():
    rng = np.random.default_rng(2)
    d, out, n = 16, 8, 300
    x = rng.standard_normal((d, n)) + rng.standard_normal((1, n))   # shared component
    w = rng.standard_normal((out, d))
    c = Consumer(w.copy(), damped_inverse(x @ x.T, 0.01), [np.array([j]) for j in range(d)])
    removed, _ = greedy_obs([c], d, 8)
    plain = w.copy()
    plain[:, removed] = 0
    assert np.linalg.norm(w @ x - c.weight @ x) <= np.linalg.norm(w @ x - plain @ x) + 1e-9


def test_group_cost_sums_consumers():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 100))
    cs = [Consumer(rng.standard_normal((3, 4)), np.linalg.inv(x @ x.T), [np.array([j]) for j in range(4)])
          for _ in range(2)]
    total = cs[0].costs(range(4)) + cs[1].costs(range(4))
    removed, cost = greedy_obs(cs, 4, 1)
    assert removed.tolist() == [int(np.argmin(total))]


def _wide_layer(seed, n=120, channels=40, taps=8, out=6):
    """More features (channels x taps) than sampled rows, with correlated columns: the Hessian
    is low rank plus the damping, as on a wide 1-D conv."""
    rng = np.random.default_rng(seed)
    d = channels * taps
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, 8:16] = 0.8 * x[:, :8] + 0.2 * x[:, 8:16]
    w = rng.standard_normal((out, d))
    return x, w, [np.arange(j * taps, (j + 1) * taps) for j in range(channels)]


def _same_weights(low, dense):
    """The low-rank consumer's weights are the dense one's to float32's precision: its update's
    last product is float32 (the weights are written so), so a few rounding errors of the update
    add up, never more than 1e-5 of the largest weight."""
    np.testing.assert_allclose(low.weight, dense.weight, rtol=0, atol=1e-5 * np.abs(dense.weight).max())


def test_low_rank_consumer_matches_dense():
    """Woodbury on the rows gives the dense damped OBS's costs, choice and compensation."""
    from spa.score.obs import LowRankConsumer, damping_of
    x, w, cols = _wide_layer(4)
    h = x.T.astype(np.float64) @ x
    lam = damping_of(np.diag(h), 0.01)
    dense = Consumer(w.copy(), np.linalg.inv(h + lam * np.eye(len(h))), cols)
    low = LowRankConsumer(w.copy(), x, lam, cols)
    np.testing.assert_allclose(low.costs(range(40)), dense.costs(range(40)), rtol=1e-6)
    r_dense, _ = greedy_obs([dense], 40, 15, max_dim=100)       # wide: one joint removal
    r_low, _ = greedy_obs([low], 40, 15, max_dim=100)
    assert r_low.tolist() == r_dense.tolist()
    _same_weights(low, dense)


def test_low_rank_consumer_removes_twice_like_dense():
    """A consumer shared by two groups loses columns twice; the second removal starts from
    the first's kept columns (as the dense H^-1 downdate does)."""
    from spa.score.obs import LowRankConsumer, damping_of
    x, w, cols = _wide_layer(5)
    h = x.T.astype(np.float64) @ x
    lam = damping_of(np.diag(h), 0.01)
    dense = Consumer(w.copy(), np.linalg.inv(h + lam * np.eye(len(h))), cols)
    low = LowRankConsumer(w.copy(), x, lam, cols)
    for chans in ([3, 9, 20], [0, 31]):
        dense.remove(chans)
        low.remove(chans)
        alive = [j for j in range(40) if j not in (3, 9, 20, 0, 31)]
        np.testing.assert_allclose(low.costs(alive), dense.costs(alive), rtol=1e-6)
    _same_weights(low, dense)


def test_low_rank_consumer_removing_a_gone_column_again_changes_nothing():
    """A column already removed is not taken out of the Gram twice."""
    from spa.score.obs import LowRankConsumer, damping_of
    x, w, cols = _wide_layer(6)
    lam = damping_of(np.diag(x.T.astype(np.float64) @ x), 0.01)
    once, twice = (LowRankConsumer(w.copy(), x, lam, cols) for _ in range(2))
    once.remove([3, 9])
    twice.remove([3, 9])
    twice.remove([9])
    alive = [j for j in range(40) if j not in (3, 9)]
    np.testing.assert_allclose(twice.costs(alive), once.costs(alive), rtol=1e-9)
    np.testing.assert_allclose(twice.weight, once.weight, rtol=1e-9, atol=1e-12)


def test_low_rank_consumer_one_column_channels_match_dense():
    """Channels of one column (an MLP's neurons) take the scalar path of the costs; channels of
    one and of several columns in one consumer are costed and removed like the dense OBS's."""
    from spa.score.obs import LowRankConsumer, damping_of
    x, w, _ = _wide_layer(7)
    cols = [np.array([j]) for j in range(200)] + [np.arange(200 + 4 * j, 204 + 4 * j) for j in range(30)]
    h = x.T.astype(np.float64) @ x
    lam = damping_of(np.diag(h), 0.01)
    dense = Consumer(w.copy(), np.linalg.inv(h + lam * np.eye(len(h))), cols)
    low = LowRankConsumer(w.copy(), x, lam, cols)
    np.testing.assert_allclose(low.costs(range(230)), dense.costs(range(230)), rtol=1e-6)
    r_dense, _ = greedy_obs([dense], 230, 60, steps=3, max_dim=1000)
    r_low, _ = greedy_obs([low], 230, 60, steps=3, max_dim=1000)
    assert r_low.tolist() == r_dense.tolist()
    _same_weights(low, dense)


def test_costs_are_the_obs_formula():
    """A channel's cost is tr(W_c [(H^-1)_cc]^-1 W_c^T), for one column (w^2 / h) and several."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((10, 200))
    w = rng.standard_normal((3, 10))
    hinv = np.linalg.inv(x @ x.T)
    cols = [np.array([j]) for j in range(4)] + [np.array([4, 5, 6]), np.array([7, 8, 9])]
    got = Consumer(w.copy(), hinv.copy(), cols).costs(range(6))
    want = [np.trace(w[:, c] @ np.linalg.inv(hinv[np.ix_(c, c)]) @ w[:, c].T) for c in cols]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_a_weight_held_in_fortran_order_is_updated_as_one_in_c_order():
    """A MatMul's (out, D) weight is the transpose of the stored (D, out), kept in Fortran order
    (obspa.obs_consumer): greedy OBS updates it to the same values, in that order, dense and low rank."""
    from spa.score.obs import LowRankConsumer, damping_of
    x, w, cols = _wide_layer(5)
    h = x.T.astype(np.float64) @ x
    lam = damping_of(np.diag(h), 0.01)
    for make, max_dim in ((lambda w: Consumer(w, np.linalg.inv(h + lam * np.eye(len(h))), cols), 1000),
                          (lambda w: Consumer(w, np.linalg.inv(h + lam * np.eye(len(h))), cols), 100),
                          (lambda w: LowRankConsumer(w, x, lam, cols), 100)):
        c_order, f_order = make(w.copy()), make(np.asfortranarray(w))
        removed = [greedy_obs([c], 40, 15, max_dim=max_dim)[0] for c in (c_order, f_order)]
        assert removed[0].tolist() == removed[1].tolist()
        assert f_order.weight.flags.f_contiguous and not f_order.weight.flags.c_contiguous
        np.testing.assert_allclose(f_order.weight, c_order.weight, rtol=0, atol=1e-5 * np.abs(w).max())
        assert np.abs(f_order.weight - w).max() > 1e-3          # (it was updated)
