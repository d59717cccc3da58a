"""The plan is one value: rules state fix-ups as data, the plan resolves and validates them,
and the rewrite, the oracle's masked original and the report all read the same plan."""

import dataclasses

import numpy as np
import pytest
from onnx import numpy_helper

import spa
from graphs import Graph, assert_prunes
from spa.graph.fixups import DropAttr, SetAttr, SetInput, SliceBounds, Sizes, resolve
from spa.plan.plan import PlanError, make_plan
from spa.rewrite.apply import rewrite
from spa.verify.oracle import masked_model, oracle


def conv_split_concat():
    """conv(3 -> 8) -> Split [3, 5] -> swapped Concat -> conv(8 -> 4)."""
    g = Graph(seed=0)
    y = g.op("Relu", [g.conv(g.input([1, 3, 8, 8]), 3, 8)])
    a, b = g.op("Split", [y, g.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
    g.output(g.conv(g.op("Concat", [b, a], axis=1), 8, 4))
    return g.model()


def grouped_conv():
    g = Graph(seed=1)
    y = g.op("Relu", [g.conv(g.input([1, 3, 8, 8]), 3, 8)])
    y = g.op("Relu", [g.conv(y, 8, 8, group=4)])
    g.output(g.conv(y, 8, 4))
    return g.model()


def first_group_removes(a, positions):
    return make_plan(a, [np.array(positions if i == 0 else [], np.int64) for i in range(len(a.groups))])


def test_conv_split_concat_has_two_groups():
    assert sorted(g.size for g in spa.analyze(conv_split_concat()).groups) == [3, 5]


def test_rules_state_fixups_as_data():
    """No closures: every fix-up is a frozen dataclass of plain values."""
    for model in (conv_split_concat(), grouped_conv()):
        a = spa.analyze(model)
        assert a.dep.couplings.fixups
        for spec in a.dep.couplings.fixups:
            assert isinstance(spec, (Sizes, SliceBounds)) and dataclasses.is_dataclass(spec)
            assert not any(callable(v) for v in dataclasses.astuple(spec))


def test_split_sizes_resolve_to_an_input_edit():
    a = spa.analyze(conv_split_concat())
    # the two parts of the Split are independent groups: 2 of the first part go, 1 of the second
    plan = make_plan(a, [np.array([0, 1] if g.size == 3 else [4]) for g in a.groups])
    split = next(n for n in a.model.graph.node if n.op_type == "Split")
    edits = [e for e in plan.edits if e.node == split.name]
    assert [type(e) for e in edits] == [DropAttr, SetInput]
    assert edits[1].input == 1 and edits[1].value.tolist() == [1, 4]
    pruned = rewrite(a.model, plan)
    sizes = next(t for t in pruned.graph.initializer if t.name == split.input[1])
    assert numpy_helper.to_array(sizes).tolist() == [1, 4]


def test_group_attribute_resolves_from_the_virtual_space():
    a = spa.analyze(grouped_conv())
    group = next(g for g in a.groups if any(s[0].endswith("#groups") for s in g.spaces))
    removals = [np.array([0, 1] if g is group else [], np.int64) for g in a.groups]
    plan = make_plan(a, removals)
    conv = next(n for n in a.model.graph.node if n.op_type == "Conv" and any(x.name == "group" and x.i == 4 for x in n.attribute))
    new_groups = [e.value for e in plan.edits if isinstance(e, SetAttr) and e.node == conv.name and e.name == "group"]
    assert new_groups == [2]
    assert oracle(rewrite(a.model, plan), masked_model(a.model, plan, a.shapes), a.shapes.input_shapes, a.model).ok


def test_resolve_alone():
    """A stage testable alone: a spec, a kept-indices function, the edits."""
    spec = Sizes("n", ("attr", "split"), (3, 5), ((0, ("a", 1)), (1, ("b", 1))))
    kept = {("a", 1): np.array([1, 2]), ("b", 1): None}
    edits = resolve(spec, None, kept.get, lambda s: 2 if s == ("a", 1) else 5)
    assert edits == [SetAttr("n", "split", (2, 5))]
    assert resolve(spec, None, kept.get, lambda s: {("a", 1): 3, ("b", 1): 5}[s]) == []   # nothing changed
    bounds = SliceBounds("s", (4,), (8,), ((0, ("x", 1), ("y", 1), 4),), as_attrs=True)
    edits = resolve(bounds, None, {("x", 1): np.array([0, 2, 4, 5, 7])}.get, lambda s: 3)
    assert edits == [SetAttr("s", "starts", (2,)), SetAttr("s", "ends", (5,))]


def test_report_and_model_come_from_the_plan():
    r = assert_prunes(conv_split_concat(), ratio=0.5)
    plan, = r.plans
    for row, choice in zip(r.report["groups"], plan.choices):
        assert row["removed_channels"] == choice.removed.tolist() and row["kept"] == choice.kept
    first_conv = r.original.graph.node[0]
    kept = plan.kept_of((first_conv.input[1], 0))
    assert kept is not None and len(kept) < 8
    w = next(t for t in r.model.graph.initializer if t.name == first_conv.input[1])
    w0 = next(t for t in r.original.graph.initializer if t.name == first_conv.input[1])
    assert np.array_equal(numpy_helper.to_array(w), numpy_helper.to_array(w0)[kept])


@pytest.mark.parametrize("spoil,match", [
    (lambda p, s: p.kept.__setitem__(s, np.array([], np.int64)), "empties"),
    (lambda p, s: p.kept.__setitem__(s, np.array([0, 99])), "out of range"),
    (lambda p, s: p.kept.__setitem__(s, np.array([3, 1])), "unsorted"),
    (lambda p, s: p.sizes.__setitem__(s, 9), "expects"),
    (lambda p, s: p.updates.__setitem__(s[0], np.zeros(3, np.float32)), "not an initializer of that shape"),
    (lambda p, s: p.edits.append(SetAttr("no such node", "group", 1)), "does not have"),
])
def test_an_invalid_plan_is_refused_before_anything_changes(spoil, match):
    a = spa.analyze(conv_split_concat())
    plan = first_group_removes(a, [0, 2])
    weight = next(s for s in a.groups[0].spaces if s in plan.kept and s[0].startswith("w"))
    spoil(plan, weight)
    before = a.model.SerializeToString()
    with pytest.raises(PlanError, match=match):
        rewrite(a.model, plan)
    assert a.model.SerializeToString() == before


def test_two_fixups_that_disagree_are_refused():
    a = spa.analyze(conv_split_concat())
    plan = first_group_removes(a, [0, 2])
    e = next(e for e in plan.edits if isinstance(e, SetInput))
    plan.edits.append(SetInput(e.node, e.input, e.name, e.value + 1))
    with pytest.raises(PlanError, match="disagree"):
        rewrite(a.model, plan)


def test_choices_out_of_range_are_refused():
    a = spa.analyze(conv_split_concat())
    with pytest.raises(PlanError, match="out of range"):
        first_group_removes(a, [0, a.groups[0].size])
    with pytest.raises(PlanError, match="repeated"):
        first_group_removes(a, [1, 1])
    with pytest.raises(PlanError, match="every channel"):
        first_group_removes(a, list(range(a.groups[0].size)))


def test_shared_size_constant_is_not_changed_for_its_other_reader():
    """Two Reshapes read one target constant; only one's channels are pruned: the other keeps
    the original target (an in-place edit of the shared constant broke it)."""
    g = Graph(seed=2)
    x = g.input([1, 3, 4, 4])
    target = g.const(np.array([1, 8, 16], np.int64))
    pruned_branch = g.op("Reshape", [g.op("Relu", [g.conv(x, 3, 8)]), target])
    g.output(g.op("MatMul", [g.op("Transpose", [pruned_branch], perm=[0, 2, 1]), g.weight(8, 2)]))
    g.output(g.op("Reshape", [g.conv(x, 3, 8), target]))            # a graph output: stays whole
    r = assert_prunes(g.model(), ratio=0.5)
    assert any(gr["removed"] for gr in r.report["groups"])


def test_computed_slice_bounds_become_constants_even_where_unchanged():
    """chunk() as the legacy exporter writes it: bounds computed from the input's width
    (Shape -> Gather -> Div). When only the second half loses channels, the first bound keeps
    its value but must become a constant, or it would follow the pruned width (shufflenet)."""
    g = Graph(seed=3)
    y = g.op("Relu", [g.conv(g.input([1, 3, 6, 6]), 3, 8)])
    width = g.op("Gather", [g.op("Shape", [y]), g.const(np.array([1], np.int64))])
    half = g.op("Div", [width, g.const(np.array([2], np.int64))])
    end = g.op("Mul", [half, g.const(np.array([2], np.int64))])
    axes = g.const(np.array([1], np.int64))
    first = g.op("Slice", [y, g.const(np.array([0], np.int64)), half, axes])
    second = g.op("Slice", [y, half, end, axes])
    g.output(g.conv(g.op("Relu", [first]), 4, 2))
    g.output(g.conv(g.op("Relu", [second]), 4, 2))
    a = spa.analyze(g.model())
    slice2 = next(n for n in a.model.graph.node if n.op_type == "Slice" and n.input[1] == half)
    second_part = next(i for i, gr in enumerate(a.groups) if (slice2.output[0], 1) in gr.spaces)
    plan = make_plan(a, [np.array([0, 2] if i == second_part else [], np.int64) for i in range(len(a.groups))])
    assert oracle(rewrite(a.model, plan), masked_model(a.model, plan, a.shapes), a.shapes.input_shapes, a.model).ok
