"""Random CNN graphs from the building blocks real networks use; random channels removed.
The pruned model must equal the masked original on random inputs, whatever was drawn."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphs import Graph, assert_prunes

HW = 6
BLOCKS = ["conv", "residual", "concat", "split", "depthwise", "grouped", "se", "shuffle", "bn"]


def add_block(g: Graph, x: str, c: int, kind: str, draw) -> tuple[str, int]:
    width = lambda: draw(st.sampled_from([4, 6, 8, 12]))  # noqa: E731
    if kind == "conv":
        c2 = width()
        return g.op("Relu", [g.conv(x, c, c2, k=draw(st.sampled_from([1, 3])))]), c2
    if kind == "residual":
        h = g.op("Relu", [g.conv(x, c, width())])
        h = g.conv(h, _out_channels(g, h), c)
        return g.op("Relu", [g.op("Add", [h, x])]), c
    if kind == "concat":
        a = g.op("Relu", [g.conv(x, c, width(), k=1)])
        ca = _out_channels(g, a)
        b = g.conv(x, c, width())
        cb = _out_channels(g, b)
        parts = [(a, ca), (b, cb)] + ([(x, c)] if draw(st.booleans()) else [])
        return g.op("Concat", [p for p, _ in parts], axis=1), sum(n for _, n in parts)
    if kind == "split" and c >= 2:
        first = draw(st.integers(1, c - 1))
        a, b = g.op("Split", [x, g.const(np.array([first, c - first], np.int64))], n_out=2, axis=1)
        b2 = g.op("Relu", [g.conv(b, c - first, c - first)])
        return g.op("Concat", [b2, a], axis=1), c
    if kind == "depthwise":
        m = draw(st.sampled_from([1, 2]))
        return g.op("Relu", [g.conv(x, c, c * m, group=c)]), c * m
    if kind == "grouped" and c % 2 == 0:
        groups = draw(st.sampled_from([d for d in (2, 4) if c % d == 0]))
        c2 = groups * draw(st.sampled_from([1, 2, 3]))
        return g.op("Relu", [g.conv(x, c, c2, group=groups)]), c2
    if kind == "se":
        s = g.op("GlobalAveragePool", [x])
        s = g.op("Relu", [g.conv(s, c, 4, k=1)])
        s = g.op("Sigmoid", [g.conv(s, 4, c, k=1)])
        return g.op("Mul", [x, s]), c
    if kind == "shuffle" and c % 2 == 0:
        r = g.op("Reshape", [x, g.const(np.array([1, 2, c // 2, HW, HW], np.int64))])
        t = g.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
        return g.op("Reshape", [t, g.const(np.array([1, c, HW, HW], np.int64))]), c
    if kind == "bn":
        var = g.const(np.abs(g.rng.standard_normal(c)).astype(np.float32) + 0.5)
        return g.op("BatchNormalization", [x, g.weight(c), g.weight(c), g.weight(c), var]), c
    return x, c


def _out_channels(g: Graph, tensor: str) -> int:
    """Output channels of the Conv (possibly under a Relu) that produced ``tensor``."""
    producers = {o: n for n in g.nodes for o in n.output}
    node = producers[tensor]
    while node.op_type != "Conv":
        node = producers[node.input[0]]
    w = next(t for t in g.inits if t.name == node.input[1])
    return w.dims[0]


@st.composite
def cnn(draw):
    g = Graph(seed=draw(st.integers(0, 1000)))
    x = g.input([1, 3, HW, HW])
    c = draw(st.sampled_from([4, 8]))
    x = g.op("Relu", [g.conv(x, 3, c)])
    for kind in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6)):
        x, c = add_block(g, x, c, kind, draw)
    head = draw(st.sampled_from(["gap_gemm", "flatten_gemm", "conv"]))
    if head == "gap_gemm":
        f = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
        g.output(g.op("Gemm", [f, g.weight(5, c), g.weight(5)], transB=1))
    elif head == "flatten_gemm":
        f = g.op("Flatten", [x])
        g.output(g.op("Gemm", [f, g.weight(c * HW * HW, 5)]))
    else:
        g.output(g.conv(x, c, 3))
    return g.model()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=cnn(), ratio=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 10_000))
def test_random_cnn_pruned_equals_masked(model, ratio, seed):
    result = assert_prunes(model, ratio=ratio, criterion="random", seed=seed, expect_removed=False)
    groups = result.report["groups"]
    for group in groups:
        assert group["removed"] == int(np.floor(group["channels"] * ratio + 1e-9))
    if any(group["removed"] for group in groups):
        assert result.report["after"]["params"] < result.report["before"]["params"]
