"""Grouped-query attention as the exporters write it unfused: transformers' repeat_kv
(Unsqueeze -> Expand -> Reshape) on a one-layer LLaMA with a symbolic batch and sequence.

The legacy exporter computes the Expand's shape from the tensors' shapes:
Where(Equal(v, -1), ones, v) with v = Reshape(Concat(batch, kv, n_rep, seq, head), [-1]);
the Reshape after it multiplies the key/value heads read from a shape by n_rep. Whole
key/value heads go with their query heads (4 query / 2 key/value heads); where the repeat
factor is the larger one (8 / 2) the same query heads go from every group, the key/value
heads stay. Either way the pruned model must run at any batch and sequence and pass the
oracle (the Expand's n_rep rewritten, the Reshape's head count made a constant)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spa

torch = pytest.importorskip("torch", reason="needs torch (test extras)")
tfzoo = pytest.importorskip("transformers_zoo", reason="needs transformers (test extras)")

HIDDEN, VOCAB = 64, 100


def export(zoo_dir, exporter: str, n_q: int, n_kv: int, layers: int = 1):
    """input_ids [batch, sequence] -> logits, both dims symbolic; cached in ``zoo_dir``."""
    path = zoo_dir / f"llama{layers}-{n_q}q{n_kv}kv-{exporter}-symbolic.onnx"
    if path.exists():
        return path
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=n_q, num_key_value_heads=n_kv,
                         num_hidden_layers=layers, intermediate_size=128, vocab_size=VOCAB,
                         max_position_embeddings=64, use_cache=False, attn_implementation="eager")
    model = tfzoo._CausalLM(LlamaForCausalLM(config)).eval()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    tmp = path.with_suffix(".tmp")
    kw = dict(input_names=["input_ids"], output_names=["output"])
    with tfzoo._quiet():
        if exporter == "legacy":
            torch.onnx.export(model, (ids,), str(tmp), dynamo=False, opset_version=17, do_constant_folding=True,
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}}, **kw)
        else:
            dims = {0: torch.export.Dim("batch", max=16), 1: torch.export.Dim("sequence", max=64)}
            torch.onnx.export(model, (ids,), str(tmp), dynamo=True, external_data=False, opset_version=18,
                              optimize=True, dynamic_shapes={"input_ids": dims}, **kw)
    tmp.replace(path)
    return path


def projection_widths(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    """Shapes of the weights of the MatMuls, sorted (q, k, v, o, MLP and head projections)."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return sorted(inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)


def logits(model: onnx.ModelProto, shape) -> np.ndarray:
    ids = np.random.default_rng(1).integers(3, VOCAB, shape)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_whole_kv_heads_go_with_their_query_heads(zoo_dir, exporter):
    path = export(zoo_dir, exporter, 4, 2)
    analysis = spa.analyze(path)
    assert [(g.size, analysis.span(g)) for g in analysis.groups if g.kind == "heads"] == [(2, 2)]
    r = spa.prune(path, ratio=0.0, heads=0.5, criterion="l1", verify=True)
    assert r.report["verify"]["ok"], r.report["verify"]
    assert [(g["channels"], g["removed"]) for g in r.report["groups"] if g["kind"] == "heads"] == [(2, 1)]
    head = HIDDEN // 4
    before = projection_widths(onnx.load(path))
    assert (HIDDEN, 2 * head) in before and (HIDDEN, HIDDEN) in before
    # q [64, 4 x 16] -> [64, 2 x 16], k and v [64, 2 x 16] -> [64, 16], o [4 x 16, 64] -> [2 x 16, 64]
    expected = sorted([w for w in before if w not in ((HIDDEN, HIDDEN), (HIDDEN, 2 * head))]
                      + [(HIDDEN, 2 * head), (2 * head, HIDDEN), (HIDDEN, head), (HIDDEN, head)])
    assert projection_widths(r.model) == expected
    for shape in [(1, 5), (3, 11)]:   # not the shapes it was analyzed and verified at
        assert logits(r.model, shape).shape == (*shape, VOCAB)


def test_query_heads_of_every_group_when_the_repeat_carries(zoo_dir):
    """8 query heads on 2 key/value heads: a channel is one query head position in every
    group (the repeat factor, 4, is the larger factor), so n_rep itself shrinks: the
    Expand's computed shape loses it and the key/value projections keep their width."""
    path = export(zoo_dir, "legacy", 8, 2)
    r = spa.prune(path, ratio=0.0, heads=0.5, criterion="l1", verify=True)
    assert r.report["verify"]["ok"], r.report["verify"]
    assert [(g["channels"], g["removed"]) for g in r.report["groups"] if g["kind"] == "heads"] == [(4, 2)]
    head = HIDDEN // 8
    widths = projection_widths(r.model)
    assert widths.count((HIDDEN, 2 * head)) == 2          # k and v: both key/value heads kept
    assert (HIDDEN, 4 * head) in widths and (4 * head, HIDDEN) in widths     # q and o: 4 of 8 heads
    assert logits(r.model, (2, 7)).shape == (2, 7, VOCAB)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_layers_that_share_a_size_vector_lose_different_heads(zoo_dir, exporter):
    """The dynamo exporter computes repeat_kv's Expand shape once for all layers: one layer
    losing a key/value head and the other none needs a vector per layer (normalize splits it)."""
    path = export(zoo_dir, exporter, 4, 2, layers=2)
    # one of the four key/value heads, ranked across both layers: one layer loses it
    r = spa.prune(path, ratio=0.0, heads=0.25, global_rank=True, criterion="l1", verify=True)
    assert r.report["verify"]["ok"], r.report["verify"]
    assert sorted(g["removed"] for g in r.report["groups"] if g["kind"] == "heads") == [0, 1]
    widths = projection_widths(r.model)
    head = HIDDEN // 4
    assert (HIDDEN, head) in widths and (HIDDEN, 2 * head) in widths    # layer 0's k / v, layer 1's
    for shape in [(1, 5), (3, 11)]:
        assert logits(r.model, shape).shape == (*shape, VOCAB)
