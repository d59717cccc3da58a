"""Bounded memory from small files: declared axis widths never decide the analysis's memory.

A few-hundred-byte file may declare a 2^27-wide axis. Axes tied to no weight get one fixed
stand-in atom; axes tied to weights get one atom per index, in numpy; a model whose weight-tied
axes need far more indices than it has weight values is refused with one line."""

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from graphs import Graph, assert_prunes
from spa.errors import UnsupportedModelError
from spa.graph.dependency import MAX_EXTRA_ATOMS

HUGE = 1 << 27
MB = 1 << 20


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "wide", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _saved(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _peak(fn):
    """(result, tracemalloc peak in bytes) of fn()."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _check_collapse_invariants(a: spa.Analysis):
    """Collapsed classes are connected to no initializer class; every other class has one
    atom per index; every group's members cover whole weight axes."""
    dep = a.dep
    sizes = dep.couplings.sizes
    for c, spaces in enumerate(dep.class_spaces):
        width = sizes[spaces[0]]
        if c in dep.collapsed:
            assert c not in dep.initializer_classes
            assert dep.block_size[c] == min(width, 1)
            assert dep.fixed_reason.get(int(dep.root[dep.block_start[c]])) is not None
        else:
            assert dep.block_size[c] == width
    for g in a.groups:
        for space in g.spaces:
            assert dep.space_class[space] not in dep.collapsed


# ---- hostile: tiny files, huge declared axes ------------------------------------------------
def _wide(build, width=HUGE, inits=(), x0=(1, 1)):
    """A small input expanded to a [1, width] tensor "x" (the huge axis is declared inside the
    graph, not on an input), then ``build(nodes) -> name``, then summed to [1, 1]."""
    shape = numpy_helper.from_array(np.array([1, width], np.int64), "wide_shape")
    nodes = [helper.make_node("Expand", ["x0", "wide_shape"], ["x"], name="expand")]
    y = build(nodes)
    nodes.append(helper.make_node("ReduceSum", [y], ["y"], name="sum", keepdims=1))
    return _model(nodes, [_vi("x0", x0)], [_vi("y", (1, 1))], [shape, *inits])


def _chain(*ops):
    """build() for _wide: unary ops (op_type, extra inputs, attrs) applied in turn to "x"."""
    def build(nodes):
        y = "x"
        for i, (op, extra, attrs) in enumerate(ops):
            nodes.append(helper.make_node(op, [y, *extra], [f"t{i}"], name=f"n{i}", **attrs))
            y = f"t{i}"
        return y
    return build


def test_weightless_huge_axis_is_cheap(tmp_path):
    path = _saved(tmp_path, _wide(_chain(("Relu", [], {}))))
    assert path.stat().st_size < 1000
    a, peak = _peak(lambda: spa.analyze(path))
    assert a.shapes.shape["t0"] == (1, HUGE)
    assert peak < 200 * MB, peak
    assert len(a.dep.root) < 100 and not a.groups
    _check_collapse_invariants(a)


def test_huge_input_axis_is_cheap_or_refused_in_one_line(tmp_path):
    """Declared on the input itself: either analyzed cheaply or refused by the loader."""
    path = _saved(tmp_path, _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                                   [_vi("x", (1, HUGE))], [_vi("y", (1, HUGE))]))
    try:
        a, peak = _peak(lambda: spa.analyze(path))
    except spa.errors.SpaError as e:
        assert "\n" not in str(e) and "'x'" in str(e)
    else:
        assert peak < 200 * MB and len(a.dep.root) < 100


def test_huge_reshape_products_are_cheap(tmp_path):
    s1 = numpy_helper.from_array(np.array([1 << 13, 1 << 14], np.int64), "s1")
    s2 = numpy_helper.from_array(np.array([1, HUGE], np.int64), "s2")
    build = _chain(("Reshape", ["s1"], {}), ("Relu", [], {}), ("Reshape", ["s2"], {}))
    path = _saved(tmp_path, _wide(build, inits=[s1, s2]))
    a, peak = _peak(lambda: spa.analyze(path))
    assert a.shapes.shape["t1"] == (1 << 13, 1 << 14)
    assert peak < 200 * MB, peak
    assert len(a.dep.root) < 100
    _check_collapse_invariants(a)


def test_huge_axis_beside_a_scalar_weight_is_cheap(tmp_path):
    scale = numpy_helper.from_array(np.array([0.5], np.float32), "scale")
    path = _saved(tmp_path, _wide(_chain(("Mul", ["scale"], {}), ("Relu", [], {})), inits=[scale]))
    a, peak = _peak(lambda: spa.analyze(path))
    assert peak < 200 * MB, peak
    assert len(a.dep.root) < 100


def test_huge_spatial_axes_beside_prunable_channels(tmp_path):
    """A conv net on an 8192x8192 image: spatial axes collapse, channels still prune."""
    g = Graph()
    x = g.op("Expand", [g.input([1, 3, 1, 1]), g.const(np.array([1, 3, 8192, 8192], np.int64))])
    y = g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 4)
    g.output(g.op("GlobalAveragePool", [y]))
    path = _saved(tmp_path, g.model())
    a, peak = _peak(lambda: spa.analyze(path))
    assert peak < 200 * MB, peak
    assert [grp.size for grp in a.groups] == [8]
    assert len(a.dep.root) < 1000
    _check_collapse_invariants(a)


def _concat_with_weight(width):
    """A [1, width] tensor concatenated with a [1, 4] weight: the wide axis is tied to a weight."""
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    return _wide(_chain(("Concat", ["w"], {"axis": 1})), width=width, inits=[w])


def test_huge_axis_tied_to_a_tiny_weight_is_refused_in_one_line(tmp_path):
    path = _saved(tmp_path, _concat_with_weight(HUGE))
    with pytest.raises(UnsupportedModelError) as err:
        spa.analyze(path)
    msg = str(err.value)
    assert "\n" not in msg and ("'x'" in msg or "'t0'" in msg)
    assert str(HUGE + 4) in msg


def test_flattened_huge_conv_output_is_refused(tmp_path):
    """A 4096x4096 conv output flattened into one 2^27 axis: the axis is tied to the conv's
    8 channels (216 weight values), far more indices than the weights justify."""
    g = Graph()
    x = g.op("Expand", [g.input([1, 3, 1, 1]), g.const(np.array([1, 3, 4096, 4096], np.int64))])
    y = g.op("Flatten", [g.conv(x, 3, 8)], axis=1)
    g.output(g.op("ReduceSum", [g.op("Relu", [y])], keepdims=1))
    path = _saved(tmp_path, g.model())
    with pytest.raises(UnsupportedModelError) as err:
        spa.analyze(path)
    assert "\n" not in str(err.value) and "134217728" in str(err.value)


def test_refusal_limit_is_weights_plus_a_constant():
    """Just under the limit analyzes (every index is bookkept), just over it is refused."""
    ok = MAX_EXTRA_ATOMS // 2 - 8
    a = spa.analyze(_concat_with_weight(ok))
    assert len(a.dep.root) >= 2 * ok and not a.dep.collapsed.intersection(a.dep.initializer_classes)
    with pytest.raises(UnsupportedModelError):
        spa.analyze(_concat_with_weight(MAX_EXTRA_ATOMS // 2 + 8))


def test_declared_dims_without_data_buy_no_memory():
    """An in-memory initializer declaring [1, 2^27] with no data (loading a file refuses it
    earlier) does not count as 2^27 weight values."""
    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, HUGE])
    with pytest.raises(UnsupportedModelError, match="model.s 2 weight values"):
        spa.analyze(_wide(_chain(("Add", ["w"], {})), inits=[w]))


# ---- legitimately wide axes (they are weight axes) --------------------------------------------
def _mlp(width, seed=0):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, width)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((width, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
             helper.make_node("Add", ["m", "b1"], ["a"], name="add1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return _model(nodes, [_vi("x", (1, 4))], [_vi("y", (1, 4))], inits)


def test_wide_hidden_layer_is_bookkept_within_twice_its_weights(tmp_path):
    width = 1 << 19
    model = _mlp(width)
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    path = _saved(tmp_path, model)
    del model
    a, peak = _peak(lambda: spa.analyze(path))
    assert [grp.size for grp in a.groups] == [width]
    assert peak < 2 * weight_bytes + 32 * MB, (peak, weight_bytes)
    idx, pos = a.groups[0].member(a.dep, ("w2", 0))
    assert np.array_equal(idx, np.arange(width)) and np.array_equal(pos, np.arange(width))


def test_wide_hidden_layer_prunes_with_the_oracle():
    r = assert_prunes(_mlp(1 << 14), ratio=0.25)
    assert r.report["groups"][0]["channels"] == 1 << 14


def test_flatten_into_gemm_is_a_weight_axis():
    """Flatten's C*H*W axis is wide but it IS the Gemm weight's input axis: it must not be
    collapsed, and the conv channels carry it."""
    g = Graph()
    x = g.input([1, 3, 32, 32])
    f = g.op("Flatten", [g.op("Relu", [g.conv(x, 3, 8)])], axis=1)
    g.output(g.op("Gemm", [f, g.weight(4, 8 * 32 * 32)], transB=1))
    assert_prunes(g.model())
    a = spa.analyze(g.model())
    _check_collapse_invariants(a)
    assert any(grp.size == 8 and any(s[1] == 1 and s[0].startswith("flatten") for s in grp.spaces)
               for grp in a.groups)


# ---- normal graphs: the oracle, and the reasons ---------------------------------------------
def test_concat_and_split_heads_still_prune():
    g = Graph()
    x = g.input([1, 3, 12, 12])
    a = g.conv(x, 3, 8)
    b = g.conv(x, 3, 4)
    c = g.op("Concat", [g.op("Relu", [a]), b], axis=1)
    r = g.op("Reshape", [c, g.const(np.array([1, 2, 6, 12, 12], np.int64))])
    t = g.op("Reshape", [g.op("Sigmoid", [r]), g.const(np.array([1, 12, 12, 12], np.int64))])
    g.output(g.conv(t, 12, 5))
    result = assert_prunes(g.model())
    assert result.report["verify"]["ok"]


def test_fixed_reason_is_a_mapping_of_roots():
    g = Graph()
    x = g.input([1, 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 4))
    a = spa.analyze(g.model())
    dep = a.dep
    reasons = dict(dep.fixed_reason.items())
    assert reasons and all(dep.root[r] == r for r in reasons)
    assert any(text == "graph input 'x'" for text in reasons.values())
    free = a.groups[0].channels
    assert all(dep.fixed_reason.get(int(r)) is None for r in free)
    assert all(int(r) not in dep.fixed_reason for r in free)
    assert {b.blocked for b in a.blocked} >= {"graph input 'x'"}


@pytest.mark.parametrize("seed", range(5))
def test_numpy_union_find_matches_a_plain_one(seed, monkeypatch):
    """Batched unions (chains, stars, repeats, small chunks) give the same classes and the
    same fixed atoms as one-at-a-time union-find."""
    import spa.graph.unionfind as unionfind
    monkeypatch.setattr(unionfind, "_CHUNK", 7)
    rng = np.random.default_rng(seed)
    n = 300
    uf = unionfind._UnionFind(n)
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a
    fixed = set()
    for a in rng.choice(n, 10, replace=False):
        uf.fix_block(int(a), 1, f"r{a}")
        fixed.add(int(a))
    for _ in range(6):
        k = int(rng.integers(1, 120))
        a = rng.integers(0, n, k)
        b = np.where(rng.random(k) < 0.5, a + 1, rng.integers(0, n, k)).clip(0, n - 1)
        uf.union(a, b)
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    root = uf.roots()
    assert root.tolist() == [find(a) for a in range(n)]
    fixed_roots = {find(a) for a in fixed}
    assert [bool(uf.reason[r] != unionfind.NO_REASON) for r in root] == [find(a) in fixed_roots for a in range(n)]


def test_long_1d_tensors_skip_onnx_data_propagation(monkeypatch):
    """A tiny file whose graph expands to a long 1-D vector: ONNX's data propagation would
    keep ~80 bytes per element of it; spa infers such models without it."""
    import onnx.shape_inference as si
    from spa.loading.probe import infer_shapes
    from spa.loading.shapes import DATA_PROP_MAX
    seen = []
    real = si.infer_shapes

    def spy(model, *a, **k):
        seen.append(k.get("data_prop"))
        return real(model, *a, **k)
    monkeypatch.setattr(si, "infer_shapes", spy)
    n = DATA_PROP_MAX * 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
    shape = numpy_helper.from_array(np.array([n], np.int64), "shape")
    m = helper.make_model(helper.make_graph([helper.make_node("Expand", ["x", "shape"], ["e"]),
                                             helper.make_node("Relu", ["e"], ["y"])], "g", [x], [y], [shape]),
                          opset_imports=[helper.make_opsetid("", 17)])
    shapes = infer_shapes(m, want_values=False)
    assert shapes.shape["e"] == (n,) and True not in seen
