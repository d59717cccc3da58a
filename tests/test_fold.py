"""Weights normalized at run time (weight standardization, weight normalization) are computed
once, so the layers that read them prune like plain convs; quantized, cast or grown weights
stay as they are."""

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph, assert_prunes
from spa.loading.fold import fold_normalized_weights
from spa.runtime import session


def _standardized(g: Graph, c_in, c_out, how: str):
    """A conv weight standardized per output channel over its inputs, computed in the graph."""
    w = g.weight(c_out, c_in, 3, 3)
    if how == "reduce":                    # (w - mean) / sqrt(var + eps), as legacy exports write it
        mean = g.op("ReduceMean", [w], axes=[1, 2, 3], keepdims=1)
        centred = g.op("Sub", [w, mean])
        var = g.op("ReduceMean", [g.op("Mul", [centred, centred])], axes=[1, 2, 3], keepdims=1)
        return g.op("Div", [centred, g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(1e-5))])])])
    # timm's StdConv2d: batch_norm(w.reshape(1, out, -1), training=True).reshape_as(w)
    flat = g.op("Reshape", [w, g.const(np.array([1, c_out, -1], np.int64))])
    zeros, ones = g.const(np.zeros(c_out, np.float32)), g.const(np.ones(c_out, np.float32))
    y, _, _ = g.op("BatchNormalization", [flat, ones, zeros, zeros, ones], n_out=3, training_mode=1, epsilon=1e-6)
    return g.op("Reshape", [y, g.const(np.array([c_out, c_in, 3, 3], np.int64))])


def std_cnn(how: str):
    g = Graph(seed=4)
    y = g.input(["N", 3, 8, 8])
    for c_in, c_out in ((3, 16), (16, 16), (16, 16)):
        y = g.op("Relu", [g.op("Conv", [y, _standardized(g, c_in, c_out, how), g.weight(c_out)], pads=[1] * 4)])
    g.output(g.op("Gemm", [g.op("Flatten", [g.op("GlobalAveragePool", [y])]), g.weight(5, 16)], transB=1))
    return g.model(check=how == "reduce")


@pytest.mark.parametrize("how", ["reduce", "batchnorm"])
def test_standardized_weights_are_computed_once_and_prune(how, monkeypatch):
    model = std_cnn(how)
    r = assert_prunes(model, ratio=0.5, criterion="l1")
    assert sum(g["removed"] for g in r.report["groups"]) >= 16
    import spa.analysis
    with monkeypatch.context() as m:      # recomputed in the graph, the standardization mixes inputs
        m.setattr(spa.analysis, "fold_normalized_weights", lambda model: [])
        unfolded = spa.prune(model, ratio=0.5, criterion="l1", round_to=1).report
    assert sum(g["removed"] for g in unfolded["groups"]) < sum(g["removed"] for g in r.report["groups"])
    convs = [n for n in r.model.graph.node if n.op_type == "Conv"]
    inits = {t.name for t in r.model.graph.initializer}
    assert all(c.input[1] in inits for c in convs)
    assert not any(n.op_type in ("ReduceMean", "BatchNormalization") for n in r.model.graph.node)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert len(fold_normalized_weights(folded)) == 3
    np.testing.assert_allclose(session(folded).run(None, {"x": x})[0], session(model).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_quantized_cast_and_grown_weights_stay_computed():
    """A dequantized weight, a float16 weight cast up, and a standardization whose chain would
    allocate far more than its weights (an Expand to a declared large shape) are left alone."""
    g = Graph(seed=5)
    x = g.input(["N", 4, 8, 8])
    q = g.op("DequantizeLinear", [g.const(np.ones((4, 4, 3, 3), np.int8)), g.const(np.float32(0.1))])
    y = g.op("Conv", [x, q], pads=[1] * 4)
    half = g.const((np.ones((4, 4, 3, 3)) * 0.1).astype(np.float16))
    y = g.op("Conv", [y, g.op("Cast", [half], to=onnx.TensorProto.FLOAT)], pads=[1] * 4)
    big = g.op("Expand", [g.weight(4, 4, 3, 3), g.const(np.array([4096, 4, 4, 3, 3], np.int64))])
    w = g.op("ReduceMean", [big], axes=[0], keepdims=0)
    g.output(g.op("Conv", [y, w], pads=[1] * 4))
    model = g.model()
    before = model.SerializeToString()
    assert fold_normalized_weights(model) == []
    assert model.SerializeToString() == before


@pytest.mark.parametrize("dynamo", [False, True])
def test_timm_scaled_std_conv_prunes_from_either_exporter(dynamo, tmp_path):
    """timm's ScaledStdConv2d / StdConv2d (NF-ResNets) exported by torch: the legacy exporter
    writes the standardization as graph nodes, the dynamo exporter folds it; both prune alike."""
    torch = pytest.importorskip("torch")
    import torchvision_zoo  # noqa: F401  (defines torchvision's ops before timm imports it)
    layers = pytest.importorskip("timm.layers")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = layers.ScaledStdConv2d(3, 16, 3, padding=1)
            self.b = layers.StdConv2d(16, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))

    torch.manual_seed(0)
    path = tmp_path / "nf.onnx"
    kw = dict(external_data=False) if dynamo else dict(dynamo=False, opset_version=17)
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8),), str(path), **kw)
    r = assert_prunes(onnx.load(str(path)), ratio=0.5, criterion="l1")
    assert r.report["after"]["macs"] < 0.4 * r.report["before"]["macs"]


def test_bias_written_by_a_scatter_is_computed_once():
    """swin v2's ``qkv_bias[C:2C].zero_()``, as the legacy exporter writes it: a ScatterND of
    zeros into the bias on every run. Computed once, the bias is a plain initializer and the
    projection's channels prune."""
    g = Graph(seed=2)
    x = g.input([1, 4, 6])
    shape = g.op("Identity", [g.const(np.array([4], np.int64))])    # sizes behind Identity: not inferred
    zeros = g.op("Reshape", [g.op("Expand", [g.const(np.float32(0)), shape]), g.op("Identity", [shape])])
    bias = g.op("ScatterND", [g.op("Identity", [g.weight(12)]), g.const(np.arange(4, 8, dtype=np.int64)[:, None]),
                              zeros])
    h = g.op("Relu", [g.op("Add", [bias, g.op("MatMul", [x, g.weight(6, 12)])])])
    g.output(g.op("MatMul", [h, g.weight(12, 3)]))
    model = g.model()
    r = assert_prunes(model)
    assert not any(n.op_type == "ScatterND" for n in r.model.graph.node)


def _matmul_chain(nodes, inits, value_info=()):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes + [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                                               inits, value_info=list(value_info)),
                             opset_imports=[helper.make_opsetid("", 18)])


def test_fold_trusts_no_declared_shape_and_survives_a_bad_expand():
    """A value_info claiming a 3000 x 3000 fill is 1 x 1 does not get it computed; an Expand
    that cannot broadcast leaves the chain as it is (no traceback)."""
    from onnx import TensorProto, helper, numpy_helper
    fill = [numpy_helper.from_array(np.array([3000, 3000], np.int64), "shape"),
            numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("ReduceSum", ["big", "axes"], ["w0"], keepdims=1),
             helper.make_node("Slice", ["w0", "starts", "ends", "axes"], ["w"])]
    fill += [numpy_helper.from_array(np.array([0], np.int64), "starts"),
             numpy_helper.from_array(np.array([3], np.int64), "ends")]
    lie = [helper.make_tensor_value_info("big", TensorProto.FLOAT, [1, 1])]
    assert fold_normalized_weights(_matmul_chain(nodes, fill, lie)) == []
    bad = [numpy_helper.from_array(np.ones((3, 4), np.float32), "w0"),
           numpy_helper.from_array(np.array([5, 4], np.int64), "shape"),
           numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("Identity", ["shape"], ["shape_id"]),
             helper.make_node("Expand", ["w0", "shape_id"], ["we"]),
             helper.make_node("ReduceMean", ["we", "axes"], ["m"], keepdims=1),
             helper.make_node("Sub", ["we", "m"], ["w"])]
    model = _matmul_chain(nodes, bad)
    assert fold_normalized_weights(model) == [] and len(model.graph.node) == 5
    spa.analyze(_matmul_chain(nodes, bad))


def test_fold_leaves_the_rest_of_the_graph_alone():
    """Only the folded chain's nodes and sources go: an input's default initializer that
    nothing reads stays, and the pruned model lists that input again."""
    from onnx import TensorProto, helper, numpy_helper
    model = std_cnn("reduce")
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "temperature"))
    model.graph.input.append(helper.make_tensor_value_info("temperature", TensorProto.FLOAT, []))
    r = spa.prune(model, ratio=0.5, criterion="l1", round_to=1, verify=True)
    assert r.report["verify"]["ok"] and [i.name for i in r.model.graph.input] == ["x", "temperature"]
