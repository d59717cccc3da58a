"""Data-free criteria: L1/L2 weight magnitude, BatchNorm scale, seeded random.

A channel's score on one member (an initializer axis) is the norm of its slices there; a
group aggregates its members by sum, mean or max. Running statistics of BatchNorm are not
weights and never count.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..errors import SpaError
from ..graph.dependency import Dependency
from ..loading.model import tensor_array
from ..graph.groups import Group

__all__ = ["CRITERIA", "score_groups"]

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "random", "bn-scale")  # data-free; data-aware ones live in obspa.py
AGGREGATES = {"sum": np.sum, "mean": np.mean, "max": np.max}


def _roles(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """Initializer names that are BatchNorm scales, and those that are running statistics."""
    scales, stats = set(), set()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            if len(node.input) > 1:
                scales.add(node.input[1])
            stats.update(node.input[3:5])
    return scales, stats


def _member_norms(model: onnx.ModelProto, dep: Dependency, p: int) -> dict:
    """Per initializer axis that some group holds, the L``p`` norm of each index's slice.
    One tensor is converted at a time, so memory stays at the largest tensor."""
    _, bn_stats = _roles(model)
    norms = {}
    for t in model.graph.initializer:
        axes = [ax for ax in range(len(t.dims)) if (t.name, ax) in dep.space_class]
        if not axes or t.name in bn_stats:
            continue
        w = tensor_array(t)
        if w.dtype.kind != "f":
            continue
        w = np.abs(w) if p == 1 else np.square(w, dtype=np.float64)
        for axis in axes:
            other = tuple(i for i in range(w.ndim) if i != axis)
            s = w.sum(axis=other, dtype=np.float64)
            norms[(t.name, axis)] = s if p == 1 else np.sqrt(s)
    return norms


def score_groups(model: onnx.ModelProto, dep: Dependency, groups: list[Group],
                 criterion: str = "l1", aggregate: str = "sum",
                 seed: int = 0) -> tuple[list[np.ndarray], dict[int, str]]:
    """Scores per group and, per group id, a note where the criterion fell back to another."""
    if criterion not in CRITERIA:
        raise SpaError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    reduce = AGGREGATES[aggregate]
    bn_scales, _ = _roles(model)
    rng = np.random.default_rng(seed)
    norms = {} if criterion == "random" else _member_norms(model, dep, 2 if criterion == "l2" else 1)
    scores, notes = [], {}
    for group in groups:
        if criterion == "random":
            scores.append(rng.random(group.size))
            continue
        members = []
        for space in group.spaces:
            norm = norms.get(space)
            if norm is None or (criterion == "bn-scale" and space[0] not in bn_scales):
                continue
            idx, channel = group.member(dep, space)
            members.append(np.bincount(channel, weights=norm[idx], minlength=group.size))
        if not members and criterion == "bn-scale":
            notes[group.id] = "no BatchNormalization in group: scored with l1"
            members = [np.bincount(ch, weights=norms[s][idx], minlength=group.size)
                       for s in group.spaces if s in norms for idx, ch in [group.member(dep, s)]]
        scores.append(reduce(np.stack(members), axis=0) if members else np.zeros(group.size))
    return scores, notes
