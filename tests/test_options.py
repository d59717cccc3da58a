"""One options value, stages that name themselves, a plan built once; and checks written
against independent computations (a hand-counted grouped conv, a cap that binds)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph
from spa import pipeline
from spa.cli.commands import main
from spa.errors import SpaError
from spa.verify.metrics import count_macs
from spa.options import DEFAULT_RATIO, PruneOptions
from spa.loading.probe import infer_shapes


def two_convs(c=32) -> onnx.ModelProto:
    g = Graph()
    x = g.input([1, 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, c)]), c, 4))
    return g.model()


@pytest.mark.parametrize("kwargs,words", [
    ({"ratio": 1.0}, "--ratio"), ({"ratio": -0.1}, "--ratio"), ({"heads": float("nan")}, "--heads"),
    ({"max_ratio": 1.5}, "--max-ratio"), ({"ratio": True}, "--ratio"),
    ({"macs": 0.0}, "--macs"), ({"latency": 1.5}, "--latency"),
    ({"macs": 0.5, "params": 0.5}, "one budget"), ({"macs": 0.5, "ratio": 0.2}, "exclude"),
    ({"macs": 0.5, "hidden": 0.2}, "cannot share"),
    ({"criterion": "best"}, "unknown criterion"), ({"aggregate": "median"}, "--aggregate"),
    ({"allocation": "greedy"}, "allocation"), ({"round_to": 0}, "--round-to"), ({"round_to": "8"}, "--round-to"),
    ({"steps": 0}, "--steps"), ({"calib_samples": 1.5}, "--calib-samples"),
    ({"steps": 2, "latency": 0.5}, "--steps with --latency"), ({"damping": 0}, "damping"),
    ({"seed": 1.0}, "--seed"),
])
def test_every_option_is_checked_in_one_place(kwargs, words):
    with pytest.raises(SpaError, match=words.replace("-", r"\-")):
        PruneOptions(**kwargs)
    with pytest.raises(SpaError, match=words.replace("-", r"\-")):   # replace() checks too
        PruneOptions().replace(**kwargs)


def test_defaults_are_worked_out_not_stored():
    o = PruneOptions()
    assert (o.base_ratio, o.criterion_used, o.may_fall_back, o.steps_used) == (DEFAULT_RATIO, "obspa", True, 1)
    assert o.chose_ratio
    assert PruneOptions(heads=0.3).base_ratio == 0.0 and not PruneOptions(heads=0.3).chose_ratio
    measured = PruneOptions(macs=0.5, criterion="l1")
    assert (measured.allocation_used, measured.steps_used) == ("measured", 3)
    # a variant works its defaults out anew: no stale allocation or steps carried over
    assert measured.replace(criterion="obspa").allocation_used == "obs"
    assert measured.replace(criterion="obspa").steps_used == 1
    assert PruneOptions(hidden=-1.0, ratio=0.3).hidden_ratio == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.ratio = 0.2


def test_options_and_keywords_prune_alike():
    by_options = spa.prune(two_convs(), options=PruneOptions(ratio=0.5, criterion="l1", round_to=1))
    by_keywords = spa.prune(two_convs(), ratio=0.5, criterion="l1", round_to=1)
    assert by_options.report["groups"] == by_keywords.report["groups"]
    assert by_options.report["options"] == by_keywords.report["options"]


def test_a_failure_names_the_stages_run(monkeypatch, tmp_path, capsys):
    def broken(model, plan, spill=False):
        raise RuntimeError("the rewrite broke")
    monkeypatch.setattr(pipeline, "rewrite", broken)
    with pytest.raises(RuntimeError) as e:
        spa.prune(two_convs(), ratio=0.5, criterion="l1")
    assert e.value.spa_stages == ["analyze", "score", "plan", "rewrite"]
    path = tmp_path / "m.onnx"
    onnx.save(two_convs(), path)
    code = main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--criterion", "l1"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "internal error in stage rewrite (after analyze, score, plan)" in err
    assert len(err.splitlines()) == 1


def test_the_plan_is_built_once():
    result = spa.prune(two_convs(), ratio=0.5, criterion="l1", round_to=1)
    plan = result.plans[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.updates = {}
    name = next(iter(plan.kept))[0]
    other = plan.with_updates({"w": np.zeros(1)})
    assert "w" not in plan.updates and "w" in other.updates and other.kept is plan.kept and name


# ---------------------------------------------------------------- independent computations

def test_grouped_conv_macs_counted_by_hand():
    """A 3x3 conv of 16 -> 32 channels in 4 groups on an 8x8 map (padded): every output value
    sums 16/4 channels x 9 taps, so 32 x 64 x 4 x 9 = 73,728 MACs; depthwise 16 -> 16 in 16
    groups: 16 x 64 x 1 x 9 = 9,216."""
    g = Graph()
    x = g.input([1, 16, 8, 8])
    y = g.conv(x, 16, 32, group=4, bias=False)
    g.output(g.conv(g.conv(x, 16, 16, group=16, bias=False), 16, 16, k=1, bias=False))
    g.output(y)
    model = g.model()
    shapes = infer_shapes(model, want_values=False)
    assert count_macs(model, shapes) == 32 * 64 * 4 * 9 + 16 * 64 * 1 * 9 + 16 * 64 * 16


def test_global_ranking_respects_the_cap():
    """Two groups ranked together: the global order takes more than a quarter of one of them
    when uncapped; max_ratio 0.25 caps every group at a quarter of its channels."""
    g = Graph()
    x = g.input([1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 32)])
    b = g.op("Relu", [g.conv(x, 3, 32)])
    g.output(g.conv(g.op("Concat", [a, b], axis=1), 64, 4, k=1))
    model = g.model()
    result = spa.prune(model, ratio=0.5, criterion="l1", round_to=1, global_rank=True, max_ratio=0.25)
    removed = [row["removed"] for row in result.report["groups"]]
    assert len(removed) == 2 and max(removed) <= 32 * 0.25, removed
    uncapped = spa.prune(model, ratio=0.5, criterion="l1", round_to=1, global_rank=True, max_ratio=0.9)
    assert max(row["removed"] for row in uncapped.report["groups"]) > 8   # the cap is what binds


def test_a_result_prints_as_a_summary_not_protobufs():
    text = str(spa.prune(two_convs(), ratio=0.5, criterion="l1", round_to=1))
    assert "params" in text and "removed 16 of 32 channels" in text and "verified" in text
    assert "initializer" not in text and len(text.splitlines()) < 10


def test_groups_are_named_by_the_layers_a_person_knows(tmp_path, capsys):
    """The demo model is a legacy export: its weights are onnx::Conv_78, its nodes keep the
    module path. The budget lines name groups by those and say removed N of M."""
    from pathlib import Path
    demo = Path(__file__).resolve().parent.parent / "models" / "demo_cnn.onnx"
    result = spa.prune(str(demo), macs=0.6, criterion="l1", steps=1)
    layers = [g["layers"] for g in result.report["groups"]]
    assert all(layers) and all(name.startswith("/") and name.endswith(("/Conv", "/Gemm"))
                               for names in layers for name in names), layers
    code = main(["prune", str(demo), "-o", str(tmp_path / "o.onnx"), "--macs", "0.6", "--criterion", "l1",
                 "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("cut most"))
    assert "/Conv" in line and "removed " in line and " of " in line and "onnx::" not in line


def test_a_latency_budget_states_one_figure(tmp_path, capsys):
    """The budget line and the table say the same latency share (the search timed it too,
    with fewer runs; the table's measurement is the one reported)."""
    from pathlib import Path
    demo = Path(__file__).resolve().parent.parent / "models" / "demo_cnn.onnx"
    code = main(["prune", str(demo), "-o", str(tmp_path / "o.onnx"), "--latency", "0.8", "--criterion", "l1",
                 "--runs", "5"])
    out = capsys.readouterr().out
    assert code == 0
    table = next(x for x in out.splitlines() if x.startswith("latency"))
    budget = next(x for x in out.splitlines() if x.startswith("budget:"))
    share = float(table.split()[-1])
    achieved = float(budget.split("->")[1].split(";")[0].split()[0])
    assert abs(share - achieved) < 1.5e-3, (table, budget)
