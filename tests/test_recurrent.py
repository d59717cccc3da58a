"""LSTM, GRU and RNN: hidden and input sizes pruned on torch exports, under the oracle."""

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph, assert_prunes
from spa.verify.metrics import node_macs

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


# ---- onnxruntime's DynamicQuantizeLSTM (quantize_dynamic of an LSTM) ---------------------------

def quantized(tmp_path, model, per_channel=False, **extra):
    """``model`` through onnxruntime's dynamic quantizer: its LSTMs become DynamicQuantizeLSTM."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    src, dst = tmp_path / "float.onnx", tmp_path / "dynamic.onnx"
    onnx.save(model, src)
    quantization.quantize_dynamic(str(src), str(dst), per_channel=per_channel,
                                  op_types_to_quantize=["LSTM", "MatMul", "Gemm"], extra_options=extra)
    q = onnx.load(dst)
    assert [n.op_type for n in q.graph.node if n.domain == "com.microsoft"] == ["DynamicQuantizeLSTM"]
    assert not recurrent_nodes(q)
    return q


def dq_nodes(model):
    return [n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM"]


def dq_arrays(model):
    """W, R and inputs 8-11 (W_scale, W_zero_point, R_scale, R_zero_point) of the first one."""
    inits = {t.name: t for t in model.graph.initializer}
    node = dq_nodes(model)[0]
    return {k: onnx.numpy_helper.to_array(inits[node.input[k]]) for k in (1, 2, 8, 9, 10, 11)}


def attr(node, name):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


@pytest.mark.parametrize("bidirectional,per_channel", [(False, False), (True, True)])
def test_dynamic_quantize_lstm_layout(tmp_path, bidirectional, per_channel):
    """What the quantizer writes: W [dirs, input, 4H] and R [dirs, H, 4H] (ONNX's LSTM
    transposed), scales and zero points [dirs] or [dirs, 4H] along the gate rows: dequantized
    and transposed back, they are the float LSTM's weights to within half a step."""
    model = export(tmp_path, "LSTM", bidirectional)
    q = dq_arrays(quantized(tmp_path, model, per_channel))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    node = recurrent_nodes(model)[0]
    dirs = 2 if bidirectional else 1
    for k, (scale, zero) in {1: (8, 9), 2: (10, 11)}.items():
        assert q[scale].shape == q[zero].shape == ((dirs, 4 * HIDDEN) if per_channel else (dirs,))
        s = q[scale].reshape(dirs, 1, -1)
        z = q[zero].reshape(dirs, 1, -1).astype(np.float32)
        back = ((q[k].astype(np.float32) - z) * s).transpose(0, 2, 1)
        assert back.shape == inits[node.input[k]].shape == (dirs, 4 * HIDDEN, FEATURES if k == 1 else HIDDEN)
        assert np.all(np.abs(back - inits[node.input[k]]) <= s.transpose(0, 2, 1) / 2 + 1e-6)


def macs_of(model, op):
    shapes = spa.analyze(model).shapes
    return sum(node_macs(n, shapes) for n in model.graph.node if n.op_type == op)


@pytest.mark.parametrize("bidirectional,per_channel", [(False, False), (True, True), (True, False)])
def test_dynamic_quantize_lstm_prunes_hidden_and_input(tmp_path, bidirectional, per_channel):
    model = export(tmp_path, "LSTM", bidirectional)
    q = quantized(tmp_path, model, per_channel)
    assert macs_of(q, "DynamicQuantizeLSTM") == macs_of(model, "LSTM") > 0   # counted as the LSTM
    r = assert_prunes(q)   # the oracle passed
    assert not [b for b in r.report["blocked"] if "DynamicQuantizeLSTM" in b["reason"]
                and "batch" not in b["reason"] and "direction" not in b["reason"]]
    dirs = 2 if bidirectional else 1
    node = dq_nodes(r.model)[0]
    assert attr(node, "hidden_size") == HIDDEN // 2
    w = dq_arrays(r.model)
    assert w[1].shape == (dirs, FEATURES // 2, 4 * HIDDEN // 2)
    assert w[2].shape == (dirs, HIDDEN // 2, 4 * HIDDEN // 2)
    for k in (8, 9, 10, 11):   # per gate row: sliced with the units; per direction: as they were
        assert w[k].shape == ((dirs, 4 * HIDDEN // 2) if per_channel else (dirs,))
    assert out_shape(r.model) == out_shape(model)
    assert macs_of(r.model, "DynamicQuantizeLSTM") < macs_of(q, "DynamicQuantizeLSTM") / 3
    assert r.report["after"]["macs"] < r.report["before"]["macs"]


def test_dynamic_quantize_lstm_every_optional_input(tmp_path):
    """B, sequence_lens, nonzero initial states (which the oracle must zero for a removed
    unit) and peepholes; clip."""
    q = quantized(tmp_path, hand_built("LSTM", clip=0.5))
    node = dq_nodes(q)[0]
    assert all(node.input[k] for k in range(12))
    r = assert_prunes(q)
    node = dq_nodes(r.model)[0]
    inits = {t.name: t for t in r.model.graph.initializer}
    assert attr(node, "hidden_size") == 4
    assert [list(inits[node.input[k]].dims) for k in (3, 5, 6, 7)] == [[1, 32], [1, 2, 4], [1, 2, 4], [1, 12]]


def as_uint8(model, zero_points):
    """The int8 weights of the DynamicQuantizeLSTM moved to uint8 around other zero points
    (``zero_points``: one per direction): the same function, nonzero zero points."""
    inits = {t.name: t for t in model.graph.initializer}
    node = dq_nodes(model)[0]
    for k, zk in ((1, 9), (2, 11)):
        w, z = (onnx.numpy_helper.to_array(inits[node.input[i]]) for i in (k, zk))
        shift = np.asarray(zero_points, np.int32).reshape((-1,) + (1,) * (z.ndim - 1))
        shift_w = shift.reshape(-1, 1, 1)
        inits[node.input[k]].CopyFrom(onnx.numpy_helper.from_array(
            (w.astype(np.int32) + shift_w).clip(0, 255).astype(np.uint8), node.input[k]))
        inits[node.input[zk]].CopyFrom(onnx.numpy_helper.from_array(
            (z.astype(np.int32) + shift).astype(np.uint8), node.input[zk]))
    return model


@pytest.mark.parametrize("per_channel,zero_points", [(False, [120, 135]), (True, [128, 128])])
def test_dynamic_quantize_lstm_nonzero_zero_points(tmp_path, per_channel, zero_points):
    """uint8 weights: a removed unit's rows are set to the zero point, not 0, in the masked
    original (onnxruntime wants per-row zero points constant, hence one value there)."""
    q = as_uint8(quantized(tmp_path, export(tmp_path, "LSTM", True), per_channel), zero_points)
    r = assert_prunes(q)
    assert attr(dq_nodes(r.model)[0], "hidden_size") == HIDDEN // 2
    assert dq_arrays(r.model)[2].dtype == np.uint8


def test_dynamic_quantize_lstm_asymmetric_int8(tmp_path):
    """WeightSymmetric=False: int8 zero points per direction that are not 0."""
    q = quantized(tmp_path, export(tmp_path, "LSTM", True), WeightSymmetric=False)
    assert np.any(dq_arrays(q)[9] != 0) or np.any(dq_arrays(q)[11] != 0)
    r = assert_prunes(q)
    assert attr(dq_nodes(r.model)[0], "hidden_size") == HIDDEN // 2


def test_dynamic_quantize_lstm_activation_not_zero_at_zero(tmp_path):
    """g = Sigmoid: a silenced unit's state is not 0, so the hidden size stays whole (the input
    size is still free)."""
    q = quantized(tmp_path, export(tmp_path, "LSTM"))
    dq_nodes(q)[0].attribute.append(onnx.helper.make_attribute("activations", ["Sigmoid", "Sigmoid", "Tanh"]))
    r = assert_prunes(q)
    assert attr(dq_nodes(r.model)[0], "hidden_size") == HIDDEN
    assert dq_arrays(r.model)[1].shape == (1, FEATURES // 2, 4 * HIDDEN)
    assert any("activation Sigmoid does not map 0 to 0" in b["reason"] for b in r.report["blocked"])


def rolled_gates(monkeypatch):
    """The pruned model's W with its gate blocks rotated (i rows read as o, ...) before the oracle."""
    import spa.pipeline
    oracle = spa.pipeline.oracle

    def corrupted(pruned, masked, *args, **kw):
        node = dq_nodes(pruned)[0]
        t = next(t for t in pruned.graph.initializer if t.name == node.input[1])
        w = onnx.numpy_helper.to_array(t)
        t.CopyFrom(onnx.numpy_helper.from_array(np.roll(w, w.shape[2] // 4, axis=2), t.name))
        return oracle(pruned, masked, *args, **kw)
    monkeypatch.setattr(spa.pipeline, "oracle", corrupted)


def test_dynamic_quantize_lstm_oracle_catches_wrong_gates(tmp_path, monkeypatch):
    q = quantized(tmp_path, export(tmp_path, "LSTM", True), per_channel=True)
    rolled_gates(monkeypatch)
    with pytest.raises(spa.VerificationError, match="differs from the masked original"):
        spa.prune(q, ratio=0.5, criterion="random", seed=0, round_to=1, verify=True)


def test_dynamic_quantize_lstm_oracle_needs_silenced_units(tmp_path, monkeypatch):
    """Masking only R's rows of a removed unit (as the float LSTM masks its columns) is not
    enough: the unit's state still moves the dynamic quantization range of the others."""
    from spa.graph.rules import recurrent

    def rows_only(ctx, weights, initial):
        ctx.contract_integer(2, weights.cols, 11, zero_point_axes=(0,))
    monkeypatch.setattr(recurrent, "_silence", rows_only)
    q = quantized(tmp_path, export(tmp_path, "LSTM"))
    with pytest.raises(spa.VerificationError, match="differs from the masked original"):
        spa.prune(q, ratio=0.5, criterion="random", seed=0, round_to=1, verify=True)


def zero_state_graph():
    """The initial states as older exporters write them (ddddocr's OCR models): zeros of
    ConstantOfShape(Concat([dirs], batch read from x's shape, [hidden]))."""
    h, f, g = 8, 6, Graph(opset=17)
    x = g.op("MatMul", [g.input([5, 2, 4]), g.weight(4, f)])
    batch = g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", [x]), g.const(np.array(1, np.int64))], axis=0),
                               g.const(np.array([0], np.int64))])
    shape = g.op("Concat", [g.const(np.array([2], np.int64)), batch, g.const(np.array([h], np.int64))], axis=0)
    zeros = g.op("ConstantOfShape", [shape], value=onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.0]))
    y = g.op("LSTM", [x, g.weight(2, 4 * h, f), g.weight(2, 4 * h, h), g.weight(2, 8 * h), "", zeros, zeros],
             hidden_size=h, direction="bidirectional")
    g.output(g.op("MatMul", [g.op("Reshape", [y, g.const(np.array([5, 2, 2 * h], np.int64))]), g.weight(2 * h, 3)]))
    return g.model()


@pytest.mark.parametrize("dynamic", [False, True])
def test_zero_state_from_constant_of_shape(tmp_path, dynamic):
    """The hidden size is a literal of the state's shape vector: rewritten, not a block."""
    model = quantized(tmp_path, zero_state_graph()) if dynamic else zero_state_graph()
    r = assert_prunes(model)
    node = (dq_nodes if dynamic else recurrent_nodes)(r.model)[0]
    assert attr(node, "hidden_size") == 4
    assert not [b for b in r.report["blocked"] if "ConstantOfShape" in b["reason"]]
