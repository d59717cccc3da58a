"""im2col against onnxruntime's Conv, and calibration data validation."""

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph
from spa.score.data import Calibration, im2col
from spa.runtime import session


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "pads": [0, 1, 1, 0]}, {"dilations": [2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
])
def test_im2col_reproduces_conv(attrs):
    g = Graph()
    x = g.input([2, 3, 7, 6])
    w = g.weight(4, 3, 3, 2)
    y = g.op("Conv", [x, w], **attrs)
    g.output(y)
    model = g.model()
    xv = np.random.default_rng(0).standard_normal((2, 3, 7, 6)).astype(np.float32)
    want = session(model).run(None, {"x": xv})[0]
    wv = onnx.numpy_helper.to_array(model.graph.initializer[0])
    rows = im2col(xv.astype(np.float64), model.graph.node[0], wv.shape)
    got = rows @ wv.reshape(4, -1).T                          # (n*positions, out)
    got = got.reshape(2, *want.shape[2:], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)


def _model():
    g = Graph()
    x = g.input(["N", 3, 6, 6])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 4))
    return g.model()


def test_calibration_errors():
    model = _model()
    shapes = {"x": (1, 3, 6, 6)}
    rng = np.random.default_rng(0)
    with pytest.raises(spa.SpaError, match="lacks input"):
        Calibration({"image": rng.standard_normal((4, 3, 6, 6))}).batches(model, shapes)
    with pytest.raises(spa.SpaError, match="per-sample shape"):
        Calibration({"x": rng.standard_normal((4, 3, 5, 6))}).batches(model, shapes)
    with pytest.raises(spa.SpaError, match="at least 2"):
        Calibration({"x": rng.standard_normal((1, 3, 6, 6))}).batches(model, shapes)
    batches = Calibration({"x": rng.standard_normal((10, 3, 6, 6))}, batch=4).batches(model, shapes)
    assert [len(b["x"]) for b in batches] == [4, 4, 2] and batches[0]["x"].dtype == np.float32


def test_synthetic_images_are_dead_leaves():
    """Image-like synthetic inputs are opaque shapes with edges (mostly flat, some jumps), of
    unit variance per image; other inputs stay Gaussian."""
    from spa.score.data import _natural_noise
    rng = np.random.default_rng(0)
    x = _natural_noise(rng, (4, 3, 32, 32))
    step = np.abs(np.diff(x, axis=3))
    assert (step < 1e-9).mean() > 0.6 and (step > 0.1).mean() > 0.02
    np.testing.assert_allclose(x.std(axis=(2, 3)), 1.0, rtol=1e-6)
    flat = _natural_noise(rng, (4, 16))
    assert (np.abs(np.diff(flat, axis=1)) < 1e-9).mean() == 0


def _token_model(mix: bool, length=8):
    """ids [N, 8] (or ``length``) -> embedding -> MatMul -> Relu -> MatMul -> logits over the
    same 10 tokens, which put all weight on the next token id (v -> v+1 mod 10); ``mix`` adds
    the sequence mean to every position, so later tokens change earlier logits."""
    g = Graph()
    ids = g.input(["N", length], name="ids", dtype=onnx.TensorProto.INT64)
    table = np.zeros((10, 16), np.float32)
    table[np.arange(10), np.arange(10)] = 5.0
    a = np.zeros((16, 32), np.float32)
    a[np.arange(16), np.arange(16)] = 1.0
    b = np.zeros((32, 10), np.float32)
    b[np.arange(10), (np.arange(10) + 1) % 10] = 4.0
    x = g.op("Gather", [g.const(table), ids])
    if mix:
        x = g.op("Add", [x, g.op("ReduceMean", [x], axes=[1], keepdims=1)])
    h = g.op("Relu", [g.op("MatMul", [x, g.const(a)])])
    g.output(g.op("MatMul", [h, g.const(b)]))
    return g.model()


def test_decoder_language_models_write_their_own_calibration_text():
    cal = Calibration(samples=64)
    (feeds,) = cal.batches(_token_model(mix=False), {"ids": [1, 8]})
    ids = feeds["ids"]
    assert cal.generated and ids.shape == (64, 8)
    (long,) = Calibration(samples=512).batches(_token_model(mix=False), {"ids": [1, 8]})
    assert long["ids"].shape == (256, 8)                      # 2048 positions: what the statistics sample
    assert (ids[:, 1:] == (ids[:, :-1] + 1) % 10).mean() > 0.99
    assert len(set(ids[:, 0].tolist())) > 3      # first tokens drawn from the model's average prediction
    mixed = Calibration(samples=64)
    batches = mixed.batches(_token_model(mix=True), {"ids": [1, 8]})
    assert not mixed.generated and sum(len(b["ids"]) for b in batches) == 64
    r = spa.prune(_token_model(mix=False), ratio=0.5, input_shapes={"ids": [1, 8]}, round_to=1)
    assert r.report["data"]["hessian_source"] == "text the model wrote itself (data-free)"
    assert r.report["verify"]["ok"]


@pytest.mark.parametrize("mix", [False, True])
def test_a_language_model_of_open_length_writes_from_the_tokens_so_far(monkeypatch, mix):
    """Where the sequence length is open, the pass that writes token t + 1 reads the t + 1
    tokens written so far, and writes what whole-sequence passes write; a model whose logits
    depend on the length (``mix``: later tokens change earlier logits) writes nothing."""
    import spa.score.selfgen as selfgen
    from spa import runtime
    fed = []

    def recording(*a, f=runtime.session, **k):
        made = f(*a, **k)
        run = made.run
        made.run = lambda names, feeds, *r: fed.append(feeds["ids"].shape[1]) or run(names, feeds, *r)
        return made
    monkeypatch.setattr(runtime, "session", recording)
    monkeypatch.setattr(selfgen, "WRITTEN_LENGTH", 8)      # the probe's length: whole passes write the same
    texts = []
    for prefix in (True, False):
        if not prefix:
            monkeypatch.setattr(selfgen, "_runs_on_prefixes", lambda *a: False)
        monkeypatch.setattr(selfgen, "_WRITTEN", {})
        fed.clear()
        cal = Calibration(samples=64)
        batches = cal.batches(_token_model(mix=mix, length="S"), {"ids": [1, 8]})
        assert cal.generated != mix
        texts.append(np.concatenate([b["ids"] for b in batches]))
        if not mix:
            assert fed[-7:] == ([1, 2, 3, 4, 5, 6, 7] if prefix else [8] * 7)
    np.testing.assert_array_equal(texts[0], texts[1])


def test_a_language_model_of_open_length_writes_longer_text_than_its_probe(monkeypatch):
    """Analyzed at a short probe (8 tokens here, 16 by default), an open-length decoder writes
    WRITTEN_LENGTH tokens a sequence, as many sequences as the statistics' rows need; one that
    does not run at that length writes at the probe's."""
    import spa.score.selfgen as selfgen
    monkeypatch.setattr(selfgen, "_WRITTEN", {})
    (feeds,) = Calibration(samples=64).batches(_token_model(mix=False, length="S"), {"ids": [1, 8]})
    assert feeds["ids"].shape == (selfgen.ROWS // selfgen.WRITTEN_LENGTH, selfgen.WRITTEN_LENGTH)
    assert (feeds["ids"][:, 1:] == (feeds["ids"][:, :-1] + 1) % 10).mean() > 0.99
    monkeypatch.setattr(selfgen, "_takes_length", lambda *a: False)
    (short,) = Calibration(samples=64).batches(_token_model(mix=False, length="S"), {"ids": [1, 8]})
    assert short["ids"].shape == (64, 8)


def test_a_fixed_batch_language_model_writes_many_sequences():
    """A decoder exported with batch 1 (most LLM exports) writes sequence after sequence: one
    sequence of 128 tokens is no statistics for a 1536-wide layer (SmolLM2: perplexity x6
    at 12 % of the parameters removed, from 128 token positions)."""
    model = _token_model(mix=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    cal = Calibration(samples=64)
    batches = cal.batches(model, {"ids": [1, 8]})
    assert cal.generated and len(batches) == 64 and all(b["ids"].shape == (1, 8) for b in batches)
    ids = np.concatenate([b["ids"] for b in batches])
    assert (ids[:, 1:] == (ids[:, :-1] + 1) % 10).mean() > 0.99
    assert len(set(ids[:, 0].tolist())) > 3                  # each sequence its own first token
    r = spa.prune(model, ratio=0.5, round_to=1)
    assert r.report["data"]["samples"] == 64 and r.report["verify"]["ok"]


def test_a_fixed_batch_token_model_of_open_length_takes_its_random_ids_in_fewer_longer_runs(monkeypatch):
    """Where no text is written (here: later tokens change earlier logits) and the model fixes
    its batch, the random token ids come as many positions in runs of the second probe's
    length; never shorter, and as before where there is no second probe."""
    model = _token_model(mix=True, length="S")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    for longer, runs, length in (([1, 128], 8, 128), ([1, 100], 11, 100), ([1, 8], 64, 16), (None, 64, 16)):
        cal = Calibration(samples=64)
        cal.longer_shapes = lambda longer=longer: longer and {"ids": longer}
        batches = cal.batches(model, {"ids": [1, 16]})
        assert not cal.generated and [b["ids"].shape for b in batches] == [(1, length)] * runs
    r = spa.prune(model, ratio=0.5, round_to=1)
    assert r.report["probe"]["second"]["inputs"]["ids"][1]["size"] == 128
    assert r.report["data"]["samples"] == 8 and r.report["verify"]["ok"]
    monkeypatch.setattr(spa.analysis.Analysis, "second_probe", lambda self: (None, {"skipped": "test"}))
    assert spa.prune(model, ratio=0.5, round_to=1).report["data"]["samples"] == 64


def test_written_text_starts_where_the_model_would():
    """A model that always predicts token 7 starts its sequences with 7 too: the first token is
    drawn from the model's average prediction, not uniformly (a rare subword, on a real LM)."""
    model = _token_model(mix=False)
    b = next(t for t in model.graph.initializer if list(t.dims) == [32, 10])
    w = np.zeros((32, 10), np.float32)
    w[:10, 7] = 4.0
    b.CopyFrom(onnx.numpy_helper.from_array(w, b.name))
    (feeds,) = Calibration(samples=64).batches(model, {"ids": [1, 8]})
    assert (feeds["ids"] == 7).mean() > 0.95


def test_diverse_samples_cover_every_cluster():
    """PASER's point: a pool dominated by one kind of sample still gives one of each kind."""
    from spa.score.select import diverse_samples
    rng = np.random.default_rng(0)
    sizes = [200, 10, 8, 5]
    centres = rng.standard_normal((4, 6)) * 20
    x = np.concatenate([c + rng.standard_normal((k, 6)) for c, k in zip(centres, sizes)])
    kind = np.repeat(np.arange(4), sizes)
    chosen = diverse_samples(x, 4)
    assert sorted(kind[chosen].tolist()) == [0, 1, 2, 3]
    assert len(diverse_samples(x, 300)) == len(x)


def test_calibration_pool_larger_than_asked_is_sampled_for_diversity():
    from test_data_aware import calib, mlp
    r = spa.prune(mlp(), ratio=0.5, criterion="obspa", round_to=1, calib=calib(64), calib_samples=16)
    assert r.report["data"]["samples"] == 16 and r.report["verify"]["ok"]
    full = spa.prune(mlp(), ratio=0.5, criterion="obspa", round_to=1, calib=calib(64))
    assert full.report["data"]["samples"] == 64


def test_one_pruning_writes_its_text_once(monkeypatch):
    """Later steps (pruned models) and the data-free stand-in reuse the text the first model
    wrote: a forward pass per token is the price of writing it."""
    import spa.score.selfgen as selfgen
    writes = []
    real = selfgen._write
    monkeypatch.setattr(selfgen, "_write", lambda *a: writes.append(1) or real(*a))
    monkeypatch.setattr(selfgen, "_WRITTEN", {})
    cal = Calibration(samples=64)
    first = cal.batches(_token_model(mix=False), {"ids": [1, 8]})
    other = _token_model(mix=False)
    other.graph.initializer[0].float_data[:] = []              # another model: its own digest
    other.graph.initializer[0].raw_data = (np.eye(10, 16, dtype=np.float32) * 4).tobytes()
    again = cal.without_data().batches(other, {"ids": [1, 8]})
    assert len(writes) == 1 and np.array_equal(first[0]["ids"], again[0]["ids"])
    selfgen._WRITTEN.clear()
    r = spa.prune(_token_model(mix=False), ratio=0.5, steps=3, input_shapes={"ids": [1, 8]}, round_to=1,
                  verify=False)
    assert r.report["data"]["hessian_source"] == "text the model wrote itself (data-free)"
    assert len(writes) == 2                  # 3 steps, 3 different models, one text


def test_a_tied_embedding_stays_one_tensor_and_counts_once(tmp_path):
    """Embedding [V, D] read by Gather (ids -> vectors) and by the logits MatMul (transposed),
    its D fixed by the Softmaxes (as a real LM's norms fix it): spa gives the second reader its
    own copy to analyse, and must not keep or count both."""
    g = Graph()
    ids = g.input(["N", 8], name="ids", dtype=onnx.TensorProto.INT64)
    table = g.const(np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32), name="embed")
    x = g.op("Softmax", [g.op("Gather", [table, ids])], axis=-1)
    h = g.op("Relu", [g.op("MatMul", [x, g.weight(16, 32)])])
    y = g.op("Softmax", [g.op("MatMul", [h, g.weight(32, 16)])], axis=-1)
    g.output(g.op("MatMul", [y, g.op("Transpose", [table], perm=[1, 0])]))
    model = g.model()
    r = spa.prune(model, ratio=0.5, criterion="l1", round_to=1, input_shapes={"ids": [2, 8]})
    assert r.report["verify"]["ok"]
    assert r.report["before"]["params"] == 50 * 16 + 16 * 32 + 32 * 16
    assert r.report["after"]["params"] == 50 * 16 + 16 * 16 + 16 * 16      # the 32 hidden: half
    names = [t.name for t in r.model.graph.initializer]
    assert sum(n.startswith("embed") for n in names) == 1
    r.save(tmp_path / "p.onnx")
    assert (tmp_path / "p.onnx").stat().st_size < 4 * (50 * 16 + 16 * 32 + 32 * 16)
    budget = spa.prune(model, params=0.8, criterion="l1", round_to=1, input_shapes={"ids": [2, 8]})
    assert abs(budget.report["budget"]["achieved"] - 0.8) <= 0.03 * 0.8     # the budget counts it once too


def test_models_that_read_token_ids_get_more_damping_unless_one_is_asked_for(monkeypatch):
    """OBS's damping: TOKEN_DAMPING where a graph input indexes an embedding, DAMPING for
    image models, and what the caller asks for whatever the model."""
    from spa.score import data
    assert data.default_damping(_token_model(mix=False)) == data.TOKEN_DAMPING > data.DAMPING
    assert data.default_damping(_model()) == data.DAMPING
    seen = []
    real = spa.pipeline.data_aware_plan
    monkeypatch.setattr(spa.pipeline, "data_aware_plan",
                        lambda *a, **k: seen.append(a[8]) or real(*a, **k))
    spa.prune(_token_model(mix=False), ratio=0.5, input_shapes={"ids": [1, 8]}, round_to=1, verify=False)
    spa.prune(_model(), ratio=0.5, round_to=1, verify=False)
    spa.prune(_token_model(mix=False), ratio=0.5, input_shapes={"ids": [1, 8]}, round_to=1, verify=False,
              damping=0.05)
    assert seen == [data.TOKEN_DAMPING, data.DAMPING, 0.05]
