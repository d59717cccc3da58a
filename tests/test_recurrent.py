"""LSTM, GRU and RNN: hidden and input sizes pruned on torch exports, under the oracle."""

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph, assert_prunes

torch = pytest.importorskip("torch")

HIDDEN, FEATURES = 16, 12
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


class Net(torch.nn.Module):
    """Linear -> recurrent layer(s) -> Linear: the first Linear makes the input size prunable,
    the head reads every hidden unit of the last layer. ``state_out`` also returns the final
    hidden state (a recurrent model carrying its state across calls)."""

    def __init__(self, kind, bidirectional, batch_first, layers, state_out=False, **rnn):
        super().__init__()
        self.pre = torch.nn.Linear(6, FEATURES)
        self.rnn = getattr(torch.nn, kind)(FEATURES, HIDDEN, num_layers=layers, bidirectional=bidirectional,
                                           batch_first=batch_first, **rnn)
        self.head = torch.nn.Linear(HIDDEN * (2 if bidirectional else 1), 5)
        self.state_out = state_out

    def forward(self, x, *state):
        state = (state if len(state) > 1 else state[0]) if state else None
        y, last = self.rnn(torch.relu(self.pre(x)), state)
        out = self.head(y)
        return (out, last[0] if isinstance(last, tuple) else last) if self.state_out else out


def export(tmp_path, kind, bidirectional=False, batch_first=False, layers=1, dynamo=False, state=False, **kw):
    torch.manual_seed(0)
    net = Net(kind, bidirectional, batch_first, layers, state_out=state, **kw).eval()
    x = torch.randn(2, 5, 6) if batch_first else torch.randn(5, 2, 6)
    inputs, names, outputs = (x,), ["x"], ["out"]
    if state:   # the caller feeds the initial state and gets the last one back
        h = torch.randn(layers * (2 if bidirectional else 1), 2, HIDDEN)
        inputs = (x, h, h.clone()) if kind == "LSTM" else (x, h)
        names, outputs = ["x", "h0", "c0"][:len(inputs)], ["out", "hn"]
    path = tmp_path / f"{kind}.onnx"
    extra = dict(dynamo=True, external_data=False) if dynamo else dict(dynamo=False)
    torch.onnx.export(net, inputs, str(path), input_names=names, output_names=outputs,
                      opset_version=18 if dynamo else 17, **extra)
    return onnx.load(path)


def recurrent_nodes(model):
    return [n for n in model.graph.node if n.op_type in GATES]


def hidden_sizes(model):
    return [next(a.i for a in n.attribute if a.name == "hidden_size") for n in recurrent_nodes(model)]


def input_sizes(model):
    """Axis 2 of every recurrent layer's W: the input size it reads."""
    inits = {t.name: t for t in model.graph.initializer}
    return [inits[n.input[1]].dims[2] for n in recurrent_nodes(model)]


def out_shape(model):
    return [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("kind,bidirectional,batch_first,layers", [
    ("LSTM", False, False, 1),
    ("LSTM", True, True, 2),
    ("LSTM", True, False, 1),
    ("LSTM", False, True, 2),
    ("GRU", False, True, 1),
    ("GRU", True, False, 2),
    ("RNN", True, True, 1),
])
def test_torch_export_prunes_hidden_and_input(tmp_path, kind, bidirectional, batch_first, layers):
    model = export(tmp_path, kind, bidirectional, batch_first, layers)
    r = assert_prunes(model)   # the oracle passed
    assert hidden_sizes(model) == [HIDDEN] * layers
    assert hidden_sizes(r.model) == [HIDDEN // 2] * layers
    # the first layer reads the pruned Linear, the others the pruned layer below (both directions)
    dirs = 2 if bidirectional else 1
    assert input_sizes(r.model) == [FEATURES // 2] + [dirs * HIDDEN // 2] * (layers - 1)
    assert out_shape(r.model) == out_shape(model)


def test_dynamo_export(tmp_path):
    pytest.importorskip("onnxscript")
    model = export(tmp_path, "LSTM", bidirectional=True, batch_first=True, dynamo=True)
    assert hidden_sizes(model) == [HIDDEN]   # the dynamo exporter writes ONNX's LSTM too
    r = assert_prunes(model)
    assert hidden_sizes(r.model) == [HIDDEN // 2]
    assert input_sizes(r.model) == [FEATURES // 2]
    assert out_shape(r.model) == out_shape(model)


def test_relu_rnn(tmp_path):
    """A non-saturating activation: still exact, since the oracle zeroes R's columns."""
    model = export(tmp_path, "RNN", layers=2, nonlinearity="relu")
    assert [a.strings for n in recurrent_nodes(model) for a in n.attribute if a.name == "activations"] \
        == [[b"Relu"]] * 2
    r = assert_prunes(model)
    assert hidden_sizes(r.model) == [HIDDEN // 2] * 2


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_state_carried_across_calls_stays_whole(tmp_path, kind):
    """h0 (and c0) in, hn out: the hidden size is part of the model's interface."""
    model = export(tmp_path, kind, state=True)
    r = assert_prunes(model)
    assert hidden_sizes(r.model) == [HIDDEN]
    assert input_sizes(r.model) == [FEATURES // 2]   # the input size is still free
    recurrence = recurrent_nodes(model)[0].input[2]   # R's columns: one per hidden unit
    blocked = [b for b in r.report["blocked"] if f"{recurrence}[2]" in b["members"]]
    assert len(blocked) == 1 and blocked[0]["reason"] == "graph input 'h0'", blocked


def hand_built(op, layout=0, **attrs):
    """Every optional input: B, sequence_lens, nonzero initial states (constants), LSTM's
    peepholes; Y and Y_h both read by MatMuls."""
    h, f, g = 8, 6, Graph(opset=17)
    n = GATES[op]
    x = g.op("MatMul", [g.input([2, 5, 4] if layout else [5, 2, 4]), g.weight(4, f)])
    state = [2, 1, h] if layout else [1, 2, h]
    inputs = [x, g.weight(1, n * h, f), g.weight(1, n * h, h), g.weight(1, 2 * n * h),
              g.const(np.array([5, 3], np.int32)), g.weight(*state)]
    if op == "LSTM":
        inputs += [g.weight(*state), g.weight(1, 3 * h)]
    outs = g.op(op, inputs, n_out=3 if op == "LSTM" else 2, hidden_size=h, layout=layout, **attrs)
    for y in outs[:2]:
        g.output(g.op("MatMul", [y, g.weight(h, 3)]))
    return g.model()


@pytest.mark.parametrize("op,attrs", [
    ("LSTM", {"clip": 0.5}),
    ("LSTM", {"input_forget": 1}),
    ("GRU", {"linear_before_reset": 1}),
    ("RNN", {"activations": ["Relu"]}),
])
def test_every_optional_input(op, attrs):
    r = assert_prunes(hand_built(op, **attrs))
    assert hidden_sizes(r.model) == [4]
    if op == "LSTM":   # peepholes follow their units
        inits = {t.name: t for t in r.model.graph.initializer}
        assert inits[recurrent_nodes(r.model)[0].input[7]].dims == [1, 12]


def test_batch_first_layout_analysis():
    """layout=1 (onnxruntime's CPU kernels do not run it: analysis only)."""
    analysis = spa.analyze(hand_built("LSTM", layout=1))
    node = recurrent_nodes(analysis.model)[0]
    hidden = [g for g in analysis.groups if f"{node.input[2]}[2]" in analysis.member_names(g)]
    assert len(hidden) == 1 and hidden[0].size == 8
    members = analysis.member_names(hidden[0])   # the states' last axis, W's rows: [batch, dirs, H]
    assert {f"{node.input[5]}[2]", f"{node.input[6]}[2]", f"{node.input[1]}[1]"} <= set(members)
