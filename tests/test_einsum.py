"""Einsum: one label is one channel space; each graph prunes, and the oracle holds."""

import numpy as np
import pytest

from graphs import Graph, assert_prunes
from spa.graph.rules.einsum import parse_equation


def dims(model, name):
    return next(list(t.dims) for t in model.graph.initializer if t.name == name)


def out_dims(model):
    return [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]


def einsum_weights(model):
    """The initializer operands of the Einsum nodes, in order."""
    inits = {t.name for t in model.graph.initializer}
    return [i for n in model.graph.node if n.op_type == "Einsum" for i in n.input if i in inits]


def prunes(model, **kw):
    """Prune with the oracle; the output keeps its shape and every Einsum weight operand shrinks
    (so the rule mapped its axes, rather than leaving them fixed)."""
    r = assert_prunes(model, **kw)
    assert out_dims(r.model) == out_dims(model)
    for w in einsum_weights(model):
        assert np.prod(dims(r.model, w)) < np.prod(dims(model, w)), (w, dims(model, w), dims(r.model, w))
    return r


@pytest.mark.parametrize("first,second,x_shape,w1,w2", [
    ("bi,io->bo", "bi,io->bo", [2, 6], (6, 16), (16, 3)),
    ("bsi,oi->bso", "bsi,oi->bso", [2, 4, 6], (16, 6), (3, 16)),
    ("ij,jk", "ij,jk", [3, 6], (6, 16), (16, 4)),                # implicit output: "ik"
    ("...i,oi", "...i,oi->...o", [2, 4, 6], (16, 6), (3, 16)),   # implicit with "...": "...o"
    ("b i , i o -> b o", "bi,io", [2, 6], (6, 16), (16, 3)),    # spaces
])
def test_dense_layers(first, second, x_shape, w1, w2):
    g = Graph()
    h = g.op("Einsum", [g.input(x_shape), g.weight(*w1)], equation=first)
    h = g.op("Relu", [g.op("Add", [h, g.weight(16)])])
    g.output(g.op("Einsum", [h, g.weight(*w2)], equation=second))
    model = g.model()
    r = prunes(model)
    w_first, w_second = einsum_weights(model)
    # the hidden width: the first weight's output axis and the second's input axis, together
    o_axis, i_axis = w1.index(16), w2.index(16)
    assert dims(r.model, w_first)[o_axis] == dims(r.model, w_second)[i_axis] < 16


def test_batched_matmul():
    """bij,bjk->bik with a per-batch weight: j (contracted) and k (free) both prune."""
    g = Graph()
    a = g.op("Relu", [g.op("MatMul", [g.input([2, 5, 6]), g.weight(6, 16)])])
    w = g.weight(2, 16, 8)
    y = g.op("Relu", [g.op("Einsum", [a, w], equation="bij,bjk->bik")])
    g.output(g.op("MatMul", [y, g.weight(8, 3)]))
    model = g.model()
    r = prunes(model)
    b, j, k = dims(r.model, w)
    assert b == 2 and j < 16 and k < 8


def test_batched_matmul_of_activations():
    """q kᵀ as bij,bjk->bik: the summed j ties both projections' columns."""
    g = Graph()
    x = g.input([2, 5, 6])
    wq, wk = g.weight(6, 16), g.weight(6, 16)
    q = g.op("MatMul", [x, wq])
    k = g.op("Transpose", [g.op("MatMul", [x, wk])], perm=[0, 2, 1])
    g.output(g.op("Einsum", [q, k], equation="bij,bjk->bik"))
    model = g.model()
    r = prunes(model)
    assert dims(r.model, wq)[1] == dims(r.model, wk)[1] < 16


def attention(heads=4, head_dim=4, seq=5):
    """Multi-head attention with its two products written as Einsum (MaxViT, jax2onnx)."""
    width = heads * head_dim
    g = Graph()
    x = g.input([1, seq, width])

    def split(w):   # (1, seq, width) -> (1, heads, seq, head_dim)
        t = g.op("Reshape", [g.op("MatMul", [x, w]), g.const(np.array([1, seq, heads, head_dim], np.int64))])
        return g.op("Transpose", [t], perm=[0, 2, 1, 3])

    ws = [g.weight(width, width) for _ in range(3)]
    q, k, v = (split(w) for w in ws)
    p = g.op("Softmax", [g.op("Einsum", [q, k], equation="bhqd,bhkd->bhqk")], axis=-1)
    o = g.op("Transpose", [g.op("Einsum", [p, v], equation="bhqk,bhkd->bhqd")], perm=[0, 2, 1, 3])
    o = g.op("Reshape", [o, g.const(np.array([1, seq, width], np.int64))])
    g.output(g.op("MatMul", [o, g.weight(width, width)]))
    return g.model(), ws


def test_attention_prunes_whole_heads():
    model, (wq, wk, wv) = attention()
    r = assert_prunes(model, ratio=0.0, heads=0.5)
    assert out_dims(r.model) == out_dims(model)
    assert {g["kind"] for g in r.report["groups"] if g["removed"]} == {"heads"}
    assert dims(r.model, wq)[1] == dims(r.model, wk)[1] == dims(r.model, wv)[1] == 8   # 2 of 4 heads
    reshape = [n for n in r.model.graph.node if n.op_type == "Reshape"][0]
    target = next(t for t in r.model.graph.initializer if t.name == reshape.input[1])
    assert list(np.frombuffer(target.raw_data, np.int64)) == [1, 5, 2, 4]


def test_attention_prunes_head_dims():
    model, (wq, wk, wv) = attention()
    r = assert_prunes(model, ratio=0.0, head_dims=0.5)
    assert dims(r.model, wq)[1] == dims(r.model, wk)[1] == 8   # 2 of 4 dims in each head
    assert out_dims(r.model) == out_dims(model)


def test_bilinear_form():
    """bi,oij,bj->bo: i and j are contracted, o is free; all three prune."""
    g = Graph()
    x = g.input([2, 6])
    h1 = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 8)])])
    h2 = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 10)])])
    w = g.weight(12, 8, 10)
    y = g.op("Relu", [g.op("Einsum", [h1, w, h2], equation="bi,oij,bj->bo")])
    g.output(g.op("MatMul", [y, g.weight(12, 3)]))
    model = g.model()
    r = prunes(model)
    o, i, j = dims(r.model, w)
    assert o < 12 and i < 8 and j < 10


def test_sum_over_one_operand_is_exact():
    """bsi->bs sums the channels away, like ReduceSum: removed channels, zeroed, add nothing."""
    g = Graph()
    w = g.weight(6, 16)
    h = g.op("Relu", [g.op("MatMul", [g.input([2, 4, 6]), w])])
    g.output(g.op("Einsum", [h], equation="bsi->bs"))
    model = g.model()
    r = prunes(model)
    assert dims(r.model, w)[1] < 16


def test_broadcast_label_is_not_tied():
    """A size-1 dim broadcast against a label's channels is not one of them: the gate's i
    broadcasts over the channels, the scale's b over the batch; the channels still prune."""
    g = Graph()
    w = g.weight(6, 16)
    h = g.op("Relu", [g.op("MatMul", [g.input([2, 6]), w])])
    scale, gate = g.weight(1, 16), g.weight(2, 1)
    y = g.op("Einsum", [h, scale, gate], equation="bi,bi,bi->bi")
    g.output(g.op("MatMul", [y, g.weight(16, 3)]))
    r = assert_prunes(g.model())
    assert dims(r.model, gate) == [2, 1]
    assert dims(r.model, scale)[0] == 1 and dims(r.model, scale)[1] == dims(r.model, w)[1] < 16


def test_diagonal_blocks():
    """bchh->bch reads channel c on a diagonal: conv B is left whole, conv A still prunes."""
    g = Graph()
    a = g.conv(g.input([1, 3, 6, 6]), 3, 8)
    b = g.conv(g.op("Relu", [a]), 8, 8)
    g.output(g.op("Einsum", [b], equation="bchh->bch"))
    model = g.model()
    r = assert_prunes(model)
    conv_a, conv_b = (n.input[1] + "[0]" for n in model.graph.node if n.op_type == "Conv")
    assert sum(grp["removed"] for grp in r.report["groups"] if conv_a in grp["members"]) > 0
    assert not any(conv_b in grp["members"] for grp in r.report["groups"])
    assert any("repeats within one term" in x["reason"] and "diagonal" in x["reason"]
               for x in r.report["blocked"] if conv_b in x["members"])


@pytest.mark.parametrize("equation,ranks,expected", [
    ("bi,oi", [2, 2], ([["b", "i"], ["o", "i"]], ["b", "o"])),
    ("ba", [2], ([["b", "a"]], ["a", "b"])),
    ("ij,...jk", [2, 3], ([["i", "j"], [".0", "j", "k"]], [".0", "i", "k"])),
    ("...i,...i->...", [3, 2], ([[".0", ".1", "i"], [".1", "i"]], [".0", ".1"])),
    ("...i->i", [3], "the output drops the dims of '...'"),
    ("ij,jk", [2], "2 terms for 1 inputs"),
    ("i1", [2], "cannot read term 'i1'"),
])
def test_parse_equation(equation, ranks, expected):
    assert parse_equation(equation, ranks) == expected
