"""Landing a budget: from keep counts at or under it, give channels back until the resource is
within ``TOLERANCE`` of the target, on the rounding unit where it can, on finer units where it
must.

Rounding every group's keep count to ``--round-to`` makes the reachable points of a small model
sparse: on a CNN of 16..64-channel groups one step of 8 channels moves 15-25 % of the MACs, so a
greedy cut (or one ratio for every group) that stops at the first point under a budget of 0.5
kept 0.40 (a PyTorch twin of the JAX CNN of models/foreign; 0.30-0.32 on the Keras and JAX
exports). The reachable points are many more than one path visits, though: giving a step back
here and there (a knapsack fill, largest fitting give-back first), or exchanging a step of one
group for a smaller cut of another, lands within a few percent on the rounded steps alone in
most cases. Only where they cannot do the units halve (8, 4, 2, 1), so that rounding keeps its
purpose, kernel-friendly widths, wherever it does not cost the budget; the report lists the
groups taken off it.

Every function here is pure: keep counts and a ``ResourceModel`` in, keep counts out.
"""

from __future__ import annotations

import math

import numpy as np

from ..graph.groups import Group
from .planner import round_unit

__all__ = ["TOLERANCE", "unit_ladder", "steps_at", "floor_value", "finer_level", "land", "off_round",
           "why_not_landed", "explain"]

# a budget lands when |achieved - target| <= TOLERANCE * target
TOLERANCE = 0.03


def fewest_kept(size: int, max_ratio: float) -> int:
    """The fewest channels a group of ``size`` keeps under the cap ``max_ratio`` (at least one)."""
    return max(1, size - int(math.floor(size * max_ratio + 1e-9)))


def unit_ladder(groups: list[Group], round_to: int) -> list[list[int]]:
    """Per level, every group's unit: the rounding unit first (``round_unit``), then halved
    level by level down to 1 (a group already at 1 stays there)."""
    native = [round_unit(g, round_to) for g in groups]
    ladder = [native]
    while max(ladder[-1], default=1) > 1:
        ladder.append([max(1, u // 2) for u in ladder[-1]])
    return ladder


def steps_at(group: Group, unit: int, max_ratio: float, most: int | None = None) -> list[int]:
    """The keep counts a group may take on ``unit``, largest first: whole, then multiples of
    the unit down to the cap ``max_ratio``. With ``most``, a wide group steps by a multiple of
    the unit so that it has about ``most`` steps, and its lowest count is still listed."""
    if unit > 1 and group.size <= unit:
        return [group.size]
    step = unit * max(1, group.size // (most * unit)) if most else unit
    lowest = max(unit, int(math.ceil(fewest_kept(group.size, max_ratio) / unit)) * unit)
    keeps = [group.size] + [k for k in range(((group.size - 1) // step) * step, lowest - 1, -step) if k > 0]
    if lowest < group.size and keeps[-1] != lowest:
        keeps.append(lowest)
    return keeps


def floor_value(groups: list[Group], resource, keeps, free: list[bool], units: list[int], max_ratio: float) -> float:
    """The least resource the caps allow on ``units``: every free group at its lowest keep
    count (the resource grows with every keep count), the others as in ``keeps``."""
    return resource.value([steps_at(g, u, max_ratio)[-1] if f else k for g, u, f, k in zip(groups, units, free, keeps)])


def finer_level(floors: list[float], goal: float, tolerance: float = TOLERANCE) -> int | None:
    """Which level of ``unit_ladder`` to go on to where the rounding unit's floor
    (``floors[0]``) is over ``goal``: the coarsest that meets it, else the coarsest that lands
    within ``tolerance`` over it; None where none lands (rounding is then kept: giving it up
    would not reach the budget either)."""
    for limit in (goal, (1 + tolerance) * goal):
        level = next((i for i, f in enumerate(floors) if i and f <= limit + 1e-9), None)
        if level is not None:
            return level
    return None


def _largest_fitting(resource, keeps: np.ndarray, gi: int, options: np.ndarray, goal: float):
    """The largest of ``options`` (ascending) that group ``gi`` may keep with the resource
    still at most ``goal``, and that resource; None if none fits. The resource is multilinear
    with non-negative terms, so it grows with every keep count: bisection."""
    lo, hi, best = 0, len(options) - 1, None
    trial = keeps.copy()
    while lo <= hi:
        mid = (lo + hi) // 2
        trial[gi] = options[mid]
        value = resource.value(trial)
        if value <= goal + 1e-9:
            best, lo = (int(options[mid]), value), mid + 1
        else:
            hi = mid - 1
    return best


def _fills(resource, keeps, allowed, goal, one_step=False):
    """Every group's largest fitting give-back (with ``one_step``, its next step up, if it
    fits): (resource after, group, keep)."""
    moves = []
    for gi, options in enumerate(allowed):
        if options is not None:
            options = options[options > keeps[gi]][:1 if one_step else None]
            fit = _largest_fitting(resource, keeps, gi, options, goal) if len(options) else None
            if fit is not None:
                moves.append((fit[1], gi, fit[0]))
    return moves


def _swaps(resource, keeps, allowed, goal, value):
    """Give one step back to a group and cut another by as little as brings the resource
    under ``goal`` again: every such exchange that ends above ``value``, as (resource after,
    (group, keep), (group, keep))."""
    moves = []
    for gi, up_options in enumerate(allowed):
        if up_options is None or not np.any(up_options > keeps[gi]):
            continue
        up = keeps.copy()
        up[gi] = up_options[up_options > keeps[gi]][0]
        for hi, options in enumerate(allowed):
            if hi == gi or options is None:
                continue
            options = options[options < keeps[hi]]
            fit = _largest_fitting(resource, up, hi, options, goal) if len(options) else None
            if fit is not None and fit[1] > value + 1e-9:
                moves.append((fit[1], (gi, int(up[gi])), (hi, fit[0])))
    return moves


def _enumerated(resource, keeps, allowed, goal, close, score, limit, count=1):
    """Where the points on the level's units are few (at most ``limit``), the ``count`` landing
    ones that ``score`` (points x groups -> cost) likes best, best first, from all of them; an
    empty list if there is none or they are too many."""
    options = [np.array([k]) if a is None else a for k, a in zip(keeps, allowed)]
    if math.prod(len(o) for o in options) > limit:
        return []
    points = np.stack(np.meshgrid(*options, indexing="ij"), axis=-1).reshape(-1, len(options))
    values = resource.values(points)
    fit = (values <= goal + 1e-9) & (values >= close)
    points, values = points[fit], values[fit]
    return list(points[np.lexsort((-values, score(points)))[:count]])


def land(groups: list[Group], resource, keeps, goal: float, round_to: int, max_ratio: float,
         free: list[bool], measure=None, even=None, tolerance: float = TOLERANCE, candidates: int = 8,
         limit: int = 20000, max_exchanges: int = 8) -> np.ndarray:
    """Move channels, the resource staying at most ``goal`` (in the resource's unit), until it
    is within ``tolerance * goal`` of it or no move brings it closer.

    Level by level of ``unit_ladder`` (the rounding unit, then finer), two kinds of move on the
    level's units: give back (fill: the largest fitting give-back of one group; one that lands
    goes to the smallest group that can make it, where an odd width costs least), and where
    nothing more fits, exchange (one group a step back, another cut by as little as brings
    the resource under the goal again; at most ``max_exchanges`` a level, each tries every
    pair of groups). Among exchanges that land, ``measure(keeps)`` (the output change, if
    given) picks the least harmful of the ``candidates`` closest. One level
    finer only while the budget is still missed. Keeps over the goal are returned as they are.

    Where the moves do not land and the level has at most ``limit`` points (a small model,
    whose steps are the widest), every point is tried: of those that land, the one that moves
    the fewest channels from ``keeps`` (of the ``candidates`` that move fewest, the one
    ``measure`` likes best; with ``even``, the most even one).

    ``even(keeps)``, if given (of one point, or of each row of many), replaces both choices for
    an allocation that should stay even
    (one ratio for every group): give-backs go one step at a time, and every move, give-back
    or exchange, is the one that leaves ``even`` least."""
    keeps = np.array(keeps, dtype=np.int64)
    value = resource.value(keeps)
    if value > goal + 1e-9:
        return keeps
    close = (1 - tolerance) * goal
    sizes = np.array([g.size for g in groups], dtype=np.float64)
    start = keeps.copy()

    def score(points):
        """How far points stray from the keeps given (shares of each group moved), or with
        ``even``, how uneven they are."""
        if even is not None:
            return np.asarray(even(points))
        return (np.abs(points - start) / sizes).sum(axis=1)

    def trial(move):
        t = keeps.copy()
        for gi, k in move[1:]:
            t[gi] = k
        return t

    for units in unit_ladder(groups, round_to):
        allowed = [np.array(sorted(steps_at(g, u, max_ratio))) if f else None
                   for g, u, f in zip(groups, units, free)]
        exchanges = 0
        for _ in range(sum(len(a) for a in allowed if a is not None) + 4):  # each move raises the resource
            if value >= close:
                return keeps
            fills = [(v, (gi, k)) for v, gi, k in _fills(resource, keeps, allowed, goal, one_step=even is not None)]
            if fills:
                landing = [m for m in fills if m[0] >= close]
                if even is not None:
                    best = min(landing or fills, key=lambda m: (even(trial(m)), -m[0]))
                else:
                    best = (min(landing, key=lambda m: (groups[m[1][0]].size, -m[0])) if landing
                            else max(fills, key=lambda m: (m[0], -groups[m[1][0]].size)))
            else:
                swaps = _swaps(resource, keeps, allowed, goal, value) if exchanges < max_exchanges else []
                if not swaps:
                    break
                exchanges += 1
                landing = sorted((m for m in swaps if m[0] >= close), key=lambda m: -m[0])
                if landing and even is not None:
                    best = min(landing, key=lambda m: (even(trial(m)), -m[0]))
                elif len(landing) > 1 and measure is not None:
                    landing = landing[:candidates]
                    changes = [measure(trial(m)) for m in landing]
                    best = landing[int(np.argmin([c if np.isfinite(c) else np.inf for c in changes]))]
                else:
                    best = landing[0] if landing else max(swaps, key=lambda m: m[0])
            keeps = trial(best)
            value = best[0]
        if value < close:   # the moves did not land: is there a point on these units that does?
            found = _enumerated(resource, keeps, allowed, goal, close, score, limit,
                                candidates if measure is not None and even is None else 1)
            if len(found) > 1:
                changes = [measure(p) for p in found]
                return found[int(np.argmin([c if np.isfinite(c) else np.inf for c in changes]))]
            if found:
                return found[0]
    return keeps


def off_round(groups: list[Group], keeps, round_to: int) -> list[int]:
    """The groups whose keep count is not on their rounding unit (the landing needed finer)."""
    out = []
    for gi, (g, k) in enumerate(zip(groups, keeps)):
        unit = round_unit(g, round_to)
        if k < g.size and unit > 1 and k % unit:
            out.append(gi)
    return out


def why_not_landed(groups: list[Group], resource, keeps, goal: float, max_ratio: float, free: list[bool],
                   kind: str, tolerance: float = TOLERANCE) -> dict:
    """Nothing when the resource is within ``tolerance`` of ``goal``; else the report's
    ``nearest`` reachable share, what is in the way (``cause``: ``caps`` over the goal, or
    ``gap`` under it, where one channel given back to any group, ``nearest_above``, jumps over
    it) and the ``reason`` in words (``explain``)."""
    full = resource.full or 1.0
    value = resource.value(keeps)
    if abs(value - goal) <= tolerance * goal + 1e-9:
        return {}
    out = {"nearest": value / full, "target": goal / full, "kind": kind}
    if value > goal:
        pinned = sum(not f for f in free)
        out.update(cause="caps", max_ratio=max_ratio, pinned=pinned,
                   outside=resource.value(np.array([0 if f else k for k, f in zip(keeps, free)])) / full)
    else:
        above = None
        for gi, (g, k, f) in enumerate(zip(groups, keeps, free)):
            if f and k < g.size:
                trial = np.array(keeps)
                trial[gi] = k + 1
                v = resource.value(trial) / full
                if above is None or v < above[0]:
                    above = (v, gi)
        out.update(cause="gap", nearest_above=above[0] if above else None, group=above[1] if above else None)
    out["reason"] = explain(out, tolerance)
    return {k: out[k] for k in ("nearest", "nearest_above", "cause", "reason") if out.get(k) is not None}


def explain(miss: dict, tolerance: float = TOLERANCE) -> str:
    """The reason a budget missed its target, in words, from ``why_not_landed``'s numbers."""
    share, target = miss["nearest"], miss["target"]
    what = {"macs": "MACs", "params": "weights"}.get(miss.get("kind"), miss.get("kind", "resource"))
    if miss["cause"] == "caps":
        pinned = miss.get("pinned", 0)
        return (f"{share:.3g} is the least the caps allow: --max-ratio {miss['max_ratio']:.3g} leaves every group "
                f"at least {1 - miss['max_ratio']:.0%} of its channels"
                + (f", {pinned} pinned group{'s keep their' if pinned != 1 else ' keeps its'} ratio" if pinned else "")
                + (f", and {miss['outside']:.1%} of the {what} are in layers no prunable group reaches"
                   if miss.get("outside") else "")
                + (f"; each of the {miss['steps']} steps caps and rounds its own cut, so fewer steps may reach lower"
                   if miss.get("steps", 1) > 1 else ""))
    if miss.get("nearest_above") is None:
        return f"{share:.3g} is all the caps leave to cut: every group is whole or at its floor"
    return (f"no reachable point within {tolerance:.0%} of {target:.3g}: {share:.3g} is the nearest under it, "
            f"and one channel given back to any group (the least: group {miss['group']}) reaches "
            f"{miss['nearest_above']:.3g}" if miss.get("group") is not None else
            f"no reachable point within {tolerance:.0%} of {target:.3g}: {share:.3g} is the nearest under it, "
            f"the next over it {miss['nearest_above']:.3g}")
