"""Weight-only compensation (spa/score/merge.py): neuron merging and its least-squares variant.

Removed channels whose producing filters are positive multiples of kept ones (bias included)
carry no information under ReLU: merging them into their kept twins must reproduce the
unpruned model's outputs exactly. Every pruned model also passes the oracle."""

import numpy as np
import pytest

import spa
from graphs import Graph
from spa.analysis import analyze
from spa.runtime import session
from spa.score.merge import mergeable
from spa.score.obspa import _consumers_of

RNG = np.random.default_rng(0)


def twins(rows: int, cols, scales, negative=False) -> tuple[np.ndarray, np.ndarray]:
    """A (2*rows, *cols) weight and (2*rows,) bias whose second half is the first half times
    ``scales`` (small, so that l1 removes the second half)."""
    w = RNG.standard_normal((rows, *cols)).astype(np.float32)
    b = RNG.standard_normal(rows).astype(np.float32) * 0.3
    s = np.asarray(scales, np.float32) * (-1 if negative else 1)
    return (np.concatenate([w, w * s.reshape(-1, *[1] * len(cols))]),
            np.concatenate([b, b * s]))


def small_columns(w: np.ndarray, axis: int = 1) -> np.ndarray:
    """Shrink the consumer's columns of the second half, so that l1 agrees to remove it."""
    w = w.copy()
    half = w.shape[axis] // 2
    index = [slice(None)] * w.ndim
    index[axis] = slice(half, None)
    w[tuple(index)] *= 0.1
    return w


def relu_chain(act="Relu"):
    """x -> Conv(3->8, twins) -> act -> MaxPool -> Conv(8->5) -> out."""
    g = Graph()
    x = g.input([2, 3, 8, 8])
    w, b = twins(4, (3, 3, 3), [0.5, 0.3, 0.25, 0.4])
    h = g.op(act, [g.op("Conv", [x, g.const(w), g.const(b)], pads=[1, 1, 1, 1])])
    h = g.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    w2 = small_columns((RNG.standard_normal((5, 8, 3, 3)) * 0.3).astype(np.float32))
    g.output(g.op("Conv", [h, g.const(w2), g.weight(5)], pads=[1, 1, 1, 1]))
    return g.model()


def residual():
    """x -> ConvA(3->8) -> Relu = r; r -> ConvB(8->8) -> Relu -> ConvC(8->8) -> + r -> Relu ->
    GlobalAveragePool -> Flatten -> Gemm(8->4). The residual group has two producers (A, C),
    the inner one (B) its own; in both the second half is the first half scaled."""
    g = Graph()
    x = g.input([2, 3, 6, 6])
    scales = [0.5, 0.3, 0.25, 0.4]
    wa, ba = twins(4, (3, 3, 3), scales)
    r = g.op("Relu", [g.op("Conv", [x, g.const(wa), g.const(ba)], pads=[1, 1, 1, 1])])
    wb, bb = twins(4, (8, 3, 3), [0.2, 0.45, 0.35, 0.3])
    h = g.op("Relu", [g.op("Conv", [r, g.const(small_columns(wb)), g.const(bb)], pads=[1, 1, 1, 1])])
    wc, bc = twins(4, (8, 3, 3), scales)    # the same scales as A: channel j is s_j times channel i
    c = g.op("Conv", [h, g.const(small_columns(wc)), g.const(bc)], pads=[1, 1, 1, 1])
    r2 = g.op("Relu", [g.op("Add", [c, r])])
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [r2])])
    wf = small_columns(RNG.standard_normal((4, 8)).astype(np.float32))
    g.output(g.op("Gemm", [pooled, g.const(wf), g.weight(4)], transB=1))
    return g.model()


def linear_chain():
    """No activation: x -> Conv(3->8) -> Conv(8->4); twins with negative scales merge too."""
    g = Graph()
    x = g.input([2, 3, 5, 5])
    w, b = twins(4, (3, 3, 3), [0.5, 0.3, 0.25, 0.4], negative=True)
    h = g.op("Conv", [x, g.const(w), g.const(b)], pads=[1, 1, 1, 1])
    g.output(g.op("Conv", [h, g.const(small_columns((RNG.standard_normal((4, 8, 1, 1))).astype(np.float32))),
                           g.weight(4)]))
    return g.model()


def prune(model, compensation, **kw):
    r = spa.prune(model, ratio=0.5, round_to=1, verify=True, compensation=compensation, **kw)
    assert r.report["verify"]["ok"], r.report["verify"]
    return r


def outputs(model, x):
    return session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("build", [relu_chain, residual, linear_chain], ids=["relu", "residual", "linear"])
def test_merging_proportional_filters_is_exact(build):
    model = build()
    x = RNG.standard_normal([int(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim]
                            ).astype(np.float32)
    want = outputs(model, x)
    merged = prune(model, "merge")
    assert all(g["removed_channels"] == [4, 5, 6, 7] for g in merged.report["groups"]), merged.report["groups"]
    info = merged.report["data"]["merged"]
    assert info["channels merged"] == info["of which exact"] == 4 * len(merged.report["groups"])
    scale = np.abs(want).max()

    def error(r):
        return np.abs(outputs(r.model, x) - want).max() / scale
    assert error(merged) < 1e-5
    # removing the same channels without merging them changes the outputs (the test can tell)
    plain = spa.prune(model, ratio=0.5, round_to=1, criterion="l1", verify=True)
    assert error(plain) > 1e-2
    # least squares finds the same twins, up to its damping
    assert error(prune(model, "lsq")) < 0.1 * error(plain)


def test_merge_is_refused_where_it_would_not_be_exact():
    a = analyze(relu_chain("HardSwish"), {})
    used, axis_of, _ = _consumers_of(a.model, a.dep, a.groups, {t.name: t for t in a.model.graph.initializer})
    reason = mergeable(a.model, a.dep, a.groups[0], used, axis_of)
    assert isinstance(reason, str) and "HardSwish" in reason
    r = prune(relu_chain("HardSwish"), "merge")           # left to OBS, and still correct
    assert "merged" not in r.report["data"]
    a = analyze(relu_chain(), {})
    used, axis_of, _ = _consumers_of(a.model, a.dep, a.groups, {t.name: t for t in a.model.graph.initializer})
    made, positive = mergeable(a.model, a.dep, a.groups[0], used, axis_of)
    assert positive and len(made) == 2                    # the conv's weight and bias


def random_mlp_cnn():
    """Random weights, nothing proportional: Conv -> Relu -> MaxPool -> Flatten -> Gemm ->
    Relu -> MatMul + Add -> Relu -> Gemm."""
    g = Graph(seed=3)
    x = g.input([2, 3, 8, 8])
    h = g.op("MaxPool", [g.op("Relu", [g.conv(x, 3, 8)])], kernel_shape=[2, 2], strides=[2, 2])
    h = g.op("Relu", [g.op("Gemm", [g.op("Flatten", [h]), g.weight(12, 128), g.weight(12)], transB=1)])
    h = g.op("Relu", [g.op("Add", [g.op("MatMul", [h, g.weight(12, 10)]), g.weight(10)])])
    g.output(g.op("Gemm", [h, g.weight(3, 10), g.weight(3)], transB=1))
    return g.model()


@pytest.mark.parametrize("compensation", ["merge", "lsq"])
def test_weight_only_compensation_passes_the_oracle(compensation):
    r = prune(random_mlp_cnn(), compensation)
    assert r.report["data"]["merged"]["groups"] == 3
    assert r.report["options"]["compensation"] == compensation
    assert "merging" in r.report["data"]["mode"]


def test_unknown_compensation_is_refused():
    with pytest.raises(spa.SpaError, match="compensation"):
        spa.prune(relu_chain(), compensation="magic")
