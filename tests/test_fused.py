"""onnxruntime's fused transformer ops (spa/graph/rules/fused.py): per-rule oracle tests on
small com.microsoft graphs, differential tests of the skip-norms against their decomposition,
and BERT / GPT-2 as onnxruntime's transformer optimizer writes them."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import spa
from graphs import Graph, assert_prunes

MS = "com.microsoft"


def ms(g, op, inputs, n_out=1, **attrs):
    outs = [g._name(op.lower()) for _ in range(n_out)]
    g.nodes.append(helper.make_node(op, list(inputs), outs, domain=MS, name=g._name("n_" + op), **attrs))
    return outs[0] if n_out == 1 else outs


def run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def attr(model, op, name):
    node = next(n for n in model.graph.node if n.op_type == op)
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


# ---- skip-normalizations -------------------------------------------------------------------

H = 16


def _read_out(g, y, also=None):
    """y (and the pre-norm sum ``also``, when the fused op outputs it) read by MatMuls: the
    hidden axis is contracted, so pruning it is measurable."""
    out = g.op("MatMul", [y, g.weight(H, 3)])
    if also is not None:
        out = g.op("Add", [out, g.op("MatMul", [also, g.weight(H, 3)])])
    g.output(out)
    return g.model(domains=(MS,))


def skip_norm_model(fused: bool, simplified: bool = False, sum_output: bool = False, seed=0):
    """x -> two MatMuls (input, skip) -> SkipLayerNorm (+bias) -> MatMul; ``fused=False``
    writes the same function with standard ops (Add, LayerNormalization or the RMSNorm
    decomposition), which have trusted rules."""
    g = Graph(seed=seed)
    x = g.input([1, 4, 6])
    h, skip = g.op("MatMul", [x, g.weight(6, H)]), g.op("MatMul", [x, g.weight(6, H)])
    gamma = g.weight(H)
    beta = None if simplified else g.weight(H)
    bias = g.weight(H)
    if fused:
        op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
        inputs = [h, skip, gamma] + ([] if simplified else [beta]) + [bias]
        outs = ms(g, op, inputs, n_out=4 if sum_output else 1, epsilon=1e-5)
        y, s = (outs[0], outs[3]) if sum_output else (outs, None)
    else:
        s = g.op("Add", [g.op("Add", [h, skip]), bias])
        if simplified:
            ms_ = g.op("ReduceMean", [g.op("Mul", [s, s])], axes=[-1], keepdims=1)
            y = g.op("Mul", [g.op("Div", [s, g.op("Sqrt", [g.op("Add", [ms_, g.const(np.float32(1e-5))])])]), gamma])
        else:
            y = g.op("LayerNormalization", [s, gamma, beta], axis=-1, epsilon=1e-5)
    return _read_out(g, y, s if sum_output else None)


@pytest.mark.parametrize("simplified", [False, True])
@pytest.mark.parametrize("sum_output", [False, True])
def test_skip_layer_norm_keeps_hidden_whole_by_default(simplified, sum_output):
    """The normalized axis mixes: without ``hidden`` it is left whole, and says why."""
    model = skip_norm_model(True, simplified, sum_output)
    analysis = spa.analyze(model)
    assert not analysis.dep.blocked_nodes
    assert analysis.groups == []
    assert any("mixes this axis" in g.blocked for g in analysis.blocked)


@pytest.mark.parametrize("simplified", [False, True])
@pytest.mark.parametrize("sum_output", [False, True])
def test_skip_layer_norm_hidden_matches_its_decomposition(simplified, sum_output):
    """Under ``hidden`` the fused node prunes exactly like Add + LayerNorm (or the RMSNorm
    ops) written out: the same channels go, and the pruned models compute the same."""
    fused, plain = (skip_norm_model(f, simplified, sum_output) for f in (True, False))
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(fused, feeds)[0], run(plain, feeds)[0], rtol=1e-4, atol=1e-4)
    results = [spa.prune(m, ratio=0.0, hidden=0.25, criterion="l1", round_to=1, verify=True)
               for m in (fused, plain)]
    for r in results:
        hidden = [g for g in r.report["groups"] if g["kind"] == "hidden"]
        assert [g["removed"] for g in hidden] == [4], r.report["groups"]
        assert r.report["verify"]["exact"] is False and r.report["verify"]["finite"]
        onnx.checker.check_model(r.model)
    np.testing.assert_allclose(run(results[0].model, feeds)[0], run(results[1].model, feeds)[0],
                               rtol=1e-4, atol=1e-4)
    gamma = [n for n in results[0].model.graph.node if n.domain == MS][0].input[2]
    assert [t.dims for t in results[0].model.graph.initializer if t.name == gamma] == [[H - 4]]


def rms_model(fused: bool):
    g = Graph(seed=3)
    x = g.input([1, 4, 6])
    h = g.op("MatMul", [x, g.weight(6, H)])
    gamma = g.weight(H)
    if fused:
        y = g.op("SimplifiedLayerNormalization", [h, gamma], axis=-1, epsilon=1e-5)
    else:
        ms_ = g.op("ReduceMean", [g.op("Mul", [h, h])], axes=[-1], keepdims=1)
        y = g.op("Mul", [g.op("Div", [h, g.op("Sqrt", [g.op("Add", [ms_, g.const(np.float32(1e-5))])])]), gamma])
    g.output(g.op("MatMul", [y, g.weight(H, 3)]))
    return g.model(domains=(MS,))   # onnx's checker does not know onnxruntime's op


def test_simplified_layer_norm_hidden_matches_its_decomposition():
    """onnxruntime's RMSNorm op (registered in the default domain) prunes like its ops."""
    fused, plain = rms_model(True), rms_model(False)
    assert spa.analyze(fused).groups == []
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 6)).astype(np.float32)}
    results = [spa.prune(m, ratio=0.0, hidden=0.25, criterion="l1", round_to=1, verify=True)
               for m in (fused, plain)]
    assert [[g["removed"] for g in r.report["groups"] if g["kind"] == "hidden"] for r in results] == [[4], [4]]
    np.testing.assert_allclose(run(results[0].model, feeds)[0], run(results[1].model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def embed_model(fused: bool, with_sum: bool = False):
    """ids -> word + position (+ segment) embeddings -> LayerNorm -> MatMul."""
    g = Graph(seed=6)
    ids = g.input([1, S], "ids", onnx.TensorProto.INT32)
    seg = g.input([1, S], "seg", onnx.TensorProto.INT32)
    word, pos, segment, gamma, beta = g.weight(10, H), g.weight(S, H), g.weight(2, H), g.weight(H), g.weight(H)
    if fused:
        outs = ms(g, "EmbedLayerNormalization", [ids, seg, word, pos, segment, gamma, beta],
                  n_out=3 if with_sum else 2, epsilon=1e-5)   # mask_index is required
        y, total = outs[0], (outs[2] if with_sum else None)
    else:
        positions = g.const(np.arange(S, dtype=np.int64).reshape(1, S))
        total = g.op("Add", [g.op("Add", [g.op("Gather", [word, ids]), g.op("Gather", [pos, positions])]),
                             g.op("Gather", [segment, seg])])
        y = g.op("LayerNormalization", [total, gamma, beta], axis=-1, epsilon=1e-5)
    return _read_out(g, y, total if with_sum else None)


@pytest.mark.parametrize("with_sum", [False, True])
def test_embed_layer_norm_hidden_matches_its_decomposition(with_sum):
    fused, plain = embed_model(True, with_sum), embed_model(False, with_sum)
    assert spa.analyze(fused).groups == [] and not spa.analyze(fused).dep.blocked_nodes
    rng = np.random.default_rng(1)
    feeds = {"ids": rng.integers(0, 10, (1, S)).astype(np.int32), "seg": rng.integers(0, 2, (1, S)).astype(np.int32)}
    np.testing.assert_allclose(run(fused, feeds)[0], run(plain, feeds)[0], rtol=1e-4, atol=1e-4)
    results = [spa.prune(m, ratio=0.0, hidden=0.25, criterion="l1", round_to=1, verify=True)
               for m in (fused, plain)]
    assert [[g["removed"] for g in r.report["groups"] if g["kind"] == "hidden"] for r in results] == [[4], [4]]
    np.testing.assert_allclose(run(results[0].model, feeds)[0], run(results[1].model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


# ---- fused attention -----------------------------------------------------------------------

D, N, S = 16, 4, 5


def attention_model(qkv=None, mask=False, unidirectional=0, attention_bias=False, bias=True):
    """x -> MatMul -> Attention(packed QKV, N heads) -> output projection MatMul."""
    g = Graph(seed=2)
    x = g.input([1, S, 8])
    h = g.op("MatMul", [x, g.weight(8, D)])
    widths = qkv or [D, D, D]
    inputs = [h, g.weight(D, sum(widths)), g.weight(sum(widths)) if bias else ""]
    if mask or attention_bias:
        inputs.append(g.const(np.array([S], np.int32)) if mask else "")
    if attention_bias:
        inputs += ["", g.weight(1, N, S, S)]
    attrs = dict(num_heads=N, unidirectional=unidirectional)
    if qkv:
        attrs["qkv_hidden_sizes"] = list(qkv)
    a = ms(g, "Attention", inputs, **attrs)
    g.output(g.op("MatMul", [a, g.weight(widths[2], 3)]))
    return g.model(domains=(MS,))


@pytest.mark.parametrize("kw", [{}, {"mask": True}, {"unidirectional": 1}, {"qkv": [16, 16, 8]},
                                {"attention_bias": True}, {"bias": False}])
def test_attention_prunes_whole_heads(kw):
    model = attention_model(**kw)
    r = assert_prunes(model, ratio=0.0, heads=0.5, criterion="l1")
    heads = [g for g in r.report["groups"] if g["kind"] == "heads"]
    assert [(g["channels"], g["removed"]) for g in heads] == [(N, N // 2)]
    assert attr(r.model, "Attention", "num_heads") == N // 2
    widths = kw.get("qkv") or [D, D, D]
    w = next(n for n in r.model.graph.node if n.op_type == "Attention").input[1]
    assert [list(t.dims) for t in r.model.graph.initializer if t.name == w] == [[D, sum(widths) // 2]]
    if "qkv" in kw:
        assert attr(r.model, "Attention", "qkv_hidden_sizes") == [v // 2 for v in widths]


def test_attention_macs_count_its_projection():
    """MACs: the packed QKV projection counts (B*S*D*(q+k+v)); the score products do not."""
    r = assert_prunes(attention_model(), ratio=0.0, heads=0.5, criterion="l1")
    proj = S * D * 3 * D
    assert r.report["before"]["macs"] == S * 8 * D + proj + S * D * 3
    assert r.report["after"]["macs"] == S * 8 * D + proj // 2 + S * D // 2 * 3


def test_attention_heads_are_the_ones_scored():
    """Removing heads removes their Q, K and V columns together: the pruned model equals the
    original with those heads' output columns zeroed (the oracle), for every choice."""
    model = attention_model()
    for seed in range(3):
        assert_prunes(model, ratio=0.0, heads=0.25, criterion="random", seed=seed)


def test_attention_head_dims_prune_value_dims_only():
    """``head_dims``: query/key head sizes stay (they set the scale); the value head size
    shrinks in every head, written into ``qkv_hidden_sizes``; the heads stay whole."""
    model = attention_model()
    r = spa.prune(model, ratio=0.0, head_dims=0.5, criterion="l1", round_to=1, verify=True)
    assert r.report["verify"]["ok"], r.report["verify"]
    assert attr(r.model, "Attention", "num_heads") == N
    assert attr(r.model, "Attention", "qkv_hidden_sizes") == [D, D, D // 2]


def mha_model(bias=True):
    g = Graph(seed=4)
    x = g.input([1, S, 8])
    q, k, v = (g.op("MatMul", [x, g.weight(8, D)]) for _ in range(3))
    inputs = [q, k, v] + ([g.weight(3 * D)] if bias else [])
    a = ms(g, "MultiHeadAttention", inputs, num_heads=N)
    g.output(g.op("MatMul", [a, g.weight(D, 3)]))
    return g.model(domains=(MS,))


@pytest.mark.parametrize("bias", [True, False])
def test_multi_head_attention_prunes_whole_heads(bias):
    model = mha_model(bias)
    r = assert_prunes(model, ratio=0.0, heads=0.5, criterion="l1")
    heads = [g for g in r.report["groups"] if g["kind"] == "heads"]
    assert [(g["channels"], g["removed"]) for g in heads] == [(N, N // 2)]
    assert attr(r.model, "MultiHeadAttention", "num_heads") == N // 2


def test_attention_output_as_graph_output_stays_whole():
    g = Graph()
    x = g.input([1, S, D])
    g.output(ms(g, "Attention", [x, g.weight(D, 3 * D), g.weight(3 * D)], num_heads=N))
    analysis = spa.analyze(g.model(domains=(MS,)))
    assert not analysis.dep.blocked_nodes
    assert analysis.groups == []


def test_attention_block_hidden_width():
    """A residual block as the optimizer writes it: the hidden width runs through the
    Attention weight's rows, the output projection and the skip-norm (``hidden``, inexact);
    heads and hidden prune together."""
    g = Graph(seed=5)
    x = g.input([1, S, 8])
    h = g.op("MatMul", [x, g.weight(8, D)])
    a = ms(g, "Attention", [h, g.weight(D, 3 * D), g.weight(3 * D)], num_heads=N)
    y = ms(g, "SkipLayerNormalization", [g.op("MatMul", [a, g.weight(D, D)]), h, g.weight(D), g.weight(D),
                                         g.weight(D)])
    g.output(g.op("MatMul", [y, g.weight(D, 3)]))
    model = g.model(domains=(MS,))
    r = spa.prune(model, ratio=0.0, heads=0.5, hidden=0.25, criterion="l1", round_to=1, verify=True)
    kinds = {}
    for grp in r.report["groups"]:
        kinds[grp["kind"]] = kinds.get(grp["kind"], 0) + grp["removed"]
    assert kinds.get("heads") == N // 2 and kinds.get("hidden") == D // 4, r.report["groups"]
    assert r.report["verify"]["finite"]
    w = next(n for n in r.model.graph.node if n.op_type == "Attention").input[1]
    assert [list(t.dims) for t in r.model.graph.initializer if t.name == w] == [[D - D // 4, 3 * D // 2]]
    feeds = {"x": np.ones((1, S, 8), np.float32)}
    assert run(r.model, feeds)[0].shape == (1, S, 3)


# ---- onnxruntime's transformer optimizer on the zoo's BERT and GPT-2 -------------------------

def optimized(family, zoo_dir):
    """The tiny HF model exported with dynamic batch/sequence (the form the optimizer fuses
    attention in), then optimized; cached in ``zoo_dir``."""
    import torch
    tfzoo = pytest.importorskip("transformers_zoo")
    from onnxruntime.transformers import optimizer
    out = zoo_dir / f"{family}-ortopt.onnx"
    if out.exists():
        return out
    model, inputs = tfzoo.build(family)
    names = list(inputs)
    src = zoo_dir / f"{family}-legacy-dynamic.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "output"]}
    torch.onnx.export(model, tuple(inputs.values()), str(src), input_names=names, output_names=["output"],
                      opset_version=17, dynamic_axes=axes, dynamo=False)
    opt = optimizer.optimize_model(str(src), model_type=family, num_heads=4, hidden_size=64)
    tmp = zoo_dir / f"{family}-ortopt.tmp.onnx"
    opt.save_model_to_file(str(tmp))
    tmp.rename(out)
    return out


@pytest.mark.parametrize("family,fused", [
    ("bert", {"Attention", "SkipLayerNormalization", "BiasGelu"}),
    ("gpt2", {"SkipLayerNormalization", "FastGelu"})])
def test_optimizer_output_prunes_heads_and_mlp(zoo_dir, family, fused):
    path = optimized(family, zoo_dir)
    model = onnx.load(path)
    assert fused <= {n.op_type for n in model.graph.node if n.domain == MS}
    shapes = {i.name: [1, 8] for i in model.graph.input}
    # symbolic batch and sequence: spa picks the probe sizes and verifies at a second one (the
    # [1, 512] position table cut to the sequence length must stay whole for that)
    r = spa.prune(path, heads=0.5, mlp=0.5, round_to=1, verify=True)
    rep = r.report
    assert rep["verify"]["ok"], rep["verify"]
    removed = {}
    for g in rep["groups"]:
        removed[g["kind"]] = removed.get(g["kind"], 0) + g["removed"]
    assert removed.get("heads", 0) == 2 * 2, rep["groups"]          # 2 of 4 heads in each layer
    assert removed.get("channels", 0) >= 2 * 64, rep["groups"]      # half of the 128 MLP neurons
    assert rep["after"]["macs"] < 0.6 * rep["before"]["macs"]   # counts fused Attention's projection
    assert rep["blocked_nodes"] == [], rep["blocked_nodes"]   # EmbedLayerNormalization too
    if "Attention" in fused:
        assert {attr(r.model, "Attention", "num_heads")} == {2}
    if family == "gpt2":   # the hidden width through the skip-norms, inexact
        h = spa.prune(path, ratio=0.0, hidden=0.25, round_to=1, verify=True, input_shapes=shapes)
        assert [g["removed"] for g in h.report["groups"] if g["kind"] == "hidden"] == [16]
        assert h.report["verify"]["exact"] is False and h.report["verify"]["finite"]


def bert_opt_level_1(zoo_dir):
    """Issue 26's recipe, smaller: a random BERT (transformers' BertModel, pooler included: two
    outputs) exported by the dynamo exporter, then onnxruntime's transformer optimizer at
    opt_level 1 (SkipLayerNormalization and Gelu fused, attention not), which first runs
    onnxruntime's own basic optimizations and saves their result; cached in ``zoo_dir``."""
    import torch
    pytest.importorskip("transformers_zoo")   # torchvision's ops, which transformers needs
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import BertConfig, BertModel
    out = zoo_dir / "bert-dynamo-ortopt1.onnx"
    if out.exists():
        return out
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                                 vocab_size=100, max_position_embeddings=64)).eval()
    ids = torch.randint(3, 100, (1, 8))
    src = zoo_dir / "bert-dynamo-pooler.onnx"
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(src), input_names=["input_ids", "attention_mask"],
                      dynamo=True, verbose=False)
    opt = optimize_model(str(src), model_type="bert", num_heads=4, hidden_size=128, opt_level=1, use_gpu=False)
    tmp = zoo_dir / "bert-dynamo-ortopt1.tmp.onnx"
    opt.save_model_to_file(str(tmp))
    tmp.rename(out)
    return out


def test_optimizer_at_opt_level_1_output_prunes_and_loads(zoo_dir, tmp_path):
    """Refused before: onnxruntime's default session cannot load the optimizer's file (it
    saved initializers under names onnxruntime generates again: spa.loading.model.ORT_GENERATED), and
    spa wrote no model that a default session cannot load. spa renames them: the pruned model
    loads by default and passes the oracle on both outputs."""
    path = bert_opt_level_1(zoo_dir)
    from spa.loading.model import ORT_GENERATED
    model = onnx.load(path)
    assert "SkipLayerNormalization" in {n.op_type for n in model.graph.node if n.domain == MS}
    assert "Gelu" in {n.op_type for n in model.graph.node} and len(model.graph.output) == 2
    generated = {t.name for t in model.graph.initializer if ORT_GENERATED.fullmatch(t.name)}
    for ratio in (0.3, 0.5):
        r = spa.prune(path, ratio=ratio)
        rep = r.report
        assert rep["verify"]["ok"], rep["verify"]
        assert rep["after"]["macs"] < (0.85 if ratio == 0.3 else 0.65) * rep["before"]["macs"]
        out = r.save(tmp_path / f"p{ratio}.onnx")
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert not generated & {t.name for t in onnx.load(out).graph.initializer}
