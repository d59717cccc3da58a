"""Data-free criteria: L1/L2 weight magnitude, BatchNorm scale, seeded random.

A channel's score on one member (an initializer axis) is the norm of its slices there; a
group aggregates its members by sum, mean or max. Running statistics of BatchNorm are not
weights and never count.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..graph.dependency import Dependency
from ..graph.groups import Group

__all__ = ["CRITERIA", "score_groups"]

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "random", "bn-scale")
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


def _member_norm(w: np.ndarray, axis: int, p: int) -> np.ndarray:
    other = tuple(i for i in range(w.ndim) if i != axis)
    w = np.abs(w.astype(np.float64, copy=False))
    return w.sum(axis=other) if p == 1 else np.sqrt((w * w).sum(axis=other))


def score_groups(model: onnx.ModelProto, weights: dict[str, np.ndarray], dep: Dependency,
                 groups: list[Group], criterion: str = "l1", aggregate: str = "sum",
                 seed: int = 0) -> tuple[list[np.ndarray], dict[int, str]]:
    """Scores per group and, per group id, a note where the criterion fell back to another."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    reduce = AGGREGATES[aggregate]
    bn_scales, bn_stats = _roles(model)
    rng = np.random.default_rng(seed)
    scores, notes = [], {}
    for group in groups:
        if criterion == "random":
            scores.append(rng.random(group.size))
            continue
        members = []
        for space in group.spaces:
            w = weights.get(space[0])
            if w is None or w.dtype.kind != "f" or space[0] in bn_stats:
                continue
            if criterion == "bn-scale" and space[0] not in bn_scales:
                continue
            idx, channel = group.member(dep, space)
            norm = _member_norm(w, space[1], 2 if criterion == "l2" else 1)
            members.append(np.bincount(channel, weights=norm[idx], minlength=group.size))
        if not members and criterion == "bn-scale":
            notes[group.id] = "no BatchNormalization in group: scored with l1"
            return_scores, _ = score_groups(model, weights, dep, [group], "l1", aggregate, seed)
            scores.append(return_scores[0])
            continue
        scores.append(reduce(np.stack(members), axis=0) if members else np.zeros(group.size))
    return scores, notes
