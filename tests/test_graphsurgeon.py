"""onnx-graphsurgeon interop: spa.prune()/analyze() take a gs.Graph, results hand one back."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import spa
from spa.runtime import session

gs = pytest.importorskip("onnx_graphsurgeon")

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo_cnn.onnx"


def _graph():
    return gs.import_onnx(onnx.load(DEMO))


def test_analyze_a_graph_finds_the_groups_of_the_file():
    assert spa.analyze(_graph()).summary()["groups"] == spa.analyze(DEMO).summary()["groups"]


def test_prune_a_graph_and_get_a_graph_back():
    graph = _graph()
    nodes, weights = len(graph.nodes), {n: t.values.shape for n, t in graph.tensors().items()
                                        if isinstance(t, gs.Constant)}
    result = spa.prune(graph, ratio=0.5, criterion="l1")
    expected = spa.prune(DEMO, ratio=0.5, criterion="l1")
    assert result.report["after"]["macs"] == expected.report["after"]["macs"] < result.report["before"]["macs"]
    assert result.report["verify"]["ok"]
    # the caller's graph is untouched
    assert len(graph.nodes) == nodes
    assert {n: t.values.shape for n, t in graph.tensors().items() if isinstance(t, gs.Constant)} == weights

    back = result.to_graphsurgeon()
    assert isinstance(back, gs.Graph) and len(back.nodes) == len(result.model.graph.node)
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    name = result.model.graph.input[0].name
    y_gs = session(gs.export_onnx(back)).run(None, {name: x})[0]
    y = session(result.model).run(None, {name: x})[0]
    np.testing.assert_allclose(y_gs, y, rtol=1e-5, atol=1e-5)


def test_without_graphsurgeon_the_error_says_how_to_install(monkeypatch):
    result = spa.prune(DEMO, ratio=0.25)
    monkeypatch.setitem(sys.modules, "onnx_graphsurgeon", None)   # import now fails
    with pytest.raises(spa.SpaError, match=r"pip install 'spa-prune\[graphsurgeon\]'"):
        result.to_graphsurgeon()
