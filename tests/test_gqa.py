"""Grouped-query attention and rotary embeddings as single ops (spa/graph/rules/attention.py):
onnxruntime's GroupQueryAttention and RotaryEmbedding, the standard Attention and
RotaryEmbedding of opset 23. A key/value head goes with its group of query heads; the head
attributes follow; the oracle (onnxruntime CPU, float32) checks every pruned model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import spa
from graphs import Graph, assert_prunes

MS = "com.microsoft"
S, E = 5, 8          # sequence length, model width


def ms(g, op, inputs, n_out=1, **attrs):
    outs = [g._name(op.lower()) for _ in range(n_out)]
    g.nodes.append(helper.make_node(op, list(inputs), outs, domain=MS, name=g._name("n_" + op), **attrs))
    return outs[0] if n_out == 1 else outs


def attrs_of(model, op):
    node = next(n for n in model.graph.node if n.op_type == op)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def heads_removed(report):
    return [(g["channels"], g["removed"]) for g in report["groups"] if g["kind"] == "heads"]


def rope_caches(g, head, positions=16):
    """cos/sin caches [positions, head / 2]."""
    angles = np.arange(positions)[:, None] * 0.3 ** (np.arange(head // 2)[None] / (head // 2))
    return g.const(np.cos(angles).astype(np.float32)), g.const(np.sin(angles).astype(np.float32))


def run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


# ---- GroupQueryAttention ---------------------------------------------------------------------

def gqa_model(n=4, kv=2, head=8, packed=False, rotary=False, past=None, present=None, rope_nodes=False,
              head_sink=False, seed=1):
    """x -> MatMul projections (packed or not) -> GroupQueryAttention -> MatMul. ``past``:
    None (no cache), "const" (a 3-step cache as initializers) or "input" (graph inputs);
    ``present``: None (outputs left unused) or "output" (graph outputs). ``rope_nodes``:
    rotary as separate RotaryEmbedding nodes on the 3-D query and key instead of do_rotary."""
    g = Graph(seed=seed)
    x = g.input([1, S, E])
    if packed:
        q = g.op("MatMul", [x, g.weight(E, (n + 2 * kv) * head)])
        ins = [q, "", ""]
    else:
        ins = [g.op("MatMul", [x, g.weight(E, w * head)]) for w in (n, kv, kv)]
    if rope_nodes:
        cos, sin = rope_caches(g, head)
        pos = g.const(np.arange(S, dtype=np.int64).reshape(1, S))
        for k, heads in ((0, n), (1, kv)):
            ins[k] = ms(g, "RotaryEmbedding", [ins[k], pos, cos, sin], num_heads=heads)
    steps = 0
    if past == "const":
        steps = 3
        ins += [g.weight(1, kv, steps, head), g.weight(1, kv, steps, head)]
    elif past == "input":
        steps = 3
        ins += [g.input([1, kv, steps, head], "past_key"), g.input([1, kv, steps, head], "past_value")]
    else:
        ins += ["", ""]
    ins += [g.const(np.array([steps + S - 1], np.int32)), g.const(np.array(steps + S, np.int32))]
    attrs = dict(num_heads=n, kv_num_heads=kv)
    if rotary:
        ins += list(rope_caches(g, head))
        attrs["do_rotary"] = 1
    if head_sink:
        ins += [""] * (11 - len(ins)) + [g.weight(n)]
    y, pk, pv = ms(g, "GroupQueryAttention", ins, n_out=3, **attrs)
    g.output(g.op("MatMul", [y, g.weight(n * head, 3)]))
    if present == "output":
        g.output(pk)
        g.output(pv)
    return g.model(domains=(MS,))


@pytest.mark.parametrize("n,kv", [(4, 2), (8, 2)])
@pytest.mark.parametrize("kw", [{}, {"packed": True}, {"past": "const"}, {"rotary": True, "head": 16},
                                {"rotary": True, "head": 16, "past": "const", "packed": True},
                                {"rope_nodes": True, "head": 16}, {"head_sink": True}])
def test_gqa_prunes_kv_heads_with_their_query_heads(n, kv, kw):
    model = gqa_model(n, kv, **kw)
    head = kw.get("head", 8)
    r = assert_prunes(model, ratio=0.0, heads=0.5, criterion="l1")
    assert heads_removed(r.report) == [(kv, kv // 2)], r.report["groups"]
    assert r.report["blocked_nodes"] == []
    a = attrs_of(r.model, "GroupQueryAttention")
    assert (a["num_heads"], a["kv_num_heads"]) == (n // 2, kv // 2)
    widths = {t.name: list(t.dims) for t in r.model.graph.initializer}
    first = [nd for nd in r.model.graph.node if nd.op_type == "MatMul"]
    if kw.get("packed"):
        assert widths[first[0].input[1]] == [E, (n + 2 * kv) * head // 2]
    else:
        assert [widths[m.input[1]] for m in first[:3]] == [[E, n * head // 2], [E, kv * head // 2],
                                                         [E, kv * head // 2]]
    assert widths[first[-1].input[1]] == [n * head // 2, 3]      # output projection rows
    if kw.get("rope_nodes"):
        ropes = [nd for nd in r.model.graph.node if nd.op_type == "RotaryEmbedding"]
        assert [helper.get_attribute_value(nd.attribute[0]) for nd in ropes] == [n // 2, kv // 2]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, S, E)).astype(np.float32)}
    assert run(r.model, feeds)[0].shape == run(model, feeds)[0].shape == (1, S, 3)


def test_gqa_every_choice_of_kv_head_is_exact():
    """Random choices: whichever key/value head goes, its query heads go with it (the oracle
    would see a query head paired with the wrong key/value head)."""
    model = gqa_model(8, 4, seed=3)
    analysis = spa.analyze(model)
    assert [(g.kind, g.size, analysis.span(g)) for g in analysis.groups] == [("heads", 4, 2)]  # `spa inspect`
    for seed in range(3):
        r = assert_prunes(model, ratio=0.0, heads=0.25, criterion="random", seed=seed)
        assert heads_removed(r.report) == [(4, 1)]


@pytest.mark.parametrize("where", ["past", "present"])
def test_gqa_cache_as_graph_input_or_output_pins_kv_heads(where):
    """A key/value cache that is a graph input (or output) keeps its shape, so the key/value
    heads, and with them the query heads, stay whole; the report says why."""
    model = gqa_model(4, 2, **({"past": "input"} if where == "past" else {"present": "output"}))
    analysis = spa.analyze(model)
    assert not analysis.dep.blocked_nodes
    assert [g for g in analysis.groups if g.kind == "heads"] == []
    name = "past_key" if where == "past" else None
    expected = f"graph input {name!r}" if name else "graph output 'groupqueryattention"
    assert any(expected in g.blocked for g in analysis.blocked), [g.blocked for g in analysis.blocked]
    r = spa.prune(model, ratio=0.0, heads=0.5, criterion="l1", verify=True)
    assert heads_removed(r.report) == []
    assert attrs_of(r.model, "GroupQueryAttention")["kv_num_heads"] == 2
    assert any(expected in b["reason"] for b in r.report["blocked"]), r.report["blocked"]


def test_gqa_head_dims_stay_with_the_reason():
    """One head size for query, key and value, rotated in pairs: ``head_dims`` finds nothing."""
    model = gqa_model(4, 2, head=16, rotary=True)
    analysis = spa.analyze(model, attention="head-dims")
    assert [g for g in analysis.groups if g.kind == "head-dims"] == []
    fixed = set(analysis.dep.fixed_reason.values())
    assert any("share one head size" in f and "do_rotary" in f for f in fixed), fixed
    r = spa.prune(model, ratio=0.0, head_dims=0.5, criterion="l1", round_to=1, verify=True)
    assert r.report["verify"]["ok"]
    assert sum(g["removed"] for g in r.report["groups"]) == 0


# ---- RotaryEmbedding (com.microsoft and opset 23) --------------------------------------------

def rotary_projection(domain: str, n: int, head: int, seed: int):
    """x [1, S, E] -> MatMul to n heads of ``head`` -> RotaryEmbedding (3-D, num_heads), of
    onnxruntime's domain (position ids second) or opset 23's (position ids last)."""
    g = Graph(opset=23, seed=seed)
    q = g.op("MatMul", [g.input([1, S, E]), g.weight(E, n * head)])
    cos, sin = rope_caches(g, head)
    pos = g.const(np.arange(S, dtype=np.int64).reshape(1, S))
    r = (ms(g, "RotaryEmbedding", [q, pos, cos, sin], num_heads=n) if domain else
         g.op("RotaryEmbedding", [q, cos, sin, pos], num_heads=n))
    return g, r


@pytest.mark.parametrize("domain", [MS, ""])
def test_rotary_embedding_3d_rewrites_num_heads_and_keeps_head_dims(domain):
    """x -> MatMul -> RotaryEmbedding (3-D, num_heads) -> Reshape/Transpose into heads ->
    scores with a second projection -> MatMul: heads go, num_heads follows, head dims stay."""
    n, head = 4, 16
    g, r = rotary_projection(domain, n, head, seed=4)
    shape = g.const(np.array([1, S, n, head], np.int64))
    heads = g.op("Transpose", [g.op("Reshape", [r, shape])], perm=[0, 2, 1, 3])
    a = g.op("Attention", [heads, heads, heads])
    y = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.const(np.array([1, S, n * head], np.int64))])
    g.output(g.op("MatMul", [y, g.weight(n * head, 3)]))
    model = g.model(ir_version=10, domains=(MS,) if domain else ())
    out = assert_prunes(model, ratio=0.0, heads=0.5, criterion="l1")
    assert heads_removed(out.report) == [(n, n // 2)]
    assert attrs_of(out.model, "RotaryEmbedding")["num_heads"] == n // 2
    analysis = spa.analyze(model, attention="head-dims")
    assert any("rotates pairs of head dims" in f for f in analysis.dep.fixed_reason.values())
    assert [g for g in analysis.groups if g.kind == "head-dims"] == []


# ---- Attention (opset 23) ----------------------------------------------------------------------

def onnx_attention_model(n=4, kv=2, head=8, v_head=8, rank=4, rope=False, mask=False, past=False, seed=5):
    """x -> Q/K/V projections -> (Reshape, Transpose into heads and RotaryEmbedding when 4-D)
    -> Attention -> back to [B, S, heads x v_head] -> MatMul."""
    g = Graph(opset=23, seed=seed)
    x = g.input([1, S, E])
    q, k, v = (g.op("MatMul", [x, g.weight(E, h * d)]) for h, d in ((n, head), (kv, head), (kv, v_head)))
    attrs = {"is_causal": 1}
    if rank == 4:
        def split(t, h, d):
            return g.op("Transpose", [g.op("Reshape", [t, g.const(np.array([1, S, h, d], np.int64))])],
                        perm=[0, 2, 1, 3])
        q, k, v = split(q, n, head), split(k, kv, head), split(v, kv, v_head)
        if rope:
            cos, sin = rope_caches(g, head)
            pos = g.const(np.arange(S, dtype=np.int64).reshape(1, S))
            q, k = (g.op("RotaryEmbedding", [t, cos, sin, pos]) for t in (q, k))
    else:
        attrs.update(q_num_heads=n, kv_num_heads=kv)
    ins = [q, k, v]
    if mask or past:
        ins.append(g.weight(1, n, S, S + (2 if past else 0)) if mask else "")
    if past:
        ins += [g.weight(1, kv, 2, head), g.weight(1, kv, 2, v_head)]
    y = g.op("Attention", ins, **attrs) if not past else \
        g.op("Attention", ins, n_out=3, **attrs)[0]   # onnxruntime: a past needs the present outputs
    if rank == 4:
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]),
                             g.const(np.array([1, S, n * v_head], np.int64))])
    g.output(g.op("MatMul", [y, g.weight(n * v_head, 3)]))
    return g.model(ir_version=10)


@pytest.mark.parametrize("n,kv", [(4, 2), (8, 2), (4, 4)])
@pytest.mark.parametrize("kw", [{"rank": 4}, {"rank": 3}, {"rank": 4, "rope": True, "head": 16},
                                {"rank": 4, "mask": True, "past": True}, {"rank": 3, "mask": True},
                                {"rank": 3, "past": True, "v_head": 4}])
def test_onnx_attention_prunes_kv_heads_with_their_query_heads(n, kv, kw):
    model = onnx_attention_model(n, kv, **kw)
    r = assert_prunes(model, ratio=0.0, heads=0.5, criterion="l1")
    assert heads_removed(r.report) == [(kv, kv // 2)], r.report["groups"]
    assert r.report["blocked_nodes"] == []
    if kw["rank"] == 3:
        a = attrs_of(r.model, "Attention")
        assert (a["q_num_heads"], a["kv_num_heads"]) == (n // 2, kv // 2)


@pytest.mark.parametrize("rank", [3, 4])
def test_onnx_attention_head_dims_prune_value_dims_only(rank):
    """The value head size may shrink (the same dims of every head); the query/key head size
    sets the scale and stays."""
    model = onnx_attention_model(4, 2, rank=rank)
    r = spa.prune(model, ratio=0.0, head_dims=0.5, criterion="l1", round_to=1, verify=True)
    assert r.report["verify"]["ok"], r.report["verify"]
    dims = [(g["channels"], g["removed"]) for g in r.report["groups"] if g["kind"] == "head-dims"]
    assert dims == [(8, 4)], r.report["groups"]
    widths = {t.name: list(t.dims) for t in r.model.graph.initializer}
    proj = [nd for nd in r.model.graph.node if nd.op_type == "MatMul"]
    assert [widths[m.input[1]][1] for m in proj[:3]] == [32, 16, 8]


@pytest.mark.parametrize("domain", [MS, ""])
def test_rotary_embedding_alone_keeps_head_dims(domain):
    """Rotary output read by a MatMul (nothing else fixes the head dims): ``head_dims`` finds
    none, since the cos/sin cache pairs them; whole heads still go, with ``num_heads``."""
    n, head = 4, 16
    g, r = rotary_projection(domain, n, head, seed=6)
    g.output(g.op("MatMul", [r, g.weight(n * head, 3)]))
    model = g.model(ir_version=10, domains=(MS,) if domain else ())
    dims = spa.prune(model, ratio=0.0, head_dims=0.5, criterion="l1", round_to=1, verify=True)
    assert dims.report["verify"]["ok"] and sum(grp["removed"] for grp in dims.report["groups"]) == 0
    out = assert_prunes(model, ratio=0.0, heads=0.5, criterion="l1")
    assert heads_removed(out.report) == [(n, n // 2)]
    assert attrs_of(out.model, "RotaryEmbedding")["num_heads"] == n // 2
