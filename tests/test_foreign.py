"""Graphs from other tools: QDQ-quantized models, onnxruntime-optimized graphs, recurrent
and integer ops (blocked cleanly)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import spa
from graphs import Graph, assert_prunes


def qdq_model(per_channel: bool):
    """x -> Q/DQ -> Conv(DQ(int8 W)) -> Relu -> Q/DQ -> Conv(DQ(int8 W)) -> out."""
    g = Graph(opset=13)
    x = g.input([1, 3, 8, 8])

    def qconv(inp, c_in, c_out):
        q = g.op("QuantizeLinear", [inp, g.const(np.float32(0.05)), g.const(np.uint8(128))])
        a = g.op("DequantizeLinear", [q, g.const(np.float32(0.05)), g.const(np.uint8(128))])
        w = g.rng.integers(-100, 100, (c_out, c_in, 3, 3)).astype(np.int8)
        if per_channel:
            scale = g.const((g.rng.random(c_out) * 0.01 + 0.001).astype(np.float32))
            zp = g.const(np.zeros(c_out, np.int8))
            wd = g.op("DequantizeLinear", [g.const(w), scale, zp], axis=0)
        else:
            wd = g.op("DequantizeLinear", [g.const(w), g.const(np.float32(0.01)), g.const(np.int8(0))])
        return g.op("Conv", [a, wd, g.weight(c_out)], pads=[1, 1, 1, 1])

    y = g.op("Relu", [qconv(x, 3, 16)])
    g.output(qconv(y, 16, 4))
    return g.model()


@pytest.mark.parametrize("per_channel", [True, False])
def test_qdq_model_prunes_through_quantization(per_channel):
    r = assert_prunes(qdq_model(per_channel), criterion="l1")
    ints = [t for t in r.model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 4]
    assert sorted(t.dims[0] for t in ints) == [4, 8] and sorted(t.dims[1] for t in ints) == [3, 8]


def test_onnxruntime_optimized_graph(tmp_path):
    """FusedConv / FusedGemm from onnxruntime's extended optimizations."""
    import onnxruntime as ort
    g = Graph()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    y = g.op("Relu", [g.conv(y, 16, 16)])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [y])])
    h = g.op("Relu", [g.op("Gemm", [f, g.weight(32, 16), g.weight(32)], transB=1)])
    g.output(g.op("Gemm", [h, g.weight(5, 32), g.weight(5)], transB=1))
    src, opt = tmp_path / "m.onnx", tmp_path / "opt.onnx"
    onnx.save(g.model(), src)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(opt).graph.node}
    assert "FusedConv" in ops
    r = spa.prune(opt, ratio=0.5, round_to=1, verify=True)
    assert r.report["verify"]["ok"] and not r.report["blocked_nodes"]
    assert r.report["after"]["macs"] < 0.5 * r.report["before"]["macs"]


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_ops_block_cleanly(op):
    g = Graph()
    x = g.input([5, 1, 4])
    h = g.op("Relu", [g.op("MatMul", [x, g.weight(4, 8)])])
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    outs = g.op(op, [h, g.weight(1, gates * 6, 8), g.weight(1, gates * 6, 6)], n_out=2, hidden_size=6)
    g.output(outs[0])
    r = spa.prune(g.model(), ratio=0.5, round_to=1, verify=True)
    assert any(op in b["reason"] for b in r.report["blocked_nodes"])
    assert r.report["verify"]["ok"]


def test_integer_ops_block_cleanly():
    g = Graph(opset=13)
    x = g.input([1, 3, 8, 8])
    q = g.op("QuantizeLinear", [x, g.const(np.float32(0.05)), g.const(np.uint8(128))])
    w = g.const(np.ones((8, 3, 3, 3), np.uint8))
    y = g.op("ConvInteger", [q, w, g.const(np.uint8(128))])
    g.output(g.op("Cast", [y], to=1))
    r = spa.prune(g.model(), ratio=0.5, verify=True)
    assert any("ConvInteger" in b["reason"] for b in r.report["blocked_nodes"])
    assert r.report["after"]["params"] == r.report["before"]["params"]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_yolo_style_detector_body_pruned_output_layout_kept(tmp_path, exporter):
    pytest.importorskip("torch")
    import yolo_like
    path = yolo_like.export(tmp_path / f"yolo-{exporter}.onnx", exporter)
    r = spa.prune(path, ratio=0.5, round_to=1, verify=True)
    rep = r.report
    assert rep["verify"]["ok"]
    assert rep["after"]["macs"] < 0.5 * rep["before"]["macs"]
    original = onnx.load(path)
    sig = lambda m: [(o.name, [d.dim_value for d in o.type.tensor_type.shape.dim]) for o in m.graph.output]  # noqa: E731
    assert sig(r.model) == sig(original)


def test_intermediate_output_also_consumed_inside_and_two_inputs():
    g = Graph()
    x = g.input([1, 3, 8, 8])
    z = g.input([1, 16, 8, 8], name="z")
    a = g.op("Relu", [g.conv(x, 3, 16)])
    feat = g.output(g.op("Add", [a, z]))               # an output that the graph reads on
    b = g.op("Relu", [g.conv(feat, 16, 16)])
    g.output(g.conv(b, 16, 4))
    r = assert_prunes(g.model())
    kept = [grp for grp in r.report["groups"] if grp["removed"]]
    assert all("w1[0]" not in grp["members"] for grp in kept)   # the output's channels stay


def test_onnx_attention_op_blocks_with_reason():
    """The ONNX Attention op (opset 23) hides heads in attributes: blocked, clearly."""
    g = Graph(opset=23)
    x = g.input([1, 4, 8])
    q, k, v = (g.op("MatMul", [x, g.weight(8, 8)]) for _ in range(3))
    att = g.op("Attention", [q, k, v], q_num_heads=2, kv_num_heads=2)
    h = g.op("Relu", [g.op("MatMul", [att, g.weight(8, 16)])])
    g.output(g.op("MatMul", [h, g.weight(16, 3)]))
    r = spa.prune(g.model(ir_version=10), ratio=0.5, round_to=1, verify=True)
    assert any("Attention" in b["reason"] for b in r.report["blocked_nodes"])
    assert r.report["verify"]["ok"] and r.report["after"]["params"] < r.report["before"]["params"]


def test_onnxruntime_transformer_optimizer_graph(tmp_path, zoo_dir):
    """com.microsoft ops from the transformer optimizer (on the dynamo export it fuses the
    skip-norms and Gelu, not attention): those with a rule (spa/graph/rules/fused.py) do not
    block, any other is blocked by name, nothing breaks. tests/test_fused.py prunes heads and
    MLP through fused Attention on the optimizer's output of a dynamic-shape export."""
    from spa.graph.rules import RULES
    tfzoo = pytest.importorskip("transformers_zoo")
    from onnxruntime.transformers import optimizer
    path = tfzoo.export("bert", "dynamo", zoo_dir)
    opt = optimizer.optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=64)
    out = tmp_path / "bert-opt.onnx"
    opt.save_model_to_file(str(out))
    ops = {n.op_type for n in onnx.load(out).graph.node if n.domain == "com.microsoft"}
    assert "SkipLayerNormalization" in ops
    r = spa.prune(out, ratio=0.5, round_to=1, verify=True)
    assert r.report["verify"].get("ok", True)
    reasons = " ".join(b["reason"] for b in r.report["blocked_nodes"])
    for op in ops:
        assert (f"com.microsoft.{op}" in reasons) == (f"com.microsoft.{op}" not in RULES), op


def test_optimized_bert_that_onnxruntime_cannot_load_by_default(tmp_path, zoo_dir):
    """The legacy exporter's BERT after onnxruntime's optimizer: this onnxruntime's default
    session refuses it ("Attempt to replace the existing tensor"). spa must never call a model
    verified that users' default sessions cannot load."""
    import onnxruntime as ort
    tfzoo = pytest.importorskip("transformers_zoo")
    from onnxruntime.transformers import optimizer
    path = tfzoo.export("bert", "legacy", zoo_dir)
    opt = optimizer.optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=64)
    src = tmp_path / "bert-opt.onnx"
    opt.save_model_to_file(str(src))
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        original_loads = True
    except Exception:
        original_loads = False
    if not original_loads:
        with pytest.raises(spa.VerificationError, match="only without graph optimizations"):
            spa.prune(src, ratio=0.3)
        return
    out = spa.prune(src, ratio=0.3).save(tmp_path / "p.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
