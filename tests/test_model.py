"""Loading and normalization: Constant-node weights, shared initializers, external data, opsets."""

import numpy as np
import onnx
import pytest
from onnx import helper

import spa
from graphs import Graph, assert_prunes


def test_weights_in_constant_nodes_are_pruned():
    """Paddle and tf2onnx keep weights in Constant nodes."""
    g = Graph()
    x = g.input([1, 3, 6, 6])
    y = g.op("Relu", [g.conv(x, 3, 8)])
    g.output(g.conv(y, 8, 4))
    model = g.model()
    graph = model.graph
    constants = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
                 for t in graph.initializer]
    nodes = constants + list(graph.node)
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    r = assert_prunes(model)
    assert not any(n.op_type == "Constant" for n in r.model.graph.node)


def test_shared_initializer_does_not_tie_unrelated_layers():
    g = Graph()
    x = g.input([1, 3, 6, 6])
    a = g.op("Relu", [g.conv(x, 3, 8)])
    b = g.op("Relu", [g.conv(x, 3, 8)])
    ones = g.const(np.ones((8, 1, 1), np.float32), "ones")
    a = g.op("Mul", [a, ones])
    b = g.op("Mul", [b, ones])   # same initializer, unrelated branch
    g.output(g.conv(a, 8, 2))
    g.output(g.conv(b, 8, 2))
    model = g.model()
    analysis = spa.analyze(model)
    assert sorted(grp.size for grp in analysis.groups) == [8, 8]
    assert_prunes(model)


def test_identity_nodes_pass_channels():
    g = Graph()
    x = g.input([1, 3, 6, 6])
    y = g.op("Identity", [g.op("Relu", [g.conv(x, 3, 8)])])
    g.output(g.conv(y, 8, 4))
    assert_prunes(g.model())


def test_external_data_model(tmp_path):
    g = Graph()
    x = g.input([1, 3, 6, 6])
    y = g.op("Relu", [g.conv(x, 3, 64)])
    g.output(g.conv(y, 64, 4))
    path = tmp_path / "ext.onnx"
    onnx.save(g.model(), path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    assert (tmp_path / "ext.bin").exists()
    r = spa.prune(path, ratio=0.5, verify=True)
    assert r.report["verify"]["ok"]
    out = r.save(tmp_path / "out.onnx")
    assert onnx.load(out).graph.initializer[0].dims[0] == 32


def _with_initializers_as_inputs(ir_version):
    g = Graph()
    x = g.input([1, 3, 6, 6])
    y = g.op("Relu", [g.conv(x, 3, 8)])
    g.output(g.conv(y, 8, 4))
    model = g.model()
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model.ir_version = ir_version
    return model


def test_initializers_listed_as_inputs():
    """Old exporters (IR < 4) list every initializer as a graph input too: they are weights."""
    r = assert_prunes(_with_initializers_as_inputs(3))
    assert [i.name for i in r.model.graph.input] == ["x"]


def test_inputs_with_default_initializers_stay_inputs():
    """From IR 4 on, an input with an initializer is an overridable default: it stays an
    input of the pruned model, declared with the shape of its sliced value."""
    model = _with_initializers_as_inputs(8)
    r = assert_prunes(model)
    names = [i.name for i in model.graph.input]
    assert [i.name for i in r.model.graph.input] == names
    inits = {t.name: list(t.dims) for t in r.model.graph.initializer}
    for vi in r.model.graph.input[1:]:
        assert [d.dim_value for d in vi.type.tensor_type.shape.dim] == inits[vi.name]
    assert inits[names[1]][0] < 8  # the first conv's filters were pruned
    import onnxruntime as ort
    sess = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert len(sess.get_inputs()) + len(sess.get_overridable_initializers()) == len(names)


def test_python_api_does_not_touch_the_callers_model():
    g = Graph()
    x = g.input([1, 3, 6, 6])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 4))
    model = g.model()
    before = model.SerializeToString()
    spa.prune(model, ratio=0.5, verify=False)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_legacy_torch_export_at_old_opsets(tmp_path, opset):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(16)
            self.b = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.c = torch.nn.Conv2d(32, 8, 1)
            self.fc = torch.nn.Linear(8 * 4 * 4, 5)

        def forward(self, x):
            y = torch.relu(self.bn(self.a(x)))
            z = torch.cat([y, self.b(y)], 1)
            z = torch.nn.functional.interpolate(z, scale_factor=2.0, mode="nearest")
            z = torch.nn.functional.max_pool2d(self.c(z), 4)
            return self.fc(z.view(z.size(0), -1))

    torch.manual_seed(0)
    path = tmp_path / f"net{opset}.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 8, 8), str(path), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    r = assert_prunes(str(path), criterion="l1")
    assert not r.report["blocked_nodes"]


def test_tensor_read_inside_if_branch_is_pruned_through_both_branches():
    """Subgraphs read outer tensors by name: the same channels as outside. The If's output
    joins its branches' outputs (Identity and Neg of b, both named "branch_out": normalize
    renames one), so b's channels go from both."""
    g = Graph()
    x = g.input([1, 3, 6, 6])
    a = g.op("Relu", [g.conv(x, 3, 8)])
    b = g.op("Relu", [g.conv(a, 8, 8)])
    out_t = helper.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, None)
    then_g = helper.make_graph([helper.make_node("Identity", [b], ["branch_out"])], "then", [], [out_t])
    else_g = helper.make_graph([helper.make_node("Neg", [b], ["branch_out"])], "else", [], [out_t])
    cond = g.const(np.array(True))
    y = g.op("If", [cond], then_branch=then_g, else_branch=else_g)
    g.output(g.conv(y, 8, 2))
    model = g.model()
    r = assert_prunes(model, criterion="l1")
    assert sorted(g["removed"] for g in r.report["groups"]) == [4, 4]
    assert not r.report["blocked_nodes"]


def test_external_data_stays_on_disk_and_is_streamed_out(tmp_path, monkeypatch):
    """Weights in an external file are read one tensor at a time; a pruned model that is
    still large is written with its weights streamed to <name>.data."""
    import spa.loading.saving
    g = Graph()
    x = g.input([1, 64])
    h = g.op("Relu", [g.op("MatMul", [x, g.weight(64, 256)])])
    g.output(g.op("MatMul", [h, g.weight(256, 8)]))
    src = tmp_path / "ext.onnx"
    onnx.save(g.model(), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    model = spa.load(src)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    monkeypatch.setattr(spa.loading.saving, "EXTERNAL_ABOVE", 1000)   # treat this model as a big one
    r = spa.prune(src, ratio=0.5, round_to=1, verify=True)
    assert r.report["verify"]["ok"]
    out = r.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists() and not list(tmp_path.glob(".*.tmp"))
    pruned = onnx.load(out)
    dims = sorted(tuple(t.dims) for t in pruned.graph.initializer)
    assert dims == [(64, 128), (128, 8)]
    assert r.report["after"]["file_bytes"] > (tmp_path / "out.onnx").stat().st_size


def test_truncated_external_data(tmp_path):
    g = Graph()
    x = g.input([1, 64])
    g.output(g.op("MatMul", [g.op("Relu", [g.op("MatMul", [x, g.weight(64, 256)])]), g.weight(256, 8)]))
    src = tmp_path / "ext.onnx"
    onnx.save(g.model(), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(spa.ModelLoadError, match="truncated"):
        spa.load(src)
    data.unlink()
    with pytest.raises(spa.ModelLoadError, match="missing"):
        spa.load(src)
