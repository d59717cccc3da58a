"""Data-free statistics for decoder language models from text the model writes itself.

Uniform random token ids are no text: every layer sees inputs unlike any it was trained on.
A causal language model can write its own (self-calibration): start from one random token,
sample each next token from the model's logits, and prune on those sequences. Only for models
whose token ids [batch, seq] give logits [batch, seq, vocab] over the same table and whose
logits at a position do not depend on later tokens (checked by running it)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import onnx

from ..progress import track

# S forward passes of the whole sequence generate it (no cache; of the tokens so far where the
# model takes them: half as many multiply-adds, same count of sequences): at most this many
# weight x token x step multiply-adds are spent writing sequences (fewer sequences, down to one, on a
# larger model; none above it). SmolLM2-135M, 20 % of its MLP removed (benchmarks/lm_smollm2.py):
# perplexity 28.9 -> 175 with the one 128-token sequence the old 4e12 allowed, 89 with two
# (real text: 47 with two windows, 35 with sixteen); this budget writes eight (~4 min on 2 cores).
GENERATION_BUDGET = 2.5e13
ROWS = 2048          # as many token positions as the statistics sample (data.collect_stats)
# A model that leaves the sequence length open is analyzed at a short probe (16 tokens): its
# text is written this long instead, where it takes that length. SmolLM2-135M exported with
# batch and length open, 20 % of its parameters removed, no data (benchmarks/lm_smollm2.py
# --methods --spa spa-free --onnx models/smollm2/dynamo_dynamic.onnx): perplexity 141.6 from 64
# sequences of 16 tokens, 86.9 from 32 of 64 (28.7 unpruned).
WRITTEN_LENGTH = 64
_WRITTEN: dict = {}  # the last text written: (model digest, seed, sequences, length) -> feeds


def self_generated(model: onnx.ModelProto, batches: list[dict], vocab: dict[str, int], seed: int,
                   free_batch: bool, written: dict | None = None) -> list[dict] | None:
    """Feeds holding sequences the model sampled itself, replacing ``batches`` (synthetic
    feeds with uniform token ids); None when the model is no causal language model, or too
    large to generate with here. ``written`` (one pruning's store) keeps the first text
    written, whatever model asks again: the unpruned model's text serves the pruned models of
    later steps, and writing it costs a forward pass per token (on a 4.3M-parameter decoder,
    about 100 s, which made a 3-step measured budget take 11 min)."""
    from ..runtime import session
    first = batches[0]
    ids = [k for k, v in first.items() if k in vocab and np.ndim(v) == 2]
    if len(ids) != 1:
        return None
    ids = ids[0]
    n, seq = first[ids].shape
    size = vocab[ids]
    params = sum(math.prod(t.dims) for t in model.graph.initializer)
    if seq < 2 or _affordable(n, seq, params) < (1 if free_batch else n):
        return None                          # not one sequence (batch) affordable: no session either
    sess = session(model)
    outputs = [o.name for o in sess.get_outputs()]
    probe = dict(first)
    got = sess.run(None, probe)
    logits = next((i for i, y in enumerate(got) if y.ndim == 3 and y.shape[:2] == (n, seq) and y.shape[2] == size
                   and y.dtype.kind == "f"), None)
    if logits is None:
        return None
    changed = dict(probe)
    changed[ids] = probe[ids].copy()
    changed[ids][:, -1] = (probe[ids][:, -1] + 1) % size
    later = sess.run([outputs[logits]], changed)[0]
    if not np.allclose(later[:, :-1], got[logits][:, :-1], rtol=1e-4, atol=1e-5):
        return None                                   # a later token changed earlier logits
    prefix = _runs_on_prefixes(model, sess, probe, ids, outputs[logits], got[logits])
    samples = sum(len(b[ids]) for b in batches)
    count = _affordable(samples, seq, params)
    # longer text where the model takes it and the budget gives as many token positions
    if prefix and free_batch and seq < WRITTEN_LENGTH and \
            _affordable(samples, WRITTEN_LENGTH, params) * WRITTEN_LENGTH >= count * seq and \
            _takes_length(sess, probe, ids, outputs[logits], WRITTEN_LENGTH):
        seq = WRITTEN_LENGTH
        count = _affordable(samples, seq, params)
    if not free_batch:
        count = count // n * n           # whole batches of the size the model fixes
    if count < 1:
        return None
    shape = (ids, seed, count, seq)
    if written is not None and shape in written:
        return [dict(f) for f in written[shape]]
    key = (hashlib.sha1(model.SerializeToString()).hexdigest(), *shape)
    if key not in _WRITTEN:      # pruning one model at several ratios writes the same text
        _WRITTEN.clear()
        _WRITTEN[key] = _write(sess, first, ids, outputs[logits], size, count, seq, n,
                               seed, count if free_batch else n, _marginal(got[logits]), prefix)
    if written is not None:
        written[shape] = _WRITTEN[key]
    return [dict(f) for f in _WRITTEN[key]]


def _affordable(samples: int, seq: int, params: int) -> int:
    """Sequences of ``seq`` tokens to write: as many as ROWS positions need, as the budget allows."""
    rows = min(samples * seq, ROWS)
    return min(max(1, -(-rows // seq)), int(GENERATION_BUDGET // max(1, params * seq * seq)))


def _takes_length(sess, probe: dict, ids: str, logits: str, length: int) -> bool:
    """Whether the model runs on token ids of ``length`` (positions it may not have)."""
    try:
        sess.run([logits], {**probe, ids: np.zeros((len(probe[ids]), length), probe[ids].dtype)})
    except Exception:   # noqa: BLE001 - a length it does not take
        return False
    return True


def _marginal(logits: np.ndarray) -> np.ndarray:
    """The model's next-token distribution averaged over every position of a pass."""
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p = (p / p.sum(axis=1, keepdims=True)).mean(axis=0)
    return p / p.sum()


def _runs_on_prefixes(model: onnx.ModelProto, sess, probe: dict, ids: str, logits: str, full: np.ndarray) -> bool:
    """Whether the token ids alone may be cut to the tokens written so far: the model takes
    no other input of the sequence's length, leaves that length open, and gives the same
    logits on the first half as on the whole. The pass that writes token t + 1 then reads
    t + 1 tokens, not the whole sequence: half the multiply-adds of writing, or less."""
    from ..loading.shapes import graph_inputs, is_open
    dims = next(vi.type.tensor_type.shape.dim for vi in graph_inputs(model) if vi.name == ids)
    seq = probe[ids].shape[1]
    if len(dims) != 2 or not is_open(dims[1]) or seq < 4 or \
            any(k != ids and np.ndim(v) and seq in np.shape(v) for k, v in probe.items()):
        return False
    try:
        half = sess.run([logits], {**probe, ids: probe[ids][:, :seq // 2]})[0]
    except Exception:   # noqa: BLE001 - a length it does not take: whole sequences then
        return False
    return half.shape == (len(full), seq // 2, full.shape[2]) and \
        np.allclose(half, full[:, :seq // 2], rtol=1e-4, atol=1e-5)


def _write(sess, first: dict, ids: str, logits: str, size: int, count: int, seq: int, n: int, seed: int,
           batch: int, first_tokens: np.ndarray, prefix: bool = False) -> list[dict]:
    """``count`` sequences, written ``batch`` at a time (the model may fix its batch size):
    one feed per batch. Each starts with a token drawn from ``first_tokens`` (the model's
    average next-token distribution): a uniform first token is mostly a rare subword, and the
    text that follows it is unlike any the model was trained on (SmolLM2-135M, 20 % of its MLP
    removed with two written sequences: perplexity 89 after a uniform first token, 72 after one
    drawn so; 47 with two windows of real text)."""
    rng = np.random.default_rng(seed)
    feeds = {k: (v[:1].repeat(batch, axis=0) if np.ndim(v) and len(v) == n else v) for k, v in first.items()}
    tokens = rng.integers(0, size, (count, seq)).astype(first[ids].dtype)
    tokens[:, 0] = rng.choice(size, size=count, p=first_tokens)
    out = []
    # a forward pass per token and batch: minutes on a decoder
    for step in track(range((seq - 1) * (count // batch)), unit="tokens written"):
        b, t = divmod(step, seq - 1)
        part = tokens[b * batch:(b + 1) * batch]
        feeds[ids] = part[:, :t + 1] if prefix else part
        z = sess.run([logits], feeds)[0][:, t, :].astype(np.float64)
        part[:, t + 1] = np.argmax(z + rng.gumbel(size=z.shape), axis=1)    # a sample of softmax(z)
        if t == seq - 2:
            out.append({**feeds, ids: part.copy()})
    return out
