"""Data-free compensation from the weights alone: neuron merging (Kim et al., NeurIPS 2020).

Without calibration data and without BatchNormalization statistics to steer synthetic inputs
by (a model whose BatchNorms the exporter folded into the convs), OBS compensation has only
the statistics of noise to work from. Merging needs none: every removed channel j is
represented by the kept channel i whose producing weights (every filter row and bias that
makes the channel, across all producers of the group) are most similar, and each consumer's
input weights of i absorb those of j times the scale s = ||v_j|| / ||v_i||:

    W[:, i] += s * W[:, j]

When v_j = s v_i with s > 0 and everything between the producers and the consumers is
positively homogeneous per channel (ReLU, max pooling, sums with the group's own tensors and
biases, ...), channel j's activation *is* s times channel i's and the merge is exact. Where
the filters are only similar, it is an approximation; below ``threshold`` cosine similarity
the channel is dropped without compensation.

``how="lsq"`` spreads each removed channel over all kept ones instead: the least-squares fit
of its activation by theirs and a constant (the consumers' bias takes that), with the second
moments of ReLU features under Gaussian inputs (the arc-cosine kernel of the filters, Cho &
Saul 2009) standing in for data. It is exact for proportional filters too, up to its damping.

Merging applies only to groups where that argument holds (``mergeable``): every node that
writes a tensor of the group is a Conv (one group) / Gemm / MatMul with initializer weights
reading a tensor outside the group, every consumer is one OBS could update, and every other
node touching the group is in POSITIVE or LINEAR below. A group with a HardSwish, Clip,
Sigmoid, a per-channel Mul, a depthwise conv or a BatchNormalization is left to OBS.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..graph.dependency import Dependency
from ..graph.groups import Group
from ..loading.model import tensor_array
from .data import ConsumerSpec, _attr, from_weight_matrix, weight_matrix

__all__ = ["MergeResult", "mergeable", "merge_compensation", "POSITIVE", "LINEAR"]

log = logging.getLogger(__name__)

# f(s x) = s f(x) for s > 0, per channel: merging stays exact only for a positive scale
POSITIVE = frozenset({"Relu", "LeakyRelu", "MaxPool", "GlobalMaxPool", "ReduceMax"})
# linear per channel, or only moving values around: exact for any scale, either sign
LINEAR = frozenset({"Add", "Sub", "Sum", "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum",
                    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Concat",
                    "Split", "Slice", "Pad", "Resize", "Shape", "Size"})
_SUMS = frozenset({"Add", "Sub", "Sum"})
PRODUCERS = frozenset({"Conv", "Gemm", "MatMul"})


class MergeResult:
    """Per consumer its new (out, D) weight matrix, and what was merged."""

    def __init__(self):
        self.weights: dict[str, np.ndarray] = {}     # consumer node -> new weight matrix
        self.merged = 0          # removed channels represented by a kept one
        self.dropped = 0         # removed without compensation (dead, or nothing similar enough)
        self.exact = 0           # merged from a positively proportional filter (cosine > 1 - 1e-6)
        self.groups: list[int] = []


def _values(model: onnx.ModelProto) -> tuple[dict, dict, set]:
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                readers.setdefault(i, []).append(n)
    return producer, readers, {t.name for t in model.graph.initializer}


def _pad_is_zero(node: onnx.NodeProto, inits: dict) -> bool:
    mode = _attr(node, "mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return False
    value = _attr(node, "value", 0.0)
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in inits:
            return False
        value = float(np.asarray(tensor_array(inits[node.input[2]])).ravel()[0])
    return value == 0


def mergeable(model: onnx.ModelProto, dep: Dependency, group: Group, used: dict[str, ConsumerSpec],
              axis_of: dict) -> tuple[list[tuple[str, int]], bool] | str:
    """(the initializer spaces that make the group's channels, whether the scale must be
    positive), or a reason why merging would not be exact to apply."""
    producer, readers, init_names = _values(model)
    inits = {t.name: t for t in model.graph.initializer}
    spaces = set(group.spaces)
    in_group = {name for name, _ in spaces}
    consumers = {name for name, spec in used.items() if (spec.data, axis_of[name]) in spaces}
    consumer_weights = {used[name].weight for name in consumers}
    values = {name for name in in_group if name not in init_names}
    positive = False
    making: set[str] = set()
    seen: set[str] = set()
    for value in values:
        nodes = list(readers.get(value, [])) + ([producer[value]] if value in producer else [])
        for node in nodes:
            if node.name in seen:
                continue
            seen.add(node.name)
            op = node.op_type
            if node.name in consumers:
                if any(o in in_group for o in node.output):
                    return f"{node.name} ({op}) both reads and writes the group"
                continue
            if any(o in values for o in node.output) and op in PRODUCERS and node.input[0] not in in_group:
                w = node.input[1] if len(node.input) > 1 else ""
                if w not in inits or (op == "Conv" and _attr(node, "group", 1) != 1) \
                        or (op == "Gemm" and _attr(node, "transA", 0)):
                    return f"{node.name} ({op}) makes the channels with no plain initializer weight"
                extra = [i for i in node.input[1:] if i and i not in in_group]
                if extra:
                    return f"{node.name} ({op}) adds {extra[0]!r} to every channel alike"
                making.update(i for i in node.input[1:] if i)
                continue
            if op in POSITIVE:
                positive = True
            elif op not in LINEAR:
                return f"{node.name} ({op}) is not linear per channel"
            if op == "Pad" and not _pad_is_zero(node, inits):
                return f"{node.name} pads with a value other than 0"
            if op in _SUMS or op == "Concat":
                # a sum with anything outside the group (a scalar, a broadcast constant)
                # shifts the channels unequally
                for i in node.input:
                    if i and i not in in_group and (op in _SUMS or i in init_names):
                        return f"{node.name} ({op}) adds {i!r}, which is not part of the group"
                making.update(i for i in node.input if i in init_names)
    made = [(name, axis) for name, axis in spaces if name in init_names and name not in consumer_weights]
    stray = sorted({name for name, _ in made if name not in making})
    if stray:
        return f"initializer {stray[0]!r} shapes the channels in a way merging does not model"
    if not made:
        return "no initializer makes the channels"
    if not consumers:
        return "no layer with weights reads the group"
    return sorted(made), positive


def channel_vectors(dep: Dependency, group: Group, made: list, arrays: dict) -> np.ndarray | None:
    """Per channel the concatenation of everything that makes it (group.size x L), or None
    when the channels do not own equally many entries."""
    parts = []
    for name, axis in made:
        idx, ch = group.member(dep, (name, axis))
        counts = np.bincount(ch, minlength=group.size)
        if not len(idx) or np.any(counts != counts[0]):
            return None
        order = np.argsort(ch, kind="stable")
        rows = np.moveaxis(arrays[name], axis, 0)[idx[order]]
        parts.append(rows.reshape(group.size, -1))
    return np.hstack(parts)


def merge_compensation(model: onnx.ModelProto, dep: Dependency, groups: list[Group], removals: list,
                       used: dict[str, ConsumerSpec], axis_of: dict, columns, threshold: float = 0.0,
                       only: set[int] | None = None, how: str = "merge") -> MergeResult:
    """Merge each removed channel of the groups in ``only`` (default: every one ``mergeable``)
    into its most similar kept channel, in each consumer's input weights. Groups are taken
    upstream first: a consumer that a later group's channels come from has its merged input
    columns (removed ones zero) in the filters that group compares.

    ``columns(group, spec, axis)`` gives each channel's columns in a consumer's weight matrix."""
    out = MergeResult()
    inits = {t.name: t for t in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def array(name):
        if name not in arrays:
            arrays[name] = tensor_array(inits[name]).astype(np.float64)
        return arrays[name]

    matrices: dict[str, np.ndarray] = {}
    first_use = {n.name: i for i, n in enumerate(model.graph.node)}
    order = sorted(range(len(groups)), key=lambda i: min(
        [first_use[n] for n, s in used.items() if (s.data, axis_of[n]) in set(groups[i].spaces)] or [len(first_use)]))
    for gi in order:
        g, removed = groups[gi], removals[gi]
        if removed is None or not len(removed) or (only is not None and gi not in only):
            continue
        found = mergeable(model, dep, g, used, axis_of)
        if isinstance(found, str):
            continue
        made, positive = found
        for name, _ in made:
            array(name)
        v = channel_vectors(dep, g, made, arrays)
        if v is None:
            continue
        kept = np.setdiff1d(np.arange(g.size), removed)
        coef, const = _coefficients(v, removed, kept, positive, threshold, how, out)
        out.groups.append(g.id)
        for name, spec in used.items():
            axis = axis_of[name]
            if (spec.data, axis) not in set(g.spaces):
                continue
            if name not in matrices:
                w = weight_matrix(spec, array(spec.weight))
                bias = np.zeros(w.shape[0]) if spec.bias is None else array(spec.bias)
                matrices[name] = np.hstack([w, bias[:, None]])
            m = matrices[name]
            cols = columns(g, spec, axis)
            if len({len(c) for c in cols}) != 1:
                continue          # channels read unequally: nothing to line up, left as it is
            ck = np.stack([cols[i] for i in kept])           # (|K|, taps)
            cr = np.stack([cols[j] for j in removed])        # (|R|, taps)
            wr = m[:, cr]                                     # (out, |R|, taps)
            m[:, ck] += np.einsum("rk,ort->okt", coef, wr)
            if const is not None:
                m[:, -1] += np.einsum("r,ort->o", const, wr)
            m[:, cr] = 0.0
            # later groups compare filters of this layer with the removed inputs gone
            arrays[spec.weight] = from_weight_matrix(spec, m[:, :-1], arrays[spec.weight].shape)
    out.weights = matrices
    return out


def _arccos(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """E[relu(v.x) relu(w.x)] for x ~ N(0, I): |v||w| J(theta) / 2 pi (Cho & Saul)."""
    nv, nw = np.linalg.norm(v, axis=1), np.linalg.norm(w, axis=1)
    c = np.clip((v @ w.T) / np.maximum(nv[:, None] * nw[None, :], 1e-300), -1, 1)
    t = np.arccos(c)
    return nv[:, None] * nw[None, :] * (np.sin(t) + (np.pi - t) * c) / (2 * np.pi)


def _coefficients(v, removed, kept, positive, threshold, how, out):
    """(|R| x |K|) how much of each removed channel each kept one takes over, and per removed
    channel the constant its consumers' bias takes (None: none)."""
    coef = np.zeros((len(removed), len(kept)))
    norms = np.linalg.norm(v, axis=1)
    if how == "lsq":
        vk = v[kept]
        if positive:
            kkk = _arccos(vk, vk)
            kkr = _arccos(vk, v[removed])
            mk, mr = norms[kept] / np.sqrt(2 * np.pi), norms[removed] / np.sqrt(2 * np.pi)
            a = np.block([[kkk, mk[:, None]], [mk[None, :], np.ones((1, 1))]])
            b = np.vstack([kkr, mr[None, :]])
        else:
            a, b = vk @ vk.T, vk @ v[removed].T
        a = a + 1e-3 * np.mean(np.diag(a)) * np.eye(len(a))
        sol = np.linalg.solve(a, b).T
        out.merged += len(removed)
        if positive:
            return sol[:, :-1], sol[:, -1]
        return sol, None
    safe = np.where(norms > 0, norms, 1.0)
    cos = (v[removed] @ v[kept].T) / safe[removed, None] / safe[kept][None, :]
    similarity = cos if positive else np.abs(cos)
    best = np.argmax(similarity, axis=1)
    for r, j in enumerate(removed):
        sim, c = similarity[r, best[r]], cos[r, best[r]]
        i = kept[best[r]]
        if norms[j] == 0 or norms[i] == 0 or sim <= threshold:
            out.dropped += 1
            continue
        scale = norms[j] / norms[i] * np.sign(c)
        if how == "shrink" and positive:
            t = np.arccos(np.clip(c, -1, 1))
            scale *= (np.sin(t) + (np.pi - t) * c) / np.pi
        coef[r, best[r]] = scale
        out.merged += 1
        out.exact += bool(sim > 1 - 1e-6)
    return coef, None
