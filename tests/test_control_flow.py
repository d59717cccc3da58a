"""Pruning inside control flow: If branches (nested), Loop bodies and Scan bodies.

The model below keeps most of its layers inside bodies, the way exporters write a sample-rate
switch (Silero VAD) or an unrolled recurrence: its groups cross every kind of boundary,

- ``h`` (16): a main-graph MatMul, read by both branches of the outer If, by the Scan as its
  initial state (so also the Scan body's weight columns and its stacked outputs);
- ``a`` (12): made in the outer then-branch from an outer-scope weight, read by both branches
  of a nested If, one of which holds its weight as a body initializer, the other as a Constant;
- ``o`` (10): the outer If's output, a join of the nested If's output and the else-branch's
  MatMul, then a Loop's carried state (a square weight tied on both axes) in the Loop body;
- ``z`` (6): a Loop scan output (stacked per iteration), read back in the main graph.

Two integer scalars choose the branches (``mode == 1``, ``flag < 5``): the oracle feeds each
side of each comparison, so every branch runs in the check.
"""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from graphs import assert_prunes
from spa.analysis import analyze
from spa.loading.shapes import branch_values
from spa.loading.scopes import walk
from spa.verify import oracle as oracle_module
from spa.verify.masked import masked_model
from spa.verify.oracle import oracle

SHAPES = {"x": (1, 8), "seq": (5, 1, 8), "mode": (), "flag": ()}


def _w(rng, name, *shape):
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)


def _vi(name, dtype=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def control_flow_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    n = helper.make_node
    # nested If, inside the outer then-branch: both branches read ``a`` from the outer scope
    inner_then = helper.make_graph(
        [n("MatMul", ["a", "w_inner_then"], ["y_then"], name="inner_then_mm")],
        "inner_then", [], [_vi("y_then")], [_w(rng, "w_inner_then", 12, 10)])       # a body initializer
    inner_else = helper.make_graph(
        [n("Constant", [], ["w_inner_else"], value=_w(rng, "w_inner_else", 12, 10)),  # a Constant weight
         n("Relu", ["a"], ["a_relu"]),
         n("MatMul", ["a_relu", "w_inner_else"], ["y_else"])],
        "inner_else", [], [_vi("y_else")])
    outer_then = helper.make_graph(
        [n("MatMul", ["h", "w_a"], ["a_mm"], name="then_mm"),                       # outer weight and tensor
         n("Relu", ["a_mm"], ["a"]),
         n("Less", ["flag", "five"], ["small"]),
         n("If", ["small"], ["y_inner"], name="inner_if", then_branch=inner_then, else_branch=inner_else)],
        "outer_then", [], [_vi("y_inner")])
    outer_else = helper.make_graph(
        [n("MatMul", ["h", "w_e"], ["e_mm"], name="else_mm"),
         n("Add", ["e_mm", "b_e"], ["e_add"]),
         n("Relu", ["e_add"], ["y_outer_else"])],
        "outer_else", [], [_vi("y_outer_else")])
    # Loop: carried s [1, 10] through a square weight, a scan output z [1, 6] per iteration
    loop_body = helper.make_graph(
        [n("MatMul", ["s_in", "w_loop"], ["s_mm"], name="loop_mm"),
         n("Tanh", ["s_mm"], ["s_out"]),
         n("MatMul", ["s_out", "w_z"], ["z_mm"], name="loop_z_mm"),
         n("Relu", ["z_mm"], ["z"]),
         n("Identity", ["cond_in"], ["cond_out"])],
        "loop_body",
        [_vi("it", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, []), _vi("s_in", shape=[1, 10])],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("s_out", shape=[1, 10]), _vi("z", shape=[1, 6])])
    # Scan over seq [5, 1, 8]: state c [1, 16] starts at h; the body's weight reads each step
    scan_body = helper.make_graph(
        [n("MatMul", ["x_t", "w_scan"], ["xs"], name="scan_mm"),
         n("Add", ["xs", "c_in"], ["c_add"]),
         n("Relu", ["c_add"], ["c_out"]),
         n("Identity", ["c_out"], ["c_seq"])],
        "scan_body", [_vi("c_in"), _vi("x_t")], [_vi("c_out"), _vi("c_seq")])
    nodes = [
        n("MatMul", ["x", "w_h"], ["h_mm"], name="h_mm"),
        n("Add", ["h_mm", "b_h"], ["h_add"]),
        n("Relu", ["h_add"], ["h"]),
        n("Equal", ["mode", "one"], ["is_one"]),
        n("If", ["is_one"], ["o"], name="outer_if", then_branch=outer_then, else_branch=outer_else),
        n("Loop", ["trips", "", "o"], ["s_final", "z_all"], name="loop", body=loop_body),
        n("ReduceMean", ["z_all", "axis0"], ["z_mean"], keepdims=0),
        n("MatMul", ["z_mean", "w_f"], ["out_loop"], name="f_mm"),
        n("Scan", ["h", "seq"], ["c_final", "c_all"], name="scan", body=scan_body, num_scan_inputs=1),
        n("ReduceMean", ["c_all", "axis0"], ["c_mean"], keepdims=0),
        n("MatMul", ["c_mean", "w_g"], ["out_scan"], name="g_mm"),
        n("Add", ["out_loop", "out_scan"], ["y"]),
    ]
    inits = [_w(rng, "w_h", 8, 16), _w(rng, "b_h", 16), _w(rng, "w_a", 16, 12), _w(rng, "w_e", 16, 10),
             _w(rng, "b_e", 10), _w(rng, "w_loop", 10, 10), _w(rng, "w_z", 10, 6), _w(rng, "w_f", 6, 4),
             _w(rng, "w_scan", 8, 16), _w(rng, "w_g", 16, 4),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(5, np.int64), "five"),
             numpy_helper.from_array(np.array(3, np.int64), "trips"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    graph = helper.make_graph(nodes, "control_flow",
                              [_vi("x", shape=[1, 8]), _vi("seq", shape=[5, 1, 8]),
                               _vi("mode", TensorProto.INT64, []), _vi("flag", TensorProto.INT64, [])],
                              [_vi("y", shape=[1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _members(a, group) -> set[str]:
    return {m.split("[")[0] for m in a.member_names(group)}


def test_groups_cross_every_boundary():
    a = analyze(control_flow_model(), SHAPES)
    assert not a.dep.blocked_nodes
    groups = sorted((g.size, sorted(_members(a, g))) for g in a.groups)
    assert groups == [
        (6, ["w_f", "w_z"]),
        (10, ["b_e", "w_e", "w_inner_else", "w_inner_then", "w_loop", "w_z"]),
        (12, ["w_a", "w_inner_else", "w_inner_then"]),
        (16, ["b_h", "w_a", "w_e", "w_g", "w_h", "w_scan"])]


def test_macs_count_body_nodes_as_often_as_they_run():
    """Main graph 128 + 24 + 64; the If the mean of its branches ((192 + 120) + 160) / 2, the
    nested If's branches 120 each; the Loop's body 3 trips x (100 + 60); the Scan's 5 steps x 128."""
    from spa.verify.metrics import count_macs
    a = analyze(control_flow_model(), SHAPES)
    assert count_macs(a.model, a.shapes) == 128 + 24 + 64 + (192 + 120 + 160) // 2 + 3 * 160 + 5 * 128


def test_branch_values_put_each_comparison_on_both_sides():
    assert branch_values(control_flow_model()) == {"mode": [1, 2], "flag": [4, 5]}


@pytest.mark.parametrize("criterion", ["l1", "obspa", "random"])
def test_prunes_inside_bodies_under_the_oracle(criterion):
    model = control_flow_model()
    r = assert_prunes(model, ratio=0.5, criterion=criterion, input_shapes=SHAPES)
    v = r.report["verify"]
    assert v["branch_values"] == {"mode": [2], "flag": [4]}       # the defaults 1 and 5 ran first
    assert sorted((g["channels"], g["removed"]) for g in r.report["groups"]) == [(6, 3), (10, 5), (12, 6), (16, 8)]
    # the weights inside bodies shrank where they live now (the main graph), and the bodies
    # declare their pruned shapes
    inits = {t.name: tuple(t.dims) for t in r.model.graph.initializer}
    assert inits["w_inner_then"] == (6, 5) and inits["w_inner_else"] == (6, 5) and inits["w_loop"] == (5, 5)
    assert inits["w_scan"] == (8, 8)
    body = next(node for node in r.model.graph.node if node.op_type == "Loop").attribute[0].g
    declared = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in [*body.input, *body.output]}
    assert declared["s_in"] == declared["s_out"] == [1, 5] and declared["z"] == [1, 3]
    if criterion == "obspa":   # no statistics inside bodies: those groups say they fell back
        notes = {g["id"]: g.get("note") for g in r.report["groups"]}
        assert any(note and "inside an If/Loop/Scan body" in note for note in notes.values())


def _run(model, **feeds):
    rng = np.random.default_rng(0)
    base = {"x": rng.standard_normal((1, 8)).astype(np.float32),
            "seq": rng.standard_normal((5, 1, 8)).astype(np.float32),
            "mode": np.array(1, np.int64), "flag": np.array(5, np.int64)}
    base.update({k: np.array(v, np.int64) for k, v in feeds.items()})
    return ort.InferenceSession(model.SerializeToString()).run(None, base)[0]


def test_every_path_matches_the_masked_original():
    """The three paths (outer then with each inner branch, outer else) agree one by one."""
    model = control_flow_model()
    r = spa.prune(model, ratio=0.5, criterion="l1", input_shapes=SHAPES, verify=False, round_to=1)
    a = analyze(model, SHAPES)
    masked = masked_model(a.model, r.plans[0], a.shapes)
    for feeds in ({}, {"flag": 4}, {"mode": 2}):
        np.testing.assert_allclose(_run(r.model, **feeds), _run(masked, **feeds), rtol=1e-5, atol=1e-6)


def _wrong_in_one_branch(r, a) -> onnx.ModelProto:
    """The pruned model with the nested then-branch's weight sliced at the wrong rows: the
    kept rows in reverse order (a rewrite that edited that branch wrongly)."""
    wrong = onnx.ModelProto()
    wrong.CopyFrom(r.model)
    kept = r.plans[0].kept_of(("w_inner_then", 0))
    original = numpy_helper.to_array(next(t for t in a.model.graph.initializer if t.name == "w_inner_then"))
    value = original[kept[::-1]][:, r.plans[0].kept_of(("w_inner_then", 1))]
    t = next(t for t in wrong.graph.initializer if t.name == "w_inner_then")
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), "w_inner_then"))
    return wrong


def test_oracle_fails_a_branch_edited_wrongly(monkeypatch):
    """The wrong branch runs only with flag=4, which no default input selects: the oracle
    catches it by feeding the other side of ``flag < 5``, and would not without that."""
    model = control_flow_model()
    r = spa.prune(model, ratio=0.5, criterion="l1", input_shapes=SHAPES, verify=False, round_to=1)
    a = analyze(model, SHAPES)
    masked = masked_model(a.model, r.plans[0], a.shapes)
    assert oracle(r.model, masked, SHAPES, a.model).ok
    wrong = _wrong_in_one_branch(r, a)
    result = oracle(wrong, masked, SHAPES, a.model)
    assert not result.ok and result.max_rel > 1e-2
    monkeypatch.setattr(oracle_module, "branch_values", lambda model: {})
    assert oracle(wrong, masked, SHAPES, a.model).ok      # blind to the branch the defaults skip


def test_blocked_control_flow_fixes_its_bodies_boundary():
    """An If excluded by pattern keeps its branches' outputs whole (a branch output left free
    would shrink while the If's output keeps its size); layers inside still prune."""
    r = assert_prunes(control_flow_model(), ratio=0.5, criterion="l1", input_shapes=SHAPES, exclude=["outer_if"])
    assert sorted((g["channels"], g["removed"]) for g in r.report["groups"]) == [(6, 3), (12, 6), (16, 8)]
    assert any("outer_if" in b["reason"] and b["channels"] == 10 for b in r.report["blocked"])


def test_bodies_share_one_name_space():
    """Sibling branches may reuse a name (here the else branch calls its MatMul's output "a",
    as the then branch does): normalize renames one, hoists the body weights (an initializer,
    a Constant) to the main graph and names every body node."""
    model = control_flow_model()
    outer_if = next(node for node in model.graph.node if node.op_type == "If")
    else_branch = next(att.g for att in outer_if.attribute if att.name == "else_branch")
    else_branch.node[0].output[0] = "a"
    else_branch.node[1].input[0] = "a"
    onnx.checker.check_model(model, full_check=True)
    a = analyze(model, SHAPES)
    names = [o for _, node in walk(a.model.graph) for o in node.output]
    assert len(names) == len(set(names))
    node_names = [node.name for _, node in walk(a.model.graph)]
    assert all(node_names) and len(node_names) == len(set(node_names))
    assert {"w_inner_then", "w_inner_else"} <= {t.name for t in a.model.graph.initializer}
    assert not any(len(att.g.initializer) or any(n.op_type == "Constant" for n in att.g.node)
                   for _, node in walk(a.model.graph) for att in node.attribute if att.HasField("g"))
    r = assert_prunes(model, ratio=0.5, criterion="l1", input_shapes=SHAPES)
    assert sorted((g["channels"], g["removed"]) for g in r.report["groups"]) == [(6, 3), (10, 5), (12, 6), (16, 8)]


def test_tail_inside_if_branches_is_judged_by_what_it_reads():
    """An output made by an If whose branches end in a Sigmoid: the oracle fetches what each
    branch's Sigmoid reads through a new output of the If (a saturated sigmoid resolves only
    to 3e-8, so its own scale says nothing of how precisely it was computed)."""
    from spa.verify.tails import fetched_name, pre_activation, with_outputs
    rng = np.random.default_rng(0)
    n = helper.make_node
    branch = {b: helper.make_graph([n("MatMul", ["x", f"w_{b}"], [f"{b}_mm"]), n("Sigmoid", [f"{b}_mm"], [f"{b}_y"])],
                                   b, [], [_vi(f"{b}_y")]) for b in ("t", "e")}
    graph = helper.make_graph(
        [n("Equal", ["mode", "one"], ["c"]), n("If", ["c"], ["y"], name="if", then_branch=branch["t"],
                                                 else_branch=branch["e"])],
        "tail", [_vi("x", shape=[1, 4]), _vi("mode", TensorProto.INT64, [])], [_vi("y", shape=[1, 3])],
        [_w(rng, "w_t", 4, 3), _w(rng, "w_e", 4, 3), numpy_helper.from_array(np.array(1, np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    pre, tail = pre_activation(model, "y")
    assert pre == ("If", "if", 0, "t_mm", "e_mm") and tail[1][0][0] == "Sigmoid"
    fetch = with_outputs(model, [pre])
    x = rng.standard_normal((1, 4)).astype(np.float32)
    session = ort.InferenceSession(fetch.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    for mode, w in ((1, "w_t"), (0, "w_e")):
        got = dict(zip(names, session.run(None, {"x": x, "mode": np.array(mode, np.int64)})))
        want = x @ numpy_helper.to_array(next(t for t in graph.initializer if t.name == w))
        np.testing.assert_allclose(got[fetched_name(pre)], want, rtol=1e-5)


# ---- Silero VAD as shipped (silero-vad on PyPI, 6.2.1 and 6.2.3 ship the same files): its network lives
# in nested If branches

def _silero_file(name: str) -> Path | None:
    spec = importlib.util.find_spec("silero_vad")   # found, not imported: it imports torch
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    return path if path.exists() else None


def _silero(name: str) -> Path:
    path = _silero_file(name)
    if path is None:
        pytest.skip("silero-vad is not installed (pip install silero-vad==6.2.3 --no-deps)")
    return path


@pytest.mark.parametrize("name,groups", [("silero_vad_op18_ifless.onnx", 10), ("silero_vad_half.onnx", 5),
                                         ("silero_vad_16k_op15.onnx", 5)])
def test_silero_vad_variants_prune(name, groups):
    """The package's other files: the 16 and 8 kHz networks in the two branches of one If
    (op18), or a 16 kHz network whose LSTM state handling sits in nested Ifs (half, op15)."""
    r = spa.prune(str(_silero(name)), ratio=0.3, verify=True)
    assert r.report["verify"]["ok"] and len(r.report["groups"]) == groups
    assert r.report["after"]["params"] < 0.75 * r.report["before"]["params"]


def test_silero_vad_prunes_both_sample_rates():
    path = _silero("silero_vad.onnx")
    r = spa.prune(str(path), ratio=0.3, verify=True)
    rep = r.report
    assert rep["verify"]["ok"] and rep["verify"]["branch_values"] == {"sr": [16001]}
    removed = sum(g["removed"] for g in rep["groups"])
    assert len(rep["groups"]) == 10 and removed > 250
    assert rep["after"]["params"] < 0.75 * rep["before"]["params"]
    # the LSTM's input weights and the encoder convolutions of both branches shrank
    shrunk = {t.name for t in r.model.graph.initializer} & {m.split("[")[0] for g in rep["groups"] if g["removed"]
                                                          for m in g["members"]}
    assert any("decoder.rnn.weight_ih" in n for n in shrunk) and sum("reparam_conv.weight" in n for n in shrunk) == 8
    # and the pruned model equals the masked original at both sample rates it was built for
    a = analyze(str(path))
    masked = ort.InferenceSession(masked_model(a.model, r.plans[0], a.shapes).SerializeToString())
    pruned = ort.InferenceSession(r.model.SerializeToString())
    rng = np.random.default_rng(0)
    for sr, n in ((16000, 512), (8000, 256)):
        feeds = {"input": rng.standard_normal((1, n)).astype(np.float32),
                 "state": rng.standard_normal((2, 1, 128)).astype(np.float32) * 0.1, "sr": np.array(sr, np.int64)}
        for got, want in zip(pruned.run(None, feeds), masked.run(None, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
