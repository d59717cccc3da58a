"""No silent block (a group kept whole always says why) and the dependency graph users see."""

from __future__ import annotations

import networkx as nx
import numpy as np
import onnx
import pytest

from graphs import Graph
from spa.analysis import analyze
from spa.cli.commands import main


def _conv_then(kind: str) -> onnx.ModelProto:
    """x -> Conv(4->8) -> Relu -> an op that uses the 8 channels as something else."""
    g = Graph()
    y = g.op("Relu", [g.conv(g.input([1, 4, 8, 8]), 4, 8)])
    if kind == "DepthToSpace":
        z = g.op("DepthToSpace", [y], blocksize=2)
    elif kind == "Pad":
        z = g.op("Pad", [y, g.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))])
    elif kind == "Tile":
        z = g.op("Tile", [y, g.const(np.array([1, 2, 1, 1], np.int64))])
    else:
        z = g.op("Gather", [y, g.const(np.array([0, 2, 3], np.int64))], axis=1)
    g.output(z)
    return g.model()


@pytest.mark.parametrize("op", ["DepthToSpace", "Pad", "Tile", "Gather"])
def test_a_group_blocked_by_a_non_channel_use_says_so(op, tmp_path, capsys):
    model = _conv_then(op)
    a = analyze(model)
    assert not a.groups                      # the conv's 8 channels cannot be pruned...
    blocked = a.summary()["blocked"]
    conv_group = [b for b in blocked if "w1[0]" in b["members"]]
    assert len(conv_group) == 1 and conv_group[0]["channels"] == 8    # ...and the report says why
    node = next(n for n in model.graph.node if n.op_type == op).name
    assert conv_group[0]["reasons"] == [{"kind": "not-channel", "node": node, "op": op,
                                         "reason": conv_group[0]["reason"]}]
    assert node in conv_group[0]["reason"] and "not a channel axis of" not in conv_group[0]["reason"]
    # the kernel axes of the weight (constant, not channels) stay out of the report
    assert not [b for b in blocked if any(m in ("w1[2]", "w1[3]") for m in b["members"])]

    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "blocked" in out and node in out


def test_graph_io_reasons_are_typed_without_a_node():
    a = analyze(_conv_then("Pad"))
    io = [b for b in a.summary()["blocked"] if b["reason"].startswith("graph input")]
    assert io and io[0]["reasons"][0]["node"] is None and io[0]["reasons"][0]["kind"] == "graph-input"


@pytest.mark.parametrize("model,kind,op", [
    (lambda: _conv_then("Pad"), "not-channel", "Pad"),
    (lambda: _custom_op_after_conv(), "no-rule", "Foo"),
])
def test_reasons_are_typed_where_they_are_stated(model, kind, op):
    """The kind, node and op come from the rule that fixed the axis, not from the text."""
    blocked = analyze(model()).summary()["blocked"]
    typed = [r for b in blocked for r in b["reasons"] if r["kind"] == kind]
    assert typed and all(r["op"] == op and r["node"] for r in typed)


def _custom_op_after_conv() -> onnx.ModelProto:
    g = Graph()
    y = g.conv(g.input([1, 3, 8, 8]), 3, 8)
    g.nodes.append(onnx.helper.make_node("Foo", [y], ["foo_out"], name="custom", domain="my.domain"))
    g.outputs.append("foo_out")
    m = onnx.helper.make_model(onnx.helper.make_graph(g.nodes, "t", g.inputs, [onnx.helper.make_tensor_value_info(
        "foo_out", onnx.TensorProto.FLOAT, [1, 8, 8, 8])], g.inits),
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("my.domain", 1)])
    return m


def _two_convs() -> onnx.ModelProto:
    g = Graph()
    y = g.op("Relu", [g.conv(g.input([1, 3, 8, 8]), 3, 8)])
    g.output(g.conv(y, 8, 4))
    return g.model()


def test_analysis_graph_nodes_edges_and_groups():
    a = analyze(_two_convs())
    graph = a.graph
    assert isinstance(graph, nx.MultiGraph)
    # x -> n_Conv4(w1, w2) -> conv3 -> n_Relu6 -> relu5 -> n_Conv10(w7, w8) -> conv9
    for space in ("x[1]", "w1[0]", "w1[2]", "w2[0]", "conv3[1]", "relu5[1]", "w7[1]", "w8[0]", "conv9[1]"):
        assert space in graph, space
    # the hidden 8 channels: conv1 weight rows, its bias, the Relu and conv2's input axis
    (hidden,) = [g for g in a.groups if g.size == 8]
    for space in ("w1[0]", "w2[0]", "conv3[1]", "relu5[1]", "w7[1]"):
        assert graph.nodes[space]["group"] == hidden.id
        assert graph.nodes[space]["kind"] == "channels"
        assert graph.nodes[space]["size"] == 8
    assert graph.nodes["w1[1]"]["kind"] == "blocked" and "graph input" in graph.nodes["w1[1]"]["blocked"]
    assert graph.nodes["w1[2]"]["group"] == -1           # a kernel axis is in no group
    assert graph.nodes["w7[0]"]["group"] != hidden.id and graph.nodes["w7[0]"]["group"] >= 0
    assert graph.has_edge("w1[0]", "conv3[1]") and graph.has_edge("conv3[1]", "relu5[1]")
    # conv2 reads its input channels as groups x channels-per-group, and sums over them
    kinds = {d["coupling"] for d in graph.get_edge_data("relu5[1]", "w7[1]").values()}
    assert kinds == {"product"}
    assert graph.get_edge_data("relu5[1]", "op:n_Conv10")[0]["coupling"] == "contraction"
    couplings = {d["coupling"] for _, _, d in graph.edges(data=True)}
    assert couplings == {"same", "product", "contraction"}
    # the hidden group's spaces are one connected component of "same" edges
    same = nx.Graph([(u, v) for u, v, d in graph.edges(data=True) if d["coupling"] == "same"])
    assert {"w1[0]", "w2[0]", "conv3[1]", "relu5[1]"} <= nx.node_connected_component(same, "w1[0]")


def test_inspect_writes_a_readable_graphml(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_two_convs(), path)
    out = tmp_path / "deps.graphml"
    assert main(["inspect", str(path), "--graph", str(out)]) == 0
    graph = nx.read_graphml(out)
    assert graph.nodes["w1[0]"]["group"] == analyze(_two_convs()).graph.nodes["w1[0]"]["group"]
    assert graph.has_edge("w1[0]", "conv3[1]")
    before = path.read_bytes()
    assert main(["inspect", str(path), "--graph", str(path)]) != 0    # never over the model
    assert path.read_bytes() == before


def _grouped_conv() -> onnx.ModelProto:
    g = Graph(seed=1)
    y = g.op("Relu", [g.conv(g.input([1, 3, 8, 8]), 3, 8)])
    y = g.op("Relu", [g.conv(y, 8, 8, group=4)])
    g.output(g.conv(y, 8, 4))
    return g.model()


@pytest.mark.parametrize("model", [_grouped_conv, lambda: _conv_then("Pad"), _two_convs])
def test_every_reason_is_typed(model):
    """Each blocked reason carries its kind, and the node and op that stated it (graph inputs,
    outputs and exclusions name no node); none is left for the text to explain."""
    blocked = analyze(model()).summary()["blocked"]
    reasons = [r for b in blocked for r in b["reasons"]]
    assert reasons
    for r in reasons:
        assert r["kind"], r
        if r["kind"] not in ("graph-input", "graph-output", "excluded", "no-weight"):
            assert r["node"] and r["op"], r


def test_merged_factor_names_the_conv():
    """A grouped conv's channels are groups x channels per group: the factor that does not
    carry the channels is blocked by that Conv (regnet's 15 groups lost their op once)."""
    blocked = analyze(_grouped_conv()).summary()["blocked"]
    merged = [r for b in blocked for r in b["reasons"] if r["kind"] == "merged"]
    assert merged and all(r["op"] == "Conv" for r in merged)
