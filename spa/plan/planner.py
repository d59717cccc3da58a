"""How many channels each group loses, and which."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import SpaError
from ..graph.groups import Group

__all__ = ["PlanOptions", "plan_removals", "uniform_keep", "rounded_keep", "round_unit"]


@dataclass(frozen=True)
class PlanOptions:
    ratio: float = 0.5                      # for every kind of group not named in ``ratios``
    ratios: tuple = ()                      # ((kind, ratio), ...): "channels", "heads", "head-dims"
    global_rank: bool = False
    max_ratio: float = 0.9
    round_to: int = 8


def round_unit(group: Group, round_to: int) -> int:
    """Keep a multiple of this many of ``group``'s channels, so that its weights keep a
    multiple of ``round_to`` channels: a channel that spans ``group.width`` weight channels
    (a GroupNorm group) needs fewer. Heads and the other kinds are few and whole: 1."""
    if group.kind != "channels" or round_to <= 1:
        return 1
    return round_to // math.gcd(round_to, group.width)


def rounded_keep(n: int, keep: int, unit: int) -> int:
    """``keep`` of ``n`` rounded to a multiple of ``unit`` (at least one unit; a group of at
    most one unit stays whole)."""
    keep = max(keep, 1)
    if unit > 1:
        if n <= unit:
            return n
        keep = max(unit, int(round(keep / unit)) * unit)
    return min(keep, n)


def uniform_keep(group: Group, ratio: float, opts: PlanOptions) -> int:
    """What ``ratio`` leaves of a group, rounded as ``plan_removals`` rounds it."""
    keep = group.size - int(np.floor(group.size * ratio + 1e-9))
    return rounded_keep(group.size, keep, round_unit(group, opts.round_to)) if keep < group.size else group.size


def plan_removals(groups: list[Group], scores: list[np.ndarray], opts: PlanOptions) -> list[np.ndarray]:
    """Per group, the positions (into ``group.channels``) of the channels to remove."""
    by_kind = dict(opts.ratios)
    for r in [opts.ratio, *by_kind.values()]:
        if not 0 <= r < 1:
            raise SpaError(f"a ratio is the fraction removed, in [0, 1); got {r}")
    ratio_of = [by_kind.get(g.kind, opts.ratio) for g in groups]
    if opts.global_rank:
        keeps = [0] * len(groups)
        # rank within each kind, whatever the ratios: heads and neurons are not comparable,
        # and two kinds that happen to share a ratio value must not compete for one budget
        for kind in dict.fromkeys(g.kind for g in groups):
            idx = [i for i, g in enumerate(groups) if g.kind == kind]
            r = by_kind.get(kind, opts.ratio)
            for i, k in zip(idx, _global_keeps([groups[i] for i in idx], [scores[i] for i in idx], opts, r)):
                keeps[i] = k
    else:
        keeps = [g.size - int(np.floor(g.size * r + 1e-9)) for g, r in zip(groups, ratio_of)]
    removals = []
    for g, s, keep in zip(groups, scores, keeps):
        keep = rounded_keep(g.size, keep, round_unit(g, opts.round_to)) if keep < g.size else g.size
        order = np.argsort(s, kind="stable")
        removals.append(np.sort(order[: g.size - keep]))
    return removals


def _global_keeps(groups, scores, opts, ratio):
    """Rank every channel on scores normalized by their group's mean; cap each group."""
    normalized = [s / (np.mean(s) + 1e-12) if len(s) else s for s in scores]
    total = sum(g.size for g in groups)
    budget = int(np.floor(total * ratio + 1e-9))
    flat = sorted((float(v), gi) for gi, s in enumerate(normalized) for v in s)
    removed = [0] * len(groups)
    cap = [min(g.size - 1, int(np.floor(g.size * opts.max_ratio + 1e-9))) for g in groups]
    for _, gi in flat:
        if budget == 0:
            break
        if removed[gi] < cap[gi]:
            removed[gi] += 1
            budget -= 1
    return [g.size - r for g, r in zip(groups, removed)]
