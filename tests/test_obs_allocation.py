"""Budgets spent by OBS cost curves (``--allocate obs``): each group's cut priced by the error
OBSPA's compensation leaves, summed across groups."""

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph
from spa.plan.allocate import CostRunner
from spa.runtime import session
from spa.score.obs import Consumer, damped_inverse, greedy_obs
from test_control_flow import SHAPES, control_flow_model


def redundant_and_dense(seed: int = 0) -> onnx.ModelProto:
    """Two MLP branches of the same size added together. Branch ``a``'s 16 hidden neurons are
    8 pairs of identical ones (OBS removes one of each pair at no cost: its twin's outgoing
    weights take over); branch ``b``'s are all different."""
    g = Graph(seed=seed)
    x = g.input([32, 12])
    outs = []
    for name in ("a", "b"):
        w1 = g.rng.standard_normal((12, 16)).astype(np.float32)
        if name == "a":
            w1[:, 8:] = w1[:, :8]
        h = g.op("Relu", [g.op("MatMul", [x, g.const(w1, f"up_{name}")])])
        outs.append(g.op("MatMul", [h, g.const(g.rng.standard_normal((16, 10)).astype(np.float32), f"down_{name}")]))
    g.output(g.op("Add", outs))
    return g.model()


def removed_by_branch(r) -> dict:
    return {name: g["removed"] for g in r.report["groups"] for name in ("a", "b")
            if any(m.startswith(f"up_{name}[") for m in g["members"])}


def relative_error(original, pruned, seed=1) -> float:
    x = np.random.default_rng(seed).standard_normal((32, 12)).astype(np.float32)
    y0 = session(original).run(None, {"x": x})[0]
    y1 = session(pruned).run(None, {"x": x})[0]
    return float(np.linalg.norm(y1 - y0) / np.linalg.norm(y0))


def test_obs_allocation_cuts_where_compensation_is_exact():
    """The twins go, the dense branch stays, and the output is what it was; an even cut
    (uniform) takes neurons from both and changes it."""
    model = redundant_and_dense()
    r = spa.prune(model, params=0.8, allocation="obs", round_to=1, verify=True)
    assert r.report["budget"]["allocation"] == "obs" and r.report["verify"]["ok"]
    assert r.report["budget"]["landed"]
    removed = removed_by_branch(r)
    assert removed["b"] == 0 and 0 < removed["a"] <= 8, removed
    assert relative_error(model, r.model) < 0.02      # not 0: OBS refits with a damped Hessian
    even = spa.prune(model, params=0.8, allocation="uniform", round_to=1, verify=True)
    assert removed_by_branch(even)["b"] > 0
    assert relative_error(model, even.model) > 5 * relative_error(model, r.model)


def loud_and_quiet(seed: int = 0) -> onnx.ModelProto:
    """Two MLP branches alike in every weight, added together after branch ``a``'s output is
    scaled by 30: their layers' own errors look the same, the model's outputs hear ``a``'s."""
    g = Graph(seed=seed)
    x = g.input([32, 12])
    w1 = g.rng.standard_normal((12, 16)).astype(np.float32)
    w2 = g.rng.standard_normal((16, 10)).astype(np.float32)
    outs = []
    for name in ("a", "b"):
        h = g.op("Relu", [g.op("MatMul", [x, g.const(w1.copy(), f"up_{name}")])])
        outs.append(g.op("MatMul", [h, g.const(w2.copy(), f"down_{name}")]))
    loud = g.op("Mul", [outs[0], g.const(np.array(30.0, np.float32), "loudness")])
    g.output(g.op("Add", [loud, outs[1]]))
    return g.model()


def test_obs_allocation_measures_what_reaches_the_outputs():
    """The curves' scale is measured on the model: the quiet branch is cut first."""
    r = spa.prune(loud_and_quiet(), params=0.8, allocation="obs", round_to=1, verify=True)
    removed = removed_by_branch(r)
    assert removed["a"] == 0 and removed["b"] > 0, removed
    assert r.report["verify"]["ok"]


def with_batch_norms(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu, twice, and a 1x1 conv head: synthetic images steered."""
    g = Graph(seed=seed)
    h = g.input([1, 3, 8, 8])
    for c_in, c_out in ((3, 16), (16, 16)):
        h = g.conv(h, c_in, c_out)
        stats = [g.const(v.astype(np.float32)) for v in (1 + 0.3 * g.rng.standard_normal(c_out),
                                                         0.2 * g.rng.standard_normal(c_out),
                                                         0.5 * g.rng.standard_normal(c_out),
                                                         1 + g.rng.random(c_out))]
        h = g.op("Relu", [g.op("BatchNormalization", [h, *stats])])
    g.output(g.conv(h, 16, 4, k=1))
    return g.model()


def test_auto_takes_the_curves_where_statistics_are_anchored():
    """``auto`` spends along OBS curves on calibration data or BatchNorm-steered images, and
    one ratio on unsteered synthetic inputs (where the curves misplace cuts), saying why."""
    steered = spa.prune(with_batch_norms(), macs=0.6, round_to=1, verify=True)
    assert steered.report["budget"]["allocation"] == "obs" and steered.report["verify"]["ok"]
    model = redundant_and_dense()
    free = spa.prune(model, params=0.8, round_to=1, verify=True)
    assert free.report["budget"]["allocation"] == "uniform"
    assert "no calibration data" in free.report["budget"]["obs_allocation_skipped"]
    calib = {"x": np.random.default_rng(3).standard_normal((64, 12)).astype(np.float32)}
    given = spa.prune(model, params=0.8, round_to=1, calib=calib, verify=True)
    assert given.report["budget"]["allocation"] == "obs" and given.report["verify"]["ok"]
    assert removed_by_branch(given)["b"] == 0


def test_obs_allocation_needs_obspa():
    with pytest.raises(spa.SpaError, match="obspa"):
        spa.prune(redundant_and_dense(), params=0.8, allocation="obs", criterion="l1")


def test_groups_no_layer_prices_are_spent_uniformly():
    """Groups inside If/Loop bodies have no statistics, so no curve: the budget is spent as
    with ``uniform``, and the report says why."""
    r = spa.prune(control_flow_model(), params=0.7, allocation="obs", input_shapes=SHAPES, verify=True)
    budget = r.report["budget"]
    assert budget["allocation"] == "uniform" and "no layer OBS can price" in budget["obs_allocation_skipped"]
    assert r.report["verify"]["ok"]


def test_cost_runner_sums_the_curves_and_refuses_past_their_end():
    class G:
        def __init__(self, size):
            self.size = size
    runner = CostRunner([G(3), G(2)], [np.array([0.0, 1.0, 3.0]), np.array([0.0, 0.5, 2.0])])
    assert runner.change([3, 2]) == 0.0
    assert runner.change([2, 1]) == 1.5
    assert runner.change([1, 0]) == 5.0
    assert runner.change([0, 2]) == np.inf          # the curve of group 0 stops at 2 removed
    assert runner.runs == 4


def test_greedy_costs_add_up_to_the_error_left():
    """Removing one channel a step, the costs greedy_obs reports sum to the damped output
    error ``(W' - W) H (W' - W)^T`` of the compensated layer: what a curve is made of."""
    rng = np.random.default_rng(0)
    d, out, channels = 12, 5, 6
    x = rng.standard_normal((200, d))
    h = x.T @ x
    w = rng.standard_normal((out, d))
    hinv = damped_inverse(h, 0.01)
    damped = np.linalg.inv(hinv)
    cols = [np.array([2 * j, 2 * j + 1]) for j in range(channels)]
    c = Consumer(w.copy(), hinv.copy(), cols)
    order, cost = greedy_obs([c], channels, 4, steps=4, ordered=True)
    assert len(order) == 4 and len(set(order.tolist())) == 4
    diff = c.weight - w
    assert np.trace(diff @ damped @ diff.T) == pytest.approx(cost[order].sum(), rel=1e-6)
    # the same channels in another order cost the same in all, not channel by channel
    c2 = Consumer(w.copy(), hinv.copy(), cols)
    order2, cost2 = greedy_obs([c2], channels, 4, steps=4, ordered=True, order=order[::-1])
    assert list(order2) == list(order[::-1])
    assert cost2[order2].sum() == pytest.approx(cost[order].sum(), rel=1e-6)
    assert np.allclose(c2.weight, c.weight)


def one_mlp(seed: int = 0) -> onnx.ModelProto:
    g = Graph(seed=seed)
    x = g.input([32, 12])
    h = g.op("Relu", [g.op("MatMul", [x, g.const(g.rng.standard_normal((12, 16)).astype(np.float32), "up")])])
    g.output(g.op("MatMul", [h, g.const(g.rng.standard_normal((16, 10)).astype(np.float32), "down")]))
    return g.model()


def test_a_curve_is_the_error_left_after_each_cut_and_its_probe_sits_where_asked():
    """On calibration data (every row sampled), a group's curve at k removals is, up to the one
    scale, the damped output error of its layer refit without the first k channels of its order;
    the probe is taken at the count asked for."""
    from spa.score.data import Calibration, collect_stats
    from spa.score.obs_costs import obs_cost_curves
    from spa.score.obspa import _consumers_of
    a = spa.analyze(one_mlp())
    (g,) = a.groups
    data = {"x": np.random.default_rng(5).standard_normal((64, 12)).astype(np.float32)}
    calib = Calibration(data)
    curves = obs_cost_curves(a.model, a.dep, a.groups, calib, a.shapes.input_shapes, 0.01, [12], [np.arange(16)],
                             [5], macs=1)
    assert curves.info["probes"] == [(g.id, 5, 5)]
    order, curve = curves.orders[0], curves.costs[0]
    inits = {t.name: t for t in a.model.graph.initializer}
    used, axis_of, _ = _consumers_of(a.model, a.dep, a.groups, inits)
    (name, spec), = used.items()
    st = collect_stats(a.model, used, calib.batches(a.model, a.shapes.input_shapes), axis_of)[name]
    h = st.h[:-1, :-1] + 0.01 * np.mean(np.diag(st.h[:-1, :-1])) * np.eye(16)     # a MatMul: no bias column
    w = onnx.numpy_helper.to_array(inits[spec.weight]).T.astype(np.float64)       # (out, in)

    def error(k):
        kept = np.setdiff1d(np.arange(16), order[:k])
        new = np.zeros_like(w)
        new[:, kept] = np.linalg.solve(h[np.ix_(kept, kept)], (w @ h[:, kept]).T).T
        return np.trace((new - w) @ h @ (new - w).T)
    for k in (3, 7, 12):
        assert curve[k] / curve[1] == pytest.approx(error(k) / error(1), rel=1e-4)


def test_a_group_the_cap_keeps_whole_leaves_the_others_priced():
    r = spa.prune(redundant_and_dense(), params=0.8, allocation="obs", round_to=1, max_ratio=0.05, verify=True)
    assert r.report["budget"]["allocation"] == "obs" and "obs_allocation_skipped" not in r.report["budget"]
    assert sum(g["removed"] for g in r.report["groups"]) == 0


def test_the_probe_feeds_the_bias_obs_gives_a_layer_without_one():
    """A Conv without a bias is probed with one (OBS refits through a constant-1 input)."""
    from spa.score.data import consumer_specs
    from spa.score.obs_costs import _ProbeRunner
    from spa.score.obspa import weight_matrix
    g = Graph(seed=2)
    h = g.op("Relu", [g.conv(g.input([2, 3, 6, 6]), 3, 8)])
    g.output(g.conv(h, 8, 4, bias=False))
    model = g.model()
    a = spa.analyze(model)
    used = {n: s for n, s in consumer_specs(a.model, a.dep.couplings.contractions).items() if s.bias is None}
    (name, spec), = used.items()
    inits = {t.name: t for t in a.model.graph.initializer}
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    runner = _ProbeRunner(a.model, used, inits, feeds)
    w = weight_matrix(spec, onnx.numpy_helper.to_array(inits[spec.weight]).astype(np.float64))
    assert runner.change({name: np.hstack([w, np.zeros((4, 1))])}) == pytest.approx(0.0, abs=1e-7)
    assert runner.change({name: np.hstack([w, np.full((4, 1), 3.0)])}) > 1e-3
