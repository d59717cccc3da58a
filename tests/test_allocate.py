"""Budgets: MACs / params / latency targets, spent where the outputs change least."""

import json

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph
from spa.plan.allocate import MaskedRunner, ResourceModel, allocate, keep_steps, removed_positions
from spa.plan.plan import make_plan
from spa.cli.commands import main
from spa.verify.metrics import count_macs, count_params
from spa.loading.probe import infer_shapes
from spa.loading.shapes import random_inputs
from spa.rewrite.apply import rewrite
from spa.runtime import session


def branchy() -> onnx.ModelProto:
    """Residual convs, a concat of two branches, pooling and a Gemm head."""
    g = Graph(seed=3)
    x = g.input([1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 16)])
    b = g.op("Relu", [g.conv(a, 16, 16)])
    r = g.op("Add", [g.conv(b, 16, 16), a])
    c1 = g.op("Relu", [g.conv(r, 16, 8)])
    c2 = g.op("Relu", [g.conv(r, 16, 24)])
    cat = g.op("Concat", [c1, c2], axis=1)
    h = g.op("Relu", [g.conv(cat, 32, 32, k=1)])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [h])])
    g.output(g.op("Gemm", [f, g.weight(10, 32), g.weight(10)], transB=1))
    return g.model()


def pruned_for(a, orders, keeps):
    return rewrite(a.model, make_plan(a, removed_positions(a.groups, orders, keeps)))


def runner_for(a, seed):
    """Random channel orders and one random feed, measured by a MaskedRunner."""
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(g.size) for g in a.groups]
    feeds = [random_inputs(a.model, a.shapes.input_shapes, rng)]
    return MaskedRunner(a.model, a.dep, a.shapes, a.groups, orders, feeds), orders, feeds


def test_resource_model_is_exact():
    """MACs and params predicted from keep counts equal those of the rewritten model."""
    a = spa.analyze(branchy())
    rng = np.random.default_rng(0)
    macs = ResourceModel(a.model, a.shapes, a.dep, a.groups, "macs")
    params = ResourceModel(a.model, a.shapes, a.dep, a.groups, "params")
    assert macs.full == count_macs(a.model, a.shapes) and params.full == count_params(a.model)
    for _ in range(5):
        keeps = [int(rng.integers(1, g.size + 1)) for g in a.groups]
        orders = [rng.permutation(g.size) for g in a.groups]
        pruned = pruned_for(a, orders, keeps)
        assert macs.value(keeps) == pytest.approx(count_macs(pruned, infer_shapes(pruned, a.shapes.input_shapes)))
        assert params.value(keeps) == pytest.approx(count_params(pruned))


def test_masked_runner_measures_the_pruned_model():
    """The runner's output change for some keep counts is the pruned model's own."""
    a = spa.analyze(branchy())
    runner, orders, feeds = runner_for(a, 1)
    keeps = [max(1, g.size // 2) for g in a.groups]
    pruned = pruned_for(a, orders, keeps)
    want, got = session(a.model).run(None, feeds[0])[0], session(pruned).run(None, feeds[0])[0]
    y, r = got.astype(np.float64).reshape(len(got), -1), want.astype(np.float64).reshape(len(want), -1)
    expected = float(np.mean(1 - (y * r).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(r, axis=1))))
    assert expected > 1e-3
    assert runner.change(keeps) == pytest.approx(expected, rel=1e-4)
    assert runner.change([g.size for g in a.groups]) == 0.0


def two_branches(scale_a: float, scale_b: float) -> onnx.ModelProto:
    """Two equal branches; the downstream weights of each set how much its channels matter."""
    g = Graph(seed=5)
    x = g.input([1, 3, 8, 8])
    outs = []
    for name, scale in (("down_a", scale_a), ("down_b", scale_b)):
        h = g.op("Relu", [g.conv(x, 3, 16)])
        w = g.const((g.rng.standard_normal((4, 16, 3, 3)) * scale).astype(np.float32), name)
        outs.append(g.op("Conv", [h, w], pads=[1, 1, 1, 1]))
    g.output(g.op("Add", outs))
    return g.model()


def test_budget_goes_where_it_hurts_least():
    """Same MACs in both branches; the one whose channels barely reach the output is cut."""
    for quiet, loud in ((0, 1), (1, 0)):
        scales = [1.0, 1.0]
        scales[quiet] = 1e-3
        r = spa.prune(two_branches(*scales), macs=0.7, criterion="l1", round_to=1, verify=True)
        removed = {name: g["removed"] for g in r.report["groups"] for name in ("down_a", "down_b")
                   if f"{name}[1]" in g["members"]}
        quiet_name, loud_name = ("down_a", "down_b")[quiet], ("down_a", "down_b")[loud]
        assert removed[quiet_name] > 0 and removed[loud_name] == 0, removed
        assert r.report["after"]["macs"] <= 0.7 * r.report["before"]["macs"]
        assert r.report["verify"]["ok"]


@pytest.mark.parametrize("kind,target", [("macs", 0.6), ("params", 0.5)])
def test_budget_is_met(kind, target):
    r = spa.prune(branchy(), **{kind: target}, round_to=1, verify=True)
    rep = r.report
    key = "macs" if kind == "macs" else "params"
    assert rep["after"][key] <= target * rep["before"][key]
    assert rep["after"][key] >= 0.8 * target * rep["before"][key]  # and not by far
    assert rep["budget"]["met"] and rep["budget"]["achieved"] == pytest.approx(rep["after"][key] / rep["before"][key])
    assert rep["verify"]["ok"]
    assert all("output_change" in g for g in rep["groups"])


def test_rounding_and_caps_are_respected():
    a = spa.analyze(branchy())
    runner, orders, feeds = runner_for(a, 2)
    resource = ResourceModel(a.model, a.shapes, a.dep, a.groups, "macs")
    alloc = allocate(a.groups, runner, resource, 0.05, round_to=8, max_ratio=0.75)
    for g, k in zip(a.groups, alloc.keeps):
        assert k == g.size or k % 8 == 0
        assert k >= g.size - int(0.75 * g.size)
        assert k in keep_steps(g, 8, 0.75)
    assert not alloc.met  # 5 % of the MACs is out of reach at these caps: said, not faked


def test_pinned_kind_keeps_its_ratio():
    """--mlp pins plain channel groups: a MACs budget then has nothing free to spend."""
    r = spa.prune(branchy(), macs=0.5, mlp=0.25, round_to=1, verify=False, steps=1)
    for g in r.report["groups"]:
        assert g["removed"] == int(np.floor(g["channels"] * 0.25 + 1e-9))
    assert not r.report["budget"]["met"]


def test_latency_budget_is_searched_by_measuring(tmp_path):
    r = spa.prune(branchy(), latency=0.7, round_to=1, verify=False)
    b = r.report["budget"]
    assert b["kind"] == "latency" and b["latency_search"]
    assert b["achieved"] in [t["latency"] for t in b["latency_search"]]


def test_cli_budgets(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(branchy(), path)
    rep = tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--macs", "0.6", "--round-to", "1",
                 "--report", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "budget: macs 0.6" in out and "cut most" in out and "cut least" in out
    report = json.loads(rep.read_text())
    assert report["after"]["macs"] <= 0.6 * report["before"]["macs"]
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--macs", "0.6", "--ratio", "0.3"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    for bad in ("0", "1.5", "nan"):
        assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--params", bad]) == 2
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--latency", "-q", "--runs", "2"]) == 0


def test_steps_reach_the_same_budget_incrementally():
    r = spa.prune(branchy(), macs=0.5, steps=3, round_to=1, verify=True)
    rep = r.report
    assert len(rep["passes"]) >= 2 and rep["budget"]["steps"] == 3
    assert rep["after"]["macs"] <= 0.5 * rep["before"]["macs"] and rep["budget"]["met"]
    assert rep["verify"]["ok"]


def test_steps_with_a_ratio_compound_to_it():
    one = spa.prune(branchy(), ratio=0.5, round_to=1, verify=False)
    three = spa.prune(branchy(), ratio=0.5, steps=3, round_to=1, verify=True)
    assert three.report["verify"]["ok"]
    # each step floors its share of every group, so three steps keep a little more than one
    assert count_params(one.model) <= count_params(three.model) <= 1.3 * count_params(one.model)
    assert count_params(three.model) < 0.6 * count_params(branchy())


def test_uniform_allocation_is_the_smallest_ratio_that_fits():
    r = spa.prune(branchy(), macs=0.6, allocation="uniform", round_to=1, verify=True)
    rep = r.report
    assert rep["budget"]["met"] and rep["after"]["macs"] <= 0.6 * rep["before"]["macs"]
    shares = [g["removed"] / g["channels"] for g in rep["groups"]]
    assert max(shares) - min(shares) < 0.13  # one ratio, up to each group's flooring
    # a little less ratio would not fit
    ratio = max(shares)
    looser = spa.prune(branchy(), ratio=max(0.0, ratio - 0.07), round_to=1, verify=False).report
    assert looser["after"]["macs"] > 0.6 * looser["before"]["macs"]


def test_uniform_allocation_gives_back_what_rounding_overshot():
    """With --round-to 8 on 16-channel groups, one ratio either keeps 16 or 8 of each: the
    budget is then spent back one rounding step at a time, still within it."""
    for target in (0.85, 0.75, 0.6):
        rep = spa.prune(branchy(), macs=target, allocation="uniform", round_to=8, verify=True).report
        share = rep["after"]["macs"] / rep["before"]["macs"]
        assert rep["verify"]["ok"] and share <= target
        # no group could take one more step of 8 channels and stay within the budget
        a = spa.analyze(branchy())
        resource = ResourceModel(a.model, a.shapes, a.dep, a.groups, "macs")
        keeps = np.array([g["channels"] - g["removed"] for g in rep["groups"]])
        assert len(keeps) == len(a.groups)
        for i, g in enumerate(rep["groups"]):
            if keeps[i] < g["channels"]:
                more = keeps.copy()
                more[i] = min(g["channels"], keeps[i] + 8)
                assert resource.value(more) > target * resource.full, (target, i)


def test_greedy_path_prefix_is_the_looser_allocation():
    """The latency search reuses one greedy path: its prefix for a looser target is what
    allocating for that target gives."""
    a = spa.analyze(branchy())
    runner, orders, feeds = runner_for(a, 4)
    resource = ResourceModel(a.model, a.shapes, a.dep, a.groups, "macs")
    deep = allocate(a.groups, runner, resource, 0.3, round_to=1)
    for target in (0.8, 0.6, 0.45):
        assert list(deep.at(target).keeps) == list(allocate(a.groups, runner, resource, target, round_to=1).keeps)


def test_auto_allocation_measures_for_magnitude_and_goes_uniform_for_unanchored_obspa():
    r = spa.prune(branchy(), macs=0.6, criterion="l1", round_to=1, verify=False)
    assert r.report["budget"]["allocation"] == "measured"
    r = spa.prune(branchy(), macs=0.6, round_to=1, verify=True)     # the default criterion is OBSPA
    assert r.report["budget"]["allocation"] == "uniform" and r.report["verify"]["ok"]
    assert "no calibration data" in r.report["budget"]["obs_allocation_skipped"]    # (tests/test_obs_allocation.py)


def test_keep_steps_respect_the_cap():
    g = spa.analyze(branchy()).groups[0]
    assert keep_steps(g, 1, 0.5)[-1] == g.size - g.size // 2
    assert keep_steps(g, 1, 0.9)[-1] < keep_steps(g, 1, 0.5)[-1]


def test_steps_do_not_overshoot_or_bypass_the_cap():
    r = spa.prune(branchy(), macs=0.5, steps=2, round_to=1, verify=False).report
    assert 0.4 <= r["budget"]["achieved"] <= 0.5
    capped = spa.prune(branchy(), macs=0.05, steps=3, max_ratio=0.5, round_to=1, verify=False)
    assert capped.report["budget"]["met"] is False
    dims = {t.name: list(t.dims) for t in capped.model.graph.initializer}
    checked = 0
    for g in capped.report["passes"][0]["groups"]:  # each group's members, as first analyzed
        for member in g["members"]:
            name, axis = member[:-3], int(member[-2])
            if name in dims:
                assert dims[name][axis] >= g["channels"] - g["channels"] // 2, (member, dims[name])
                checked += 1
    assert checked


def test_cut_groups_report_their_output_change():
    r = spa.prune(branchy(), macs=0.6, criterion="l1", round_to=1, verify=False).report
    cut = [g for g in r["groups"] if g["removed"]]
    # a cut that lowered the measured change (it can, on top of others) is credited 0, not less
    assert cut and all(g["output_change"] >= 0 for g in cut) and any(g["output_change"] > 0 for g in cut)


def test_latency_search_reports_the_try_it_chose(monkeypatch):
    """With latency a known function of MACs, the search keeps the try within 5 % of the
    target that keeps the most MACs, and reports that try's latency."""
    import spa.verify.bench
    from spa.verify.metrics import count_macs
    from spa.loading.probe import infer_shapes

    def fake(models, input_shapes, runs=20, **k):
        return [float(count_macs(m, infer_shapes(m, input_shapes, want_values=False))) ** 1.3 for m in models]
    monkeypatch.setattr(spa.verify.bench, "latency", fake)
    for allocation in ("measured", "uniform"):
        b = spa.prune(branchy(), latency=0.6, round_to=1, verify=False, allocation=allocation).report["budget"]
        fits = [t for t in b["latency_search"] if t["latency"] <= 0.6 * 1.05]
        assert fits, b
        best = max(fits, key=lambda t: t["macs"])
        assert b["achieved"] == best["latency"] and b["met"]
        assert b["macs_share"] == pytest.approx(best["macs"])
        assert b["macs_share"] > 0.6 ** (1 / 1.3) - 0.15  # not cut to target ** 2


def test_budget_without_anything_to_cut():
    g = Graph()
    g.output(g.conv(g.input([1, 3, 8, 8]), 3, 8))  # input and output channels: nothing prunable
    r = spa.prune(g.model(), macs=0.5, verify=False).report
    assert r["budget"]["met"] is False and r["budget"]["reason"] == "no prunable groups"
    assert spa.prune(g.model(), macs=0.5, steps=2, verify=False).report["budget"]["met"] is False
    h = Graph(seed=2)  # an embedding lookup summed away: channels to prune, no MACs to count
    from onnx import TensorProto
    e = h.op("Gather", [h.weight(10, 16), h.input([1, 3], name="idx", dtype=TensorProto.INT64)])
    y = h.op("Mul", [h.op("Relu", [e]), h.weight(16)])
    h.output(h.op("ReduceSum", [y, h.const(np.array([2], np.int64))], keepdims=0))
    assert spa.analyze(h.model()).groups
    with pytest.raises(spa.SpaError, match="no MACs"):
        spa.prune(h.model(), macs=0.5, verify=False)
    assert spa.prune(h.model(), params=0.5, round_to=1, verify=False).report["budget"]["met"]


def test_budget_refuses_head_dims_and_hidden():
    with pytest.raises(spa.SpaError, match="--head-dims"):
        spa.prune(branchy(), macs=0.5, head_dims=0.25)


def test_bare_latency_before_the_model(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(branchy(), path)
    assert main(["prune", "--latency", str(path), "-o", str(tmp_path / "o.onnx"), "-q", "--runs", "2"]) == 0


def test_default_steps():
    stepped = spa.prune(branchy(), macs=0.6, criterion="l1", round_to=1, verify=False).report
    assert len(stepped.get("passes", [])) == 2
    assert stepped["budget"]["macs_share"] == stepped["budget"]["achieved"]      # the whole run's, not a step's
    assert "passes" not in spa.prune(branchy(), macs=0.6, round_to=1, verify=False).report  # OBSPA: uniform, 1 step
    assert "passes" not in spa.prune(branchy(), ratio=0.3, round_to=1, verify=False).report
