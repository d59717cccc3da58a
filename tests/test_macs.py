"""MACs of LSTM, GRU, RNN and Einsum: counted against formulas worked out here from shapes,
modelled exactly by the budget's ResourceModel, and lowered by pruning accordingly."""

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph
from spa.plan.allocate import ResourceModel, removed_positions
from spa.verify.metrics import count_macs, mac_terms, node_macs
from spa.plan.plan import make_plan
from spa.rewrite.apply import rewrite
from spa.loading.probe import infer_shapes

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def macs_of(model):
    return count_macs(model, infer_shapes(model, want_values=False))


def only(model, op):
    """node_macs of the model's single ``op`` node."""
    shapes = infer_shapes(model, want_values=False)
    (node,) = [n for n in model.graph.node if n.op_type == op]
    return node_macs(node, shapes)


def recurrent(op, seq=5, batch=2, features=6, hidden=8, dirs=1, layout=0, pre=None):
    """X -> op (W, R, B) -> Y; ``pre`` puts a MatMul of that many inputs before it and a
    MatMul head after it, so the input and hidden sizes are prunable."""
    g, n = Graph(), GATES[op]
    x_shape = [seq, batch, pre or features] if layout == 0 else [batch, seq, pre or features]
    x = g.input(x_shape)
    if pre:
        x = g.op("Relu", [g.op("MatMul", [x, g.weight(pre, features)])])
    attrs = dict(hidden_size=hidden, direction="bidirectional" if dirs == 2 else "forward")
    if layout:
        attrs["layout"] = 1
    y = g.op(op, [x, g.weight(dirs, n * hidden, features), g.weight(dirs, n * hidden, hidden),
                  g.weight(dirs, 2 * n * hidden)], n_out=1, **attrs)
    if pre:   # Y [seq, dirs, batch, H] -> [seq, batch, dirs * H] -> head
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]),
                             g.const(np.array([seq, batch, dirs * hidden], np.int64))])
        y = g.op("MatMul", [y, g.weight(dirs * hidden, 3)])
    g.output(y)
    return g.model()


@pytest.mark.parametrize("op,dirs,layout", [("LSTM", 1, 0), ("LSTM", 2, 0), ("LSTM", 1, 1),
                                            ("GRU", 1, 0), ("GRU", 2, 0), ("RNN", 1, 0), ("RNN", 2, 0)])
def test_recurrent_macs_formula(op, dirs, layout):
    """seq x batch x dirs x gates x H x (input + H): W on every input, R on every state."""
    seq, batch, features, hidden = 5, 2, 6, 8
    model = recurrent(op, seq, batch, features, hidden, dirs, layout)
    want = seq * batch * dirs * GATES[op] * hidden * (features + hidden)
    assert count_macs(model, infer_shapes(model, want_values=False)) == want
    # two terms: the input product, and the recurrence, which lists the hidden axis twice
    terms = mac_terms(model.graph.node[0], infer_shapes(model, want_values=False))
    assert [m for m, _ in terms] == [want * features // (features + hidden), want * hidden // (features + hidden)]
    r = model.graph.node[0].input[2]
    assert [s.count((r, 2)) for _, s in terms] == [1, 2]


def einsum(equation, *shapes):
    g = Graph()
    operands = [g.input(s, name=f"x{k}") for k, s in enumerate(shapes)]
    g.output(g.op("Einsum", operands, equation=equation))
    return g.model()


@pytest.mark.parametrize("equation,shapes,want", [
    ("bi,io->bo", ([2, 6], [6, 16]), 2 * 6 * 16),                      # dense: a MatMul
    ("bij,bjk->bik", ([3, 5, 6], [3, 6, 7]), 3 * 5 * 6 * 7),           # batched
    ("bi,oij,bj->bo", ([2, 8], [12, 8, 10], [2, 10]), 2 * 12 * 8 * 10),  # bilinear, three operands
    ("...i,oi->...o", ([2, 4, 6], [16, 6]), 2 * 4 * 6 * 16),          # ellipsis dims count
    ("ij,jk", ([3, 6], [6, 4]), 3 * 6 * 4),                            # implicit output
    ("bi,bi,bi->bi", ([2, 16], [1, 16], [2, 1]), 2 * 16),              # size-1 broadcasts
    ("bsi->bs", ([2, 4, 6],), 0),                                      # one operand: not counted
    ("ij->ji", ([3, 6],), 0),
])
def test_einsum_macs_formula(equation, shapes, want):
    """Two or more operands: the product of every distinct label's size."""
    assert only(einsum(equation, *shapes), "Einsum") == want


def test_einsum_matches_matmul():
    """bsi,io->bso counts what the MatMul it spells counts."""
    g = Graph()
    x, w = g.input([2, 4, 6]), g.weight(6, 16)
    g.output(g.op("Einsum", [x, w], equation="bsi,io->bso"))
    g.output(g.op("MatMul", [x, w]))
    model = g.model()
    assert only(model, "Einsum") == only(model, "MatMul") == 2 * 4 * 6 * 16


def einsum_net():
    """MatMul -> bilinear Einsum (bi,oij,bj->bo) -> batched Einsum -> MatMul: every label's
    space is a group of its own or shared with a MatMul."""
    g = Graph()
    x = g.input([2, 6])
    h1 = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 8)])])
    h2 = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 10)])])
    y = g.op("Relu", [g.op("Einsum", [h1, g.weight(12, 8, 10), h2], equation="bi,oij,bj->bo")])
    z = g.op("Relu", [g.op("Einsum", [y, g.weight(12, 16)], equation="...i,io->...o")])
    g.output(g.op("MatMul", [z, g.weight(16, 3)]))
    return g.model()


@pytest.mark.parametrize("build", [
    lambda: recurrent("LSTM", pre=5, dirs=2),
    lambda: recurrent("GRU", pre=5),
    lambda: recurrent("RNN", pre=5, dirs=2),
    einsum_net,
], ids=["lstm-bi", "gru", "rnn-bi", "einsum"])
def test_resource_model_is_exact(build):
    """The budget's MACs for random keep counts equal count_macs of the rewritten model:
    the recurrence falls with the hidden share squared, the input product with hidden x input."""
    a = spa.analyze(build())
    assert [g.size for g in a.groups if g.size in (8, 16)], "the hidden size should be a group"
    model = ResourceModel(a.model, a.shapes, a.dep, a.groups, "macs")
    assert model.full == count_macs(a.model, a.shapes)
    rng = np.random.default_rng(0)
    for _ in range(4):
        keeps = [int(rng.integers(1, g.size + 1)) for g in a.groups]
        orders = [rng.permutation(g.size) for g in a.groups]
        pruned = rewrite(a.model, make_plan(a, removed_positions(a.groups, orders, keeps)))
        assert model.value(keeps) == pytest.approx(macs_of(pruned))


torch = pytest.importorskip("torch")


class LstmNet(torch.nn.Module):
    def __init__(self, features=12, hidden=16):
        super().__init__()
        self.pre = torch.nn.Linear(6, features)
        self.rnn = torch.nn.LSTM(features, hidden)
        self.head = torch.nn.Linear(hidden, 5)

    def forward(self, x):
        return self.head(self.rnn(torch.relu(self.pre(x)))[0])


@pytest.fixture(scope="module")
def lstm_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lstm") / "lstm.onnx"
    torch.onnx.export(LstmNet().eval(), (torch.randn(5, 2, 6),), str(path), input_names=["x"],
                      output_names=["out"], opset_version=17, dynamo=False)
    return onnx.load(path)


def linear_macs(seq, batch, features, hidden):
    """Linear(6, features), LSTM(features, hidden), Linear(hidden, 5) on [seq, batch, 6]."""
    rows = seq * batch
    return rows * 6 * features + rows * 4 * hidden * (features + hidden) + rows * hidden * 5


def test_pruned_lstm_macs(lstm_model):
    """Ratio 0.5 halves the hidden and input sizes; the report's MACs are count_macs of each file."""
    assert macs_of(lstm_model) == linear_macs(5, 2, 12, 16)
    r = spa.prune(lstm_model, ratio=0.5, criterion="l1", round_to=1)
    (node,) = [n for n in r.model.graph.node if n.op_type == "LSTM"]
    assert next(a.i for a in node.attribute if a.name == "hidden_size") == 8
    assert r.report["before"]["macs"] == linear_macs(5, 2, 12, 16)
    assert r.report["after"]["macs"] == macs_of(r.model) == linear_macs(5, 2, 6, 8)


@pytest.mark.parametrize("round_to", [8, 1])
def test_macs_budget_on_lstm(lstm_model, round_to):
    """The budget sees the LSTM's MACs (most of this model's): met, and with single-channel
    steps not overshot by much either."""
    r = spa.prune(lstm_model, macs=0.6, criterion="l1", round_to=round_to)
    budget, before, after = r.report["budget"], r.report["before"]["macs"], r.report["after"]["macs"]
    assert budget["met"], budget
    assert after / before <= 0.6
    assert after == macs_of(r.model)
    assert budget["achieved"] == pytest.approx(after / before)
    if round_to == 1:
        assert after / before > 0.5
