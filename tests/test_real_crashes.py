"""Graphs built like two real files that crashed spa (issue 8).

1. A paddle2onnx text-direction classifier: input ``x`` declared ``[-1, 3, 48, 192]`` and
   outputs ``[-1, 2]`` (paddle2onnx writes -1 as a dim_value for "any size"), Reshape targets
   with 0 and -1, Flatten-as-Reshape into a Gemm, an SE block's Expand/Tile. A -1 read as a
   size crashed the analysis (``repeats may not contain negative values``) and gave the
   calibration a batch of -1.
2. A Silero-VAD-like detector: an ``If`` on a scalar sample-rate input whose branches hold a
   Conv and an LSTM reading the main graph's tensors and the recurrent state
   ``[2, batch, hidden]``. Statistics collection fed the scalar with a batch axis and the state
   with the batch on the wrong axis, and onnxruntime failed inside the If.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from graphs import Graph, assert_prunes
from spa.score.data import BatchLayout, Calibration, consumer_specs

PADDLE_SHAPE = (1, 3, 48, 192)


def _set_dims(vi, dims):
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = d


def paddle_classifier(head: str) -> onnx.ModelProto:
    """Conv stem (channels prunable), then a paddle-style head whose sizes use 0 / -1."""
    g = Graph(opset=11)
    x = g.input([-1, 3, 48, 192])
    y = g.op("Relu", [g.conv(x, 3, 8, strides=[2, 2])])
    y = g.op("Relu", [g.conv(y, 8, 16, strides=[2, 2])])                     # 16 x 12 x 48
    y = g.op("MaxPool", [y], kernel_shape=[4, 4], strides=[4, 4])             # 16 x 3 x 12
    if head == "reshape_0_-1":           # paddle.flatten / reshape(x, [0, -1]) -> Linear
        y = g.op("Reshape", [y, g.const(np.array([0, -1], np.int64))])
        y = g.op("Add", [g.op("MatMul", [y, g.weight(16 * 3 * 12, 2)]), g.weight(2)])
    elif head == "reshape_-1_chw":       # reshape(x, [-1, C, H, W]) then more convs
        y = g.op("Reshape", [y, g.const(np.array([-1, 16, 3, 12], np.int64))])
        y = g.op("GlobalAveragePool", [g.op("Relu", [g.conv(y, 16, 8)])])
        y = g.op("Flatten", [y], axis=1)
        y = g.op("Gemm", [y, g.weight(2, 8), g.weight(2)], transB=1)
    elif head == "reshape_-1_flat":      # Flatten written as Reshape([-1, C*H*W]) into a Gemm
        y = g.op("Reshape", [y, g.const(np.array([-1, 16 * 3 * 12], np.int64))])
        y = g.op("Gemm", [y, g.weight(2, 16 * 3 * 12), g.weight(2)], transB=1)
    elif head == "se_expand_tile":       # squeeze-excitation broadcast back by Expand and Tile
        s = g.op("GlobalAveragePool", [y])
        s = g.op("HardSigmoid", [g.conv(g.op("Relu", [g.conv(s, 16, 4, k=1)]), 4, 16, k=1)])
        e = g.op("Expand", [s, g.const(np.array([1, 16, 3, 12], np.int64))])
        t = g.op("Tile", [s, g.const(np.array([1, 1, 3, 12], np.int64))])
        y = g.op("Add", [g.op("Mul", [y, e]), g.op("Mul", [y, t])])
        y = g.op("Reshape", [y, g.const(np.array([0, -1], np.int64))])
        y = g.op("MatMul", [y, g.weight(16 * 3 * 12, 2)])
    elif head == "shape_computed":       # reshape(x, [x.shape[0], x.shape[1]]) after pooling
        p = g.op("GlobalAveragePool", [y])
        target = g.op("Slice", [g.op("Shape", [p]), g.const(np.array([0], np.int64)),
                                g.const(np.array([2], np.int64))])
        y = g.op("MatMul", [g.op("Reshape", [p, target]), g.weight(16, 2)])
    else:
        raise ValueError(head)
    g.output(g.op("Softmax", [y], axis=1))
    m = g.model()
    _set_dims(m.graph.output[0], [-1, 2])
    return m


HEADS = ["reshape_0_-1", "reshape_-1_chw", "reshape_-1_flat", "se_expand_tile", "shape_computed"]


@pytest.mark.parametrize("head", HEADS)
def test_paddle_negative_dims_prune(head):
    model = paddle_classifier(head)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    for batch in (1, 2):
        assert_prunes(model, criterion="l1", input_shapes={"x": (batch,) + PADDLE_SHAPE[1:]})


def test_paddle_negative_dims_obspa():
    model = paddle_classifier("reshape_0_-1")
    calib = {"x": np.random.default_rng(0).standard_normal((6,) + PADDLE_SHAPE[1:]).astype(np.float32)}
    for data in (None, calib):
        r = assert_prunes(model, criterion="obspa", calib=data, input_shapes={"x": PADDLE_SHAPE})
        assert r.report["data"]["samples"] == (64 if data is None else 6)


def test_calibration_batches_ignore_negative_dims():
    """A declared -1 is an open batch axis, never a batch size of -1."""
    model = paddle_classifier("reshape_0_-1")
    _set_dims(model.graph.input[0], [-1, 3, -1, -1])       # paddle leaves H and W open too
    layout = BatchLayout.of(model, {"x": PADDLE_SHAPE})
    assert layout.axes == {"x": 0} and layout.free
    batches = Calibration(samples=20, batch=8).batches(model, {"x": PADDLE_SHAPE})
    assert [b["x"].shape for b in batches] == [(8, 3, 48, 192), (8, 3, 48, 192), (4, 3, 48, 192)]
    data = {"x": np.zeros((5, 3, 48, 96), np.float32)}        # another width: H/W are open
    batches = Calibration(data, batch=4).batches(model, {"x": PADDLE_SHAPE})
    assert [b["x"].shape[0] for b in batches] == [4, 1]


# ---- If + LSTM (Silero-VAD-like) ------------------------------------------------------------

H = 8


def _branch(name: str, a: str, rng, lstm: bool) -> onnx.GraphProto:
    """Conv on the outer-scope tensor ``a``, mean over time, then (``lstm``) one LSTM step from
    the outer-scope state; outputs the hidden features and the new state."""
    def w(suffix, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), f"{name}_{suffix}")

    inits = [w("conv", H, 8, 3), numpy_helper.from_array(np.array([2], np.int64), f"{name}_time"),
             numpy_helper.from_array(np.array([0], np.int64), f"{name}_zero")]
    nodes = [helper.make_node("Conv", [a, f"{name}_conv"], [f"{name}_c"], name=f"{name}_conv", pads=[1, 1]),
             helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu"),
             helper.make_node("ReduceMean", [f"{name}_r", f"{name}_time"], [f"{name}_f"], keepdims=0,
                              name=f"{name}_mean")]
    if lstm:
        inits += [w("W", 1, 4 * H, H), w("R", 1, 4 * H, H), w("B", 1, 8 * H)]
        nodes += [helper.make_node("Split", ["state"], [f"{name}_h0", f"{name}_c0"], axis=0, name=f"{name}_split",
                                   num_outputs=2),
                  helper.make_node("Unsqueeze", [f"{name}_f", f"{name}_zero"], [f"{name}_seq"], name=f"{name}_unsq"),
                  helper.make_node("LSTM", [f"{name}_seq", f"{name}_W", f"{name}_R", f"{name}_B", "",
                                            f"{name}_h0", f"{name}_c0"],
                                   [f"{name}_y", f"{name}_h", f"{name}_cn"], hidden_size=H, name=f"{name}_lstm"),
                  helper.make_node("Squeeze", [f"{name}_h", f"{name}_zero"], [f"{name}_out"], name=f"{name}_sq"),
                  helper.make_node("Concat", [f"{name}_h", f"{name}_cn"], [f"{name}_state"], axis=0,
                                   name=f"{name}_cat")]
    else:  # the 8 kHz branch: no recurrence, the state passes through
        nodes += [helper.make_node("Identity", [f"{name}_f"], [f"{name}_out"], name=f"{name}_id"),
                  helper.make_node("Identity", ["state"], [f"{name}_state"], name=f"{name}_keep")]
    outs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{name}_state", TensorProto.FLOAT, None)]
    return helper.make_graph(nodes, name, [], outs, inits)


def vad(state_batch="N") -> onnx.ModelProto:
    """input [N, 64], state [2, N, H] (or a static [2, 1, H]), sr: int64 scalar.
    Conv stem -> If(sr == 16000){Conv + LSTM}{Conv} -> MLP head; outputs (prob, new state)."""
    g = Graph(opset=18)
    x = g.input(["N", 64], "input")
    g.input([2, state_batch, H], "state")
    sr = g.input([], "sr", TensorProto.INT64)
    u = g.op("Unsqueeze", [x, g.const(np.array([1], np.int64))])
    a = g.op("Relu", [g.conv(u, 1, 8, k=3, dims=1)])    # prunable: only main-graph readers
    a = g.op("Relu", [g.conv(a, 8, 8, k=3, dims=1)])    # read inside the If: must stay whole
    cond = g.op("Equal", [sr, g.const(np.array(16000, np.int64))])
    g.nodes.append(helper.make_node("If", [cond], ["feat", "new_state"], name="if_16k",
                                    then_branch=_branch("k16", a, g.rng, lstm=True),
                                    else_branch=_branch("k8", a, g.rng, lstm=False)))
    z = g.op("Relu", [g.op("Add", [g.op("MatMul", ["feat", g.weight(H, 16)]), g.weight(16)])])  # prunable
    g.output(g.op("Sigmoid", [g.op("MatMul", [z, g.weight(16, 1)])]))
    g.output("new_state")
    return g.model()


def _vad_calib(n=12, state_axis=1):
    rng = np.random.default_rng(1)
    state = rng.standard_normal((2, n, H)) * 0.1 if state_axis == 1 else np.zeros((2, 1, H))
    return {"input": rng.standard_normal((n, 64)).astype(np.float32),
            "sr": np.full(n, 16000, np.int64),          # one sample rate per sample
            "state": state.astype(np.float32)}


def _branch_weights(model) -> dict:
    """The If branches' conv weights as pruned: {name: shape} (normalize moves a body's
    initializers to the main graph, where the rewrite slices them)."""
    return {t.name: tuple(t.dims) for t in model.graph.initializer if t.name in ("k16_conv", "k8_conv")}


@pytest.mark.parametrize("criterion,calib", [("l1", False), ("obspa", False), ("obspa", True),
                                             ("activation", True)])
def test_if_with_lstm_prunes(criterion, calib):
    model = vad()
    shapes = {"input": (1, 64), "state": (2, 1, H), "sr": ()}
    r = assert_prunes(model, criterion=criterion, calib=_vad_calib() if calib else None, input_shapes=shapes)
    removed = sorted(g["removed"] for g in r.report["groups"] if g["removed"])
    # conv stem 8 -> 4, MLP 16 -> 8; the conv read inside the If 8 -> 4 (both branches'
    # convs lose the same input channels), the 16 kHz branch's conv 8 -> 4 (the LSTM's input);
    # the 8 kHz conv's channels are the If's output, joined with the LSTM state: whole
    assert removed == [4, 4, 4, 8]
    assert _branch_weights(r.model) == {"k16_conv": (4, 4, 3), "k8_conv": (8, 4, 3)}
    if criterion == "obspa" and calib:
        # the 3 held-out samples ran through the If; the synthetic inputs feed sr the 16000 it is
        # compared with, as the data does, so both uses of the data come out alike (0.279 here)
        held_out = r.report["data"]["held_out"]
        assert held_out["held_out_samples"] == 3
        assert abs(held_out["relative_error"]["refit"] - held_out["relative_error"]["data-free"]) < 0.01
        assert r.report["data"]["samples"] == (64 if held_out["chosen"] == "data-free" else 12)
    elif criterion != "l1":
        assert r.report["data"]["samples"] == (12 if calib else 64)


def test_if_with_static_state_feeds_analysed_shapes():
    """A state declared [2, 1, H] fixes the batch at 1: every batch has the analysed shapes."""
    model = vad(state_batch=1)
    shapes = {"input": (1, 64), "state": (2, 1, H), "sr": ()}
    layout = BatchLayout.of(model, shapes)
    assert layout.axes == {"input": 0, "state": None, "sr": None} and not layout.free
    batches = Calibration(samples=5).batches(model, shapes)
    assert len(batches) == 5 and batches[0]["sr"].shape == () and batches[0]["state"].shape == (2, 1, H)
    for calib in (None, _vad_calib(state_axis=None)):
        r = assert_prunes(model, criterion="obspa", calib=calib, input_shapes=shapes)
        assert _branch_weights(r.model) == {"k16_conv": (4, 4, 3), "k8_conv": (8, 4, 3)}


def test_state_batch_axis_follows_its_name():
    model = vad()
    layout = BatchLayout.of(model, {"input": (1, 64), "state": (2, 1, H), "sr": ()})
    assert layout.axes == {"input": 0, "state": 1, "sr": None} and layout.free
    b = Calibration(samples=6, batch=4).batches(model, {"input": (1, 64), "state": (2, 1, H), "sr": ()})
    assert [(f["input"].shape, f["state"].shape, f["sr"].shape) for f in b] == [
        ((4, 64), (2, 4, H), ()), ((2, 64), (2, 2, H), ())]
    with pytest.raises(spa.SpaError, match="per-sample shape"):
        Calibration({**_vad_calib(), "state": np.zeros((12, 2, H), np.float32)}).batches(
            model, {"input": (1, 64), "state": (2, 1, H), "sr": ()})


def test_consumers_inside_subgraphs_are_left_out():
    """A contraction naming a node of an If body gets no statistics consumer: onnxruntime
    cannot fetch tensors that live inside a subgraph."""
    model = vad()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    specs = consumer_specs(model, [("k16_conv", 0, 1), (conv.name, 0, 1)])
    assert list(specs) == [conv.name]


def test_weight_read_inside_if_gets_its_own_copy():
    """Exporters keep a branch's weights in the main graph and read them by name from the
    body: such an initializer, shared here with a main-graph Conv, is copied per reader
    (``normalize``), so each prunes with its own layer and neither ties the other."""
    model = vad()
    conv2 = [n for n in model.graph.node if n.op_type == "Conv"][1]
    body = next(a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "else_branch")
    del body.initializer[0]
    body.node[0].input[1] = conv2.input[1]
    onnx.checker.check_model(model, full_check=True)
    shapes = {"input": (1, 64), "state": (2, 1, H), "sr": ()}
    for criterion, calib in [("l1", None), ("obspa", None), ("obspa", _vad_calib())]:
        r = assert_prunes(model, criterion=criterion, calib=calib, input_shapes=shapes)
        inits = {t.name: tuple(t.dims) for t in r.model.graph.initializer}
        assert inits[conv2.input[1]] == (4, 4, 3)                 # the main conv: 8 -> 4 outputs
        assert inits[conv2.input[1] + "__use1"] == (8, 4, 3)      # the 8 kHz branch's copy


# ---- Silero VAD as shipped: nothing named, sample rate chosen by value ---------------------


def _frames_branch(name: str, u: str, rng, frame: int) -> onnx.GraphProto:
    """Frames of ``frame`` samples (a strided Conv on the outer-scope [N, 1, L] signal, an
    STFT's shape), mean over time, one LSTM step from the outer-scope state [2, N, H]: runs
    only when L >= ``frame`` and the state's batch is the signal's."""
    def w(suffix, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), f"{name}_{suffix}")

    inits = [w("conv", H, 1, frame), w("W", 1, 4 * H, H), w("R", 1, 4 * H, H), w("B", 1, 8 * H),
             numpy_helper.from_array(np.array([2], np.int64), f"{name}_time"),
             numpy_helper.from_array(np.array([0], np.int64), f"{name}_zero")]
    nodes = [helper.make_node("Conv", [u, f"{name}_conv"], [f"{name}_c"], strides=[frame // 2], name=f"{name}_stft"),
             helper.make_node("ReduceMean", [f"{name}_c", f"{name}_time"], [f"{name}_f"], keepdims=0,
                              name=f"{name}_mean"),
             helper.make_node("Split", ["state"], [f"{name}_h0", f"{name}_c0"], axis=0, num_outputs=2,
                              name=f"{name}_split"),
             helper.make_node("Unsqueeze", [f"{name}_f", f"{name}_zero"], [f"{name}_seq"], name=f"{name}_unsq"),
             helper.make_node("LSTM", [f"{name}_seq", f"{name}_W", f"{name}_R", f"{name}_B", "", f"{name}_h0",
                                       f"{name}_c0"], [f"{name}_y", f"{name}_h", f"{name}_cn"], hidden_size=H,
                              name=f"{name}_lstm"),
             helper.make_node("Squeeze", [f"{name}_h", f"{name}_zero"], [f"{name}_out"], name=f"{name}_sq"),
             helper.make_node("Concat", [f"{name}_h", f"{name}_cn"], [f"{name}_state"], axis=0, name=f"{name}_cat")]
    outs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{name}_state", TensorProto.FLOAT, None)]
    return helper.make_graph(nodes, name, [], outs, inits)


def shipped_vad() -> onnx.ModelProto:
    """The silero-vad package's file: input [?, ?] and state [2, ?, H] with no dim names (so
    nothing ties the state's batch to the input's), sr an int64 scalar compared with 16000 to
    choose a 16 kHz branch (frames of 256) or an 8 kHz one (frames of 128); an MLP head."""
    g = Graph(opset=18)
    x = g.input([None, None], "input")
    g.input([2, None, H], "state")
    sr = g.input([], "sr", TensorProto.INT64)
    u = g.op("Unsqueeze", [x, g.const(np.array([1], np.int64))])
    cond = g.op("Equal", [sr, g.const(np.array(16000, np.int64))])
    g.nodes.append(helper.make_node("If", [cond], ["feat", "new_state"], name="if_16k",
                                    then_branch=_frames_branch("k16", u, g.rng, 256),
                                    else_branch=_frames_branch("k8", u, g.rng, 128)))
    z = g.op("Relu", [g.op("Add", [g.op("MatMul", ["feat", g.weight(H, 16)]), g.weight(16)])])  # prunable
    g.output(g.op("Sigmoid", [g.op("MatMul", [z, g.weight(16, 1)])]))
    g.output("new_state")
    return g.model()


@pytest.mark.parametrize("criterion", ["l1", "obspa"])
def test_shipped_vad_probes_itself(criterion):
    """No --input-shape: the candidates alone never ran it (the state's batch got 16, 128, ...
    beside the input's batch 1, and sr a random 0 or 1). The state's first open dim is tried
    at the batch size, sr is fed the 16000 it is compared with: the 16 kHz branch runs at 256
    samples, and the oracle and the data-free statistics feed the same."""
    model = shipped_vad()
    r = assert_prunes(model, criterion=criterion)
    rep = r.report
    assert rep["input_shapes"] == {"input": [1, 256], "state": [2, 1, H], "sr": []}
    probe = rep["probe"]
    assert probe["inputs"]["state"][1] == {"dim": "state[1]", "size": 1, "from": "batch"}
    assert probe["values"] == {"sr": 16000}
    assert probe["second"] == {"inputs": {"input": {1: {"dim": "input[1]", "size": 512}}}}  # the batch stays 1
    # the MLP 16 -> 8, and each branch's framing conv 8 -> 4 (the LSTM's input)
    assert sorted(g["removed"] for g in rep["groups"] if g["removed"]) == [4, 4, 8]
    assert rep["verify"]["branch_values"] == {"sr": [16001]}      # the 8 kHz branch checked too
    batches = Calibration(samples=3).batches(model, {"input": (1, 256), "state": (2, 1, H), "sr": ()})
    assert all(b["sr"] == 16000 and b["state"].shape == (2, 1, H) for b in batches)
    describe = spa.loading.probe.describe(probe)
    assert "state[1]=1 (batch)" in describe and "sr=16000" in describe


def test_shipped_vad_with_the_input_fixed():
    """--input-shape fixes the input only: the state's batch is still tried at 1, and as no
    other dim was chosen there is no second probe."""
    r = assert_prunes(shipped_vad(), criterion="l1", input_shapes={"input": (1, 512)})
    assert r.report["input_shapes"]["state"] == [2, 1, H]
    assert "batch sizes" in r.report["probe"]["second"]["skipped"]


def test_compared_values_only_for_integer_scalars():
    """A scalar compared with a constant (an initializer or a Constant node, either side) takes
    that constant; token ids compared with a pad id keep random ids."""
    from spa.loading.shapes import compared_values, random_inputs
    g = Graph()
    ids = g.input(["N", "S"], "ids", TensorProto.INT64)
    mode = g.input([1], "mode", TensorProto.INT32)
    g.nodes.append(helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(np.array(3, np.int32))))
    pad = g.op("Cast", [g.op("Equal", [ids, g.const(np.array(0, np.int64))])], to=TensorProto.FLOAT)
    big = g.op("Cast", [g.op("Greater", ["three", mode])], to=TensorProto.FLOAT)
    g.output(g.op("Mul", [pad, big]))
    model = g.model()
    assert compared_values(model) == {"mode": 3}
    feeds = random_inputs(model, {"ids": (2, 5), "mode": (1,)}, np.random.default_rng(0))
    assert feeds["mode"].tolist() == [3] and feeds["mode"].dtype == np.int32
