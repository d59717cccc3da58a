"""Symbolic input dims need no flag: spa chooses probe sizes, analyzes there, keeps the
written model dynamic and verifies it at a second size (spa/loading/probe.py)."""

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import spa
from graphs import Graph, assert_prunes
from spa.cli.commands import main
from spa.loading.probe import IMAGE_SIZES


def dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def probed(report):
    """{dim name: (size, where from)} of the first probe."""
    return {e["dim"]: (e["size"], e["from"]) for axes in report["probe"]["inputs"].values() for e in axes.values()}


def second(report):
    return {e["dim"]: e["size"] for axes in report["probe"]["second"]["inputs"].values() for e in axes.values()}


def image_cnn(input_dims=("N", 3, "H", "W")):
    g = Graph()
    x = g.input(list(input_dims))
    y = g.op("Relu", [g.conv(x, 3, 16, strides=[2, 2])])
    y = g.op("Relu", [g.conv(y, 16, 16)])
    g.output(g.conv(y, 16, 4))
    return g.model()


def hard_coded_flatten(side, downsample=5, channels=8):
    """Strided convs down to ``side`` x ``side`` at some input size, then a Reshape whose
    target hard-codes channels*side*side: the model runs at one spatial size only."""
    g = Graph()
    y = g.op("Relu", [g.conv(g.input(["N", 3, "H", "W"]), 3, channels)])
    for _ in range(downsample):
        y = g.op("Relu", [g.conv(y, channels, channels, strides=[2, 2])])
    f = g.op("Reshape", [y, g.const(np.array([1, channels * side * side], np.int64))])
    g.output(g.op("Gemm", [f, g.weight(channels * side * side, 5)]))
    return g.model()


def runs(model, shape):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    try:
        s.run(None, {model.graph.input[0].name: np.zeros(shape, np.float32)})
        return True
    except Exception:
        return False


def test_image_cnn_prunes_without_flag_and_stays_dynamic():
    m = image_cnn()
    r = assert_prunes(m)
    rep = r.report
    assert rep["input_shapes"]["x"] == [1, 3, 224, 224]
    assert probed(rep) == {"H": (224, "name"), "W": (224, "name")}
    assert second(rep) == {"H": 320, "W": 320}        # the oracle also ran there
    assert dims(r.model.graph.input[0]) == ["N", 3, "H", "W"]
    assert dims(r.model.graph.output[0]) == dims(m.graph.output[0])
    assert all(isinstance(d, str) for d in dims(r.model.graph.output[0])[2:])  # H/W stay symbolic
    assert runs(r.model, (2, 3, 40, 56))


def test_unnamed_image_dims_are_candidates():
    g = Graph()
    x = g.input(["N", 3, "a", "b"])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 4))
    rep = assert_prunes(g.model()).report
    assert probed(rep) == {"a": (224, "candidate"), "b": (224, "candidate")}


def test_sequence_model_prunes():
    g = Graph()
    x = g.input(["N", "S", 8])
    h = g.op("Relu", [g.op("Add", [g.op("MatMul", [x, g.weight(8, 32)]), g.weight(32)])])
    g.output(g.op("MatMul", [h, g.weight(32, 4)]))
    r = assert_prunes(g.model())
    assert r.report["input_shapes"]["x"] == [1, 16, 8]
    assert probed(r.report) == {"S": (16, "name")}
    assert second(r.report) == {"S": 128}
    assert dims(r.model.graph.input[0]) == ["N", "S", 8]


def test_probe_finds_the_size_that_runs():
    """The Reshape target fits 10x10 after five stride-2 convs: 224 fails, 320 runs."""
    m = hard_coded_flatten(side=10)
    r = assert_prunes(m)
    assert r.report["input_shapes"]["x"] == [1, 3, 320, 320]
    assert r.report["probe"]["tried"] == 2
    assert runs(r.model, (1, 3, 320, 320))


def test_size_constant_valid_for_one_shape_only_is_handled():
    """Analysis at the first probe (224) succeeds and the Reshape target holds only there.
    No other size runs the original either, so the pruned model is correct as it is: the
    rewrite fixes the channel factor of the target, the report says that no second size ran."""
    m = hard_coded_flatten(side=7)
    r = assert_prunes(m)
    assert r.report["input_shapes"]["x"] == [1, 3, 224, 224]
    assert "skipped" in r.report["probe"]["second"] and "first probe only" in r.report["probe"]["second"]["skipped"]
    reshape = next(n for n in r.model.graph.node if n.op_type == "Reshape")
    target = onnx.numpy_helper.to_array(next(t for t in r.model.graph.initializer if t.name == reshape.input[1]))
    assert target[0] == 1 and target[1] % 49 == 0 and target[1] < 8 * 49  # channels cut, 7x7 kept
    assert runs(r.model, (1, 3, 224, 224)) and not runs(r.model, (1, 3, 320, 320))


def fpn_like():
    """Upsample to the skip's size, read from the graph (F.interpolate(x, size=skip.shape[-2:])):
    the Resize sizes are computed, and hold every spatial size in the original."""
    g = Graph()
    x = g.input(["N", 3, "H", "W"])
    skip = g.op("Relu", [g.conv(x, 3, 16)])
    a = g.op("Relu", [g.conv(skip, 16, 16, strides=[2, 2])])
    sa, ss = g.op("Shape", [a]), g.op("Shape", [skip])
    sizes = g.op("Concat", [g.op("Slice", [sa, g.const(np.array([0])), g.const(np.array([2]))]),
                            g.op("Slice", [ss, g.const(np.array([2])), g.const(np.array([4]))])], axis=0)
    up = g.op("Resize", [a, "", "", sizes], mode="nearest")
    g.output(g.conv(g.op("Add", [up, skip]), 16, 4))
    return g.model()


def test_computed_resize_sizes_stay_computed():
    """Upsampling to the skip's size: the rewrite changes only the pruned channel entry of the
    computed sizes (it used to write the whole vector as constants, a model that ran at the
    analyzed size only); verified at the second probe, and it runs at any other size."""
    m = fpn_like()
    assert runs(m, (1, 3, 224, 224)) and runs(m, (1, 3, 320, 320))
    r = assert_prunes(m)
    assert second(r.report) == {"H": 320, "W": 320}
    assert runs(r.model, (1, 3, 64, 96))
    fixed = assert_prunes(m, input_shapes={"x": (1, 3, 32, 32)})  # also when the user fixes the shape
    assert runs(fixed.model, (1, 3, 64, 96))


def test_oracle_names_the_second_probe_sizes():
    """verify.oracle with two input shapes: a pruned model valid at one size only fails at the
    other, with the dim names and both sizes in one line."""
    from spa.verify.oracle import oracle
    original = image_cnn()
    fixed = image_cnn()  # same weights (seeded), but the last conv's output is cut to a fixed size
    g = fixed.graph
    g.initializer.extend([helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
                          helper.make_tensor("s1", TensorProto.INT64, [1], [112]),
                          helper.make_tensor("ax", TensorProto.INT64, [1], [2])])
    last = g.output[0].name
    g.node.append(helper.make_node("Slice", [last + "_full", "s0", "s1", "ax"], [last], name="cut"))
    for n in g.node[:-1]:
        n.output[:] = [last + "_full" if o == last else o for o in n.output]
    first, at = {"x": (1, 3, 224, 224)}, {"x": (1, 3, 320, 320)}
    assert oracle(fixed, original, [first], original).ok
    with pytest.raises(spa.VerificationError, match=r"second probe H=320 \(analyzed at 224\), W=320"):
        oracle(fixed, original, [first, at], original)
    assert oracle(original, original, [first, at], original).ok


def test_metadata_sizes_are_honoured():
    m = image_cnn(("N", 3, "d1", "d2"))
    m.metadata_props.add(key="imgsz", value="[96, 128]")
    rep = assert_prunes(m).report
    assert rep["input_shapes"]["x"] == [1, 3, 96, 128]
    assert probed(rep) == {"d1": (96, "metadata"), "d2": (128, "metadata")}
    m = image_cnn(("N", 3, "H", "W"))
    m.metadata_props.add(key="height", value="64")
    m.metadata_props.add(key="W", value="48")          # a key naming the dim itself
    assert assert_prunes(m).report["input_shapes"]["x"] == [1, 3, 64, 48]


def test_dim_names_are_honoured():
    """A sequence-first layout: the leading dim is named a sequence (probed, not batch 1);
    the second is named batch (1); a rank-4 input's "time" axis gets sequence sizes, not 224."""
    g = Graph()
    x = g.input(["seq_len", "batch_size", 8])
    g.output(g.op("MatMul", [g.op("Relu", [g.op("MatMul", [x, g.weight(8, 16)])]), g.weight(16, 4)]))
    r = assert_prunes(g.model())
    assert r.report["input_shapes"]["x"] == [16, 1, 8]
    assert probed(r.report) == {"seq_len": (16, "name")}
    g = Graph()
    x = g.input(["N", 3, "time", "freq"])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 4))
    r = assert_prunes(g.model())
    assert r.report["input_shapes"]["x"] == [1, 3, 16, 224]
    assert probed(r.report) == {"time": (16, "name"), "freq": (224, "candidate")}


def test_shared_dim_names_share_a_size_and_input_shape_overrides():
    g = Graph()
    a, b = g.input(["N", "S", 8], "a"), g.input(["N", "S", 8], "b")
    h = g.op("Relu", [g.op("MatMul", [g.op("Add", [a, b]), g.weight(8, 16)])])
    g.output(g.op("MatMul", [h, g.weight(16, 4)]))
    m = g.model()
    rep = assert_prunes(m).report
    assert rep["input_shapes"] == {"a": [1, 16, 8], "b": [1, 16, 8]}
    rep = assert_prunes(m, input_shapes={"a": (2, 40, 8)}).report
    assert rep["input_shapes"] == {"a": [2, 40, 8], "b": [2, 40, 8]}  # N and S as given for a
    assert "probe" not in rep
    rep = assert_prunes(image_cnn(), input_shapes={"x": (1, 3, 32, 48)}).report
    assert rep["input_shapes"]["x"] == [1, 3, 32, 48] and "probe" not in rep


def test_memory_cap_skips_large_candidates():
    """4096 channels at 224x224 is over spa.loading.shapes.MAX_INPUT_VALUES: the first size under it runs."""
    g = Graph()
    x = g.input(["N", 4096, "H", "W"])
    g.output(g.conv(g.op("Relu", [g.conv(x, 4096, 8, k=1)]), 8, 4, k=1))
    r = spa.prune(g.model(), ratio=0.5, round_to=1, verify=False)
    assert r.report["input_shapes"]["x"] == [1, 4096, 32, 32]
    assert IMAGE_SIZES[:4] == (224, 320, 640, 32)


def test_nothing_runs_is_one_clear_error():
    m = hard_coded_flatten(side=7, downsample=0, channels=4)  # runs at 7x7 only: no candidate
    with pytest.raises(spa.InputShapeError) as e:
        spa.prune(m, ratio=0.5)
    msg = str(e.value)
    assert "\n" not in msg
    for word in ("H", "W", "224", "640", "--input-shape x=1,3,N,N"):
        assert word in msg, (word, msg)
    assert_prunes(m, input_shapes={"x": (1, 3, 7, 7)})


def test_several_passes_keep_the_probe():
    r = assert_prunes(image_cnn(), steps=2)
    assert probed(r.report) == {"H": (224, "name"), "W": (224, "name")}
    assert "second" in r.report["probe"]


def test_cli_notes_the_probe(tmp_path, capsys):
    path = tmp_path / "dyn.onnx"
    onnx.save(image_cnn(), path)
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--round-to", "1", "--ratio", "0.5"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("spa: note:")]
    assert len(notes) == 1, err
    assert "H=224" in notes[0] and "W=224" in notes[0] and "320" in notes[0] and "--input-shape" in notes[0]
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--input-shape", "x=1,3,16,16",
                 "--ratio", "0.5"]) == 0
    assert "spa: note:" not in capsys.readouterr().err
    path = tmp_path / "fixed.onnx"
    onnx.save(hard_coded_flatten(side=7, downsample=0, channels=4), path)
    code = main(["prune", str(path), "-o", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("spa: error:") and "--input-shape" in err[0]


def test_channel_split_with_bounds_computed_from_the_shape():
    """x[:, : x.shape[1] // 4] and the rest (a legacy-exported channel split): the pruned bound
    must be the kept count of that quarter, not what the computation gives on the pruned shape
    (16 channels at ratio 0.4: the quarter keeps 3 of 4, the rest 8 of 12; 11 // 4 would be 2)."""
    g = Graph()
    x = g.input(["N", 3, "H", "W"])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    c = g.op("Gather", [g.op("Shape", [y]), g.const(np.array(1, np.int64))])
    quarter = g.op("Unsqueeze", [g.op("Div", [c, g.const(np.array(4, np.int64))]),
                                 g.const(np.array([0], np.int64))])
    axis = g.const(np.array([1], np.int64))
    first = g.op("Slice", [y, g.const(np.array([0], np.int64)), quarter, axis])
    rest = g.op("Slice", [y, quarter, g.const(np.array([1 << 30], np.int64)), axis])
    g.output(g.op("Add", [g.conv(first, 4, 4), g.conv(rest, 12, 4)]))
    r = assert_prunes(g.model(), ratio=0.4)
    assert sorted(grp["kept"] for grp in r.report["groups"]) == [3, 8]
    assert runs(r.model, (1, 3, 40, 56))


def test_batch_size_for_a_state_dim_is_only_a_fallback():
    """An unnamed first open dim of an input with a static leading dim (a state [layers, ?, ...])
    may be the batch, but is tried at 1 only after the candidates: here they run."""
    from spa.loading.probe import infer_shapes
    g = Graph(opset=18)
    x, y = g.input([None, None], "x"), g.input([3, None], "y")
    g.output(g.op("Add", [x, g.op("ReduceMean", [y, g.const(np.array([0], np.int64))], keepdims=1)]))
    s = infer_shapes(g.model())
    assert s.input_shapes == {"x": (1, 16), "y": (3, 16)}
    assert s.probe["inputs"]["y"][1]["from"] == "candidate" and "values" not in s.probe
