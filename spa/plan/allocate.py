"""Where to cut: per-group keep counts that meet a MACs or params budget while changing the
model's outputs as little as possible.

- **Loss is measured, not modelled.** Removing channels is the same function as zeroing them
  where they are contracted (the oracle's identity), so one onnxruntime session of the
  original, with a mask input at every contraction, answers "how much do the outputs change
  if these groups keep these channels" with one run per question, for any combination.
- **Resources** (MACs, params) are exact multilinear functions of the groups' kept shares
  (a conv's MACs scale with the kept share of its input and of its output axis).
- **Allocation** is greedy, one step (a rounding unit, or 1/16 of a wide group) at a time:
  always the cut with the least output change per MAC (or param) saved, measured on top of
  every cut already made (lazily: a candidate is re-measured when it reaches the top).
- **Landing** (``spa.plan.landing``): a step can be wide on a small model, so where the
  greedy (or one ratio) stops far under the target, channels are given back until the
  resource is within 3 % of it, on the rounding unit where that suffices, else on finer ones.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from ..graph.dependency import Dependency
from ..graph.groups import Group
from ..loading.model import copies_of_equal
from ..loading.scopes import all_nodes
from ..verify.metrics import WEIGHT_TYPES, mac_terms, weighted_nodes
from .landing import fewest_kept, finer_level, floor_value, land, steps_at, unit_ladder
from .planner import round_unit
from ..progress import steps as counted, track

__all__ = ["ResourceModel", "MaskedRunner", "CostRunner", "Allocation", "allocate", "allocate_uniform", "keep_steps", "removed_positions"]

log = logging.getLogger(__name__)

class ResourceModel:
    """MACs or params of the pruned model as a function of every group's keep count.

    Each weight, and each of a MAC-counting node's terms (``metrics.mac_terms``: one for a
    conv, two for an LSTM), is ``base * prod(kept share of its axes)``, where an axis listed
    twice counts twice (a recurrence's H x H); the kept share of an axis is
    ``(fixed + sum_g count[g, axis] * keep_g / size_g) / size``, exact for every group whose
    channels are removed evenly from its members.

    ``bias_slots``: params also count a bias for every Conv and Gemm without one, as wide as
    its kept outputs, where OBSPA's compensation may add one (``full`` stays the original's
    count): an upper bound, so that a params budget holds after compensation too."""

    def __init__(self, model: onnx.ModelProto, shapes, dep: Dependency, groups: list[Group], kind: str,
                 bias_slots: bool = False):
        if kind not in ("macs", "params"):
            raise ValueError(f"resource must be macs or params, got {kind!r}")
        self.sizes = np.array([g.size for g in groups], dtype=np.float64)
        terms: list[tuple[float, list]] = []
        if kind == "macs":
            for node, runs in weighted_nodes(model, shapes):   # a node may be several terms (an LSTM's W and R)
                terms += [(float(base) * runs, spaces) for base, spaces in mac_terms(node, shapes)]
        else:
            # a reader's copy that no group cuts stays its original's tensor (rewrite rejoins
            # it): a tied embedding counts once, as in the report (SmolLM2 at params 0.8 kept
            # 0.757 of its real parameters when its 28M-weight copy counted twice)
            cut = {s for g in groups for s in g.spaces}
            copies = copies_of_equal(model)
            for t in model.graph.initializer:
                spaces = [(t.name, a) for a in range(len(t.dims))]
                if t.data_type in WEIGHT_TYPES and not (t.name in copies and cut.isdisjoint(spaces)):
                    terms.append((float(np.prod(t.dims)), spaces))
        real = len(terms)
        slots = _bias_slots(model) if kind == "params" and bias_slots else []
        terms += [(base, spaces) for base, spaces, _ in slots]
        # an axis' space -> row of the linear map from keep fractions to its kept share
        rows: dict = {}
        for _, spaces in terms:
            for s in spaces:
                if s not in rows and s in dep.space_class:
                    rows[s] = len(rows)
        index_of_group_space = {}
        for gi, g in enumerate(groups):
            for s in g.spaces:
                if s in rows:
                    index_of_group_space.setdefault(s, []).append(gi)
        n_rows = len(rows)
        self.offset = np.ones(n_rows + 1)            # last row: a constant 1 for padding
        self.coef = np.zeros((n_rows + 1, len(groups)))
        for s, r in rows.items():
            size = int(dep.couplings.sizes[s])
            if size <= 0:
                continue
            covered = 0
            for gi in index_of_group_space.get(s, ()):
                count = len(groups[gi].member(dep, s)[0])
                covered += count
                self.coef[r, gi] = count / size
            self.offset[r] = (size - covered) / size
        width = max([len(sp) for _, sp in terms] + [1])
        self.term_rows = np.full((len(terms), width), n_rows, dtype=np.int64)
        for ti, (_, spaces) in enumerate(terms):
            for j, s in enumerate(spaces):
                if s in rows:
                    self.term_rows[ti, j] = rows[s]
        self.base = np.array([b for b, _ in terms], dtype=np.float64)
        # a bias slot counts only while the layer's input is cut: OBS refits (and may give a
        # bias to) just the layers that lose input channels
        self.gated = np.arange(real, len(terms))
        self.gate_rows = np.array([rows.get(read, -1) for _, _, read in slots], dtype=np.int64)
        self.full = float(self.base[:real] @ np.prod(self._shares(self.sizes)[self.term_rows[:real]], axis=1))

    def _shares(self, keeps) -> np.ndarray:
        return self.offset + self.coef @ (np.asarray(keeps, dtype=np.float64) / np.maximum(self.sizes, 1))

    def value(self, keeps: np.ndarray) -> float:
        return float(self.values(np.asarray(keeps)[None])[0])

    def values(self, keeps: np.ndarray) -> np.ndarray:
        """``value`` of every row of ``keeps`` (points x groups)."""
        share = self.offset + (np.asarray(keeps, dtype=np.float64) / np.maximum(self.sizes, 1)) @ self.coef.T
        terms = np.prod(share[:, self.term_rows], axis=2) * self.base
        if len(self.gated):
            cut = (share[:, np.maximum(self.gate_rows, 0)] < 1 - 1e-9) & (self.gate_rows >= 0)
            terms[:, self.gated] *= cut
        return terms.sum(axis=1)


def _bias_slots(model: onnx.ModelProto) -> list[tuple[float, list, tuple]]:
    """A term per Conv and Gemm without a bias whose weight is an initializer: its output
    channels, on its weight's output axis (where ``spa.score.obspa`` may add a bias), and the
    space of its weight's input axis (the bias comes only with a cut there)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in all_nodes(model.graph):
        if node.op_type not in ("Conv", "Gemm") or (len(node.input) > 2 and node.input[2]):
            continue
        w = inits.get(node.input[1]) if len(node.input) > 1 else None
        if w is None or len(w.dims) < 2:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 1 if node.op_type == "Gemm" and not trans_b else 0
        out.append((float(w.dims[axis]), [(w.name, axis)], (w.name, 1 - axis if node.op_type == "Gemm" else 1)))
    return out


def _output_change(outputs, reference) -> float:
    """Mean cosine distance of each sample's float outputs to the reference's: blind to a
    uniform rescaling (which argmax, softmax order and normalized embeddings ignore too)."""
    total, count = 0.0, 0
    for y, r in zip(outputs, reference):
        if not isinstance(r, np.ndarray) or r.dtype.kind != "f" or not r.size:
            continue
        a = y.astype(np.float64).reshape(len(y), -1) if y.ndim else y.reshape(1, 1).astype(np.float64)
        b = r.astype(np.float64).reshape(len(r), -1) if r.ndim else r.reshape(1, 1).astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        total += float(np.sum(1 - cos))
        count += len(cos)
    return total / max(count, 1)


class MaskedRunner:
    """The original model with mask inputs: ``change(keeps)`` is the relative change of its
    outputs on ``feeds`` when group g keeps all but the first ``size - keeps[g]`` channels of
    ``orders[g]`` (its lowest-scored first)."""

    def __init__(self, model: onnx.ModelProto, dep: Dependency, shapes, groups: list[Group],
                 orders: list[np.ndarray], feeds: list[dict]):
        from ..runtime import session
        from ..verify.oracle import mask_contractions
        spaces = {s for g in groups for s in g.spaces}
        masked, self.masks = mask_contractions(
            model, dep.couplings.contractions, shapes, lambda s: np.ones(shapes.shape[s[0]][s[1]]) if s in spaces else None, as_inputs=True)
        try:
            self.session = session(masked)
        except Exception:  # the mask Muls can trip onnxruntime's optimizer
            self.session = session(masked, optimize=False)
        self.groups, self.orders, self.feeds = groups, orders, feeds
        self.members = [[(s, g.member(dep, s)) for s in g.spaces if s in self.masks] for g in groups]
        self.ones = {name: np.ones(shape, dtype) for entries in self.masks.values()
                     for name, shape, dtype in entries}
        self.reference = [self.session.run(None, {**f, **self.ones}) for f in feeds]
        self.runs = 0
        self._zero_cache: dict = {}

    def _zeroed(self, gi: int, keep: int) -> list:
        """(space, positions) that group ``gi`` zeroes when it keeps ``keep``: the search asks
        for the same few keep counts of a group hundreds of times."""
        key = (gi, keep)
        if key not in self._zero_cache:
            removed = self.orders[gi][: self.groups[gi].size - keep]
            self._zero_cache[key] = [(s, positions[np.isin(channel, removed)])
                                     for s, (positions, channel) in self.members[gi]]
        return self._zero_cache[key]

    def change(self, keeps) -> float:
        zero: dict = {}
        for gi, (g, keep) in enumerate(zip(self.groups, keeps)):
            if keep < g.size:
                for s, positions in self._zeroed(gi, int(keep)):
                    zero.setdefault(s, []).append(positions)
        masks = dict(self.ones)
        for s, parts in zero.items():
            for name, shape, dtype in self.masks[s]:
                mask = np.ones(shape[s[1]], dtype)
                mask[np.concatenate(parts)] = 0
                masks[name] = mask.reshape(shape)
        self.runs += 1
        return float(np.mean([_output_change(self.session.run(None, {**f, **masks}), r)
                              for f, r in zip(self.feeds, self.reference)]))


class CostRunner:
    """``MaskedRunner``'s question answered from each group's cost curve
    (``spa.score.obs_costs``) instead of the model: the change when group g keeps ``keeps[g]``
    is the sum of the curves at each group's removed count (infinite past a curve's end)."""

    def __init__(self, groups: list[Group], costs: list[np.ndarray]):
        self.sizes = [g.size for g in groups]
        self.costs = costs
        self.runs = 0

    def change(self, keeps) -> float:
        self.runs += 1
        total = 0.0
        for size, curve, keep in zip(self.sizes, self.costs, keeps):
            cut = size - int(keep)
            if cut >= len(curve):
                return math.inf
            total += float(curve[cut])
        return total


@dataclass
class Allocation:
    keeps: np.ndarray           # channels kept per group
    marginal: np.ndarray        # per group, the output change its cuts added when they were made
    change: float               # measured output change with every cut made
    value: float                # resource after, in the resource's unit
    full: float                 # resource before
    met: bool                   # whether the target was reached within the caps
    steps: int
    runs: int
    path: list = field(default_factory=list)  # after each cut: (resource, keeps, marginal, change)
    lander: Callable | None = None            # (keeps, marginal, change, goal) -> the same and the resource, landed

    def at(self, target: float) -> "Allocation":
        """The allocation the same greedy path gives for a looser ``target`` (its first point
        at or under it, landed as ``allocate`` lands): the cuts do not depend on where the
        path stops."""
        goal = target * self.full
        for value, keeps, marginal, change in self.path:
            if value <= goal + 1e-9:
                if self.lander is not None:
                    keeps, marginal, change, value = self.lander(keeps, marginal, change, goal)
                return Allocation(keeps, marginal, change, value, self.full, True, self.steps, self.runs,
                                  self.path, self.lander)
        return self


def removed_positions(groups: list[Group], orders: list[np.ndarray], keeps) -> list[np.ndarray]:
    """Per group, the positions it loses: the first ``size - keep`` of its order, sorted."""
    return [np.sort(o[: g.size - int(k)]) for g, o, k in zip(groups, orders, keeps)]


def keep_steps(group: Group, round_to: int, max_ratio: float) -> list[int]:
    """The keep counts a group may take, largest first: whole, then multiples of the rounding
    unit (``spa.plan.planner.round_unit``) down to the cap."""
    unit = round_unit(group, round_to)
    if unit > 1 and group.size <= unit:
        return [group.size]
    # at most ~16 steps a group: each step is one measured run per round
    unit *= max(1, group.size // (16 * unit))
    lowest = max(unit, int(math.ceil(fewest_kept(group.size, max_ratio) / unit)) * unit)
    return [group.size] + [k for k in range(((group.size - 1) // unit) * unit, lowest - 1, -unit) if k > 0]


def allocate(groups: list[Group], runner: MaskedRunner, resource: ResourceModel, target: float,
             round_to: int = 8, max_ratio: float = 0.9, free: list[bool] | None = None,
             start: np.ndarray | None = None, progress=None) -> Allocation:
    """Cut until the resource is at most ``target`` (a share of the original), one step at a
    time, always the step with the least measured output change per unit of resource saved;
    then land on the target (``spa.plan.landing``).

    Lazy greedy: every group's next step waits in a heap with the cost measured when it was
    last looked at; the cheapest is re-measured on the model as cut so far and taken only if
    it is still the cheapest, else it goes back with its new cost. ``start`` gives pinned (not
    ``free``) groups their keep counts. Where the rounded steps run out above the goal, the
    greedy goes on with the coarsest finer ones that reach it (``landing.finer_level``). Where
    it stopped far under the goal (its last step was wide), channels are given back until it
    lands."""
    sizes = np.array([g.size for g in groups])
    keeps = np.array(start if start is not None else sizes, dtype=np.int64)
    free = free if free is not None else [True] * len(groups)
    ladder = unit_ladder(groups, round_to)
    marginal = np.zeros(len(groups))
    goal = target * resource.full
    base = runner.change(keeps)
    version = 0
    heap: list = []
    path = [(resource.value(keeps), keeps.copy(), marginal.copy(), base)]

    def offer(gi):
        """Push group gi's next step, measured against the current cuts."""
        nxt = [k for k in steps[gi] if k < keeps[gi]] if free[gi] else []
        if not nxt:
            return
        trial = keeps.copy()
        trial[gi] = nxt[0]
        saved = resource.value(keeps) - resource.value(trial)
        if saved > 0:
            after = runner.change(trial)
            if not np.isfinite(after):  # a cut that makes the outputs NaN or infinite is never cheap
                return
            heapq.heappush(heap, (max(after - base, 0.0) / saved, -saved, gi, nxt[0],
                                  max(after - base, 0.0), version, after))

    # A candidate measured a few cuts ago is still taken as measured: on wide models this
    # halves the forward passes (ResNet-50: 50 groups, tolerance 5) at little cost.
    tolerance = sum(free) // 10
    taken = 0
    first = resource.value(keeps)
    with counted(100) as step:   # percent of the way to the goal
        for level in (0, "finer"):
            if level == "finer":   # the rounded steps ran out over the goal: finer ones, if they reach it
                over = resource.value(keeps) > goal + 1e-9
                level = finer_level([floor_value(groups, resource, keeps, free, units, max_ratio)
                                     for units in ladder], goal) if over else None
                if level is None:
                    break
            steps = ([keep_steps(g, round_to, max_ratio) for g in groups] if level == 0 else
                     [steps_at(g, u, max_ratio, most=16) for g, u in zip(groups, ladder[level])])
            heap.clear()
            version += 1
            for gi in (track(range(len(groups)), unit="groups measured") if level == 0 else range(len(groups))):
                offer(gi)
            while heap and resource.value(keeps) > goal + 1e-9:
                rate, _, gi, keep, more, seen, after = heapq.heappop(heap)
                if version - seen > tolerance:  # measured before too many other cuts: measure again
                    offer(gi)
                    continue
                keeps[gi] = keep
                marginal[gi] += more
                # the measured trial is the model as now cut, unless other cuts came in between
                base = after if seen == version else runner.change(keeps)
                version += 1
                taken += 1
                path.append((resource.value(keeps), keeps.copy(), marginal.copy(), base))
                offer(gi)
                if progress is not None:
                    progress(taken, resource.value(keeps) / resource.full)
                step(done=100 * (first - resource.value(keeps)) / max(first - goal, 1e-9))

    def lander(cut: np.ndarray, cut_marginal: np.ndarray, cut_change: float, at: float):
        """The greedy's keeps given back up to ``at`` (in the resource's unit): keeps, the
        marginal of each group scaled by the share of its cuts it still makes, the output
        change and the resource."""
        landed = land(groups, resource, cut, at, round_to, max_ratio, free, runner.change)
        if np.array_equal(landed, cut):
            return cut, cut_marginal, cut_change, resource.value(cut)
        given = landed >= cut   # groups given back keep the share of their measured change they still cut
        scaled = np.where(given, cut_marginal * (sizes - landed) / np.maximum(sizes - cut, 1), cut_marginal)
        change = runner.change(landed)
        for gi in np.flatnonzero(~given):   # cut further by an exchange: what undoing that would save
            undone = landed.copy()
            undone[gi] = cut[gi]
            scaled[gi] += max(change - runner.change(undone), 0.0)
        return landed, scaled, change, resource.value(landed)

    keeps, marginal, base, value = lander(keeps, marginal, base, goal)
    return Allocation(keeps, marginal, base, value, resource.full, value <= goal + 1e-9, taken, runner.runs, path,
                      lander)


def allocate_uniform(groups: list[Group], runner: MaskedRunner, resource: ResourceModel, target: float,
                     opts, free: list[bool] | None = None, start: np.ndarray | None = None) -> Allocation:
    """The smallest single ratio, applied to every free group as ``--ratio`` would, whose
    resource is at most ``target`` (bisection; capped at ``opts.max_ratio``), then the
    rounding's overshoot given back group by group (``_top_up``) and landed on the target
    (``landing.land``, each move the one that leaves the groups' removed shares most even),
    so the keep counts may differ from what the ratio alone gives. Where even the cap misses
    the target on the rounding unit, the coarsest halved unit that reaches it is used."""
    from .planner import uniform_keep
    free = free if free is not None else [True] * len(groups)
    base = np.array(start if start is not None else [g.size for g in groups], dtype=np.int64)
    goal = target * resource.full

    def keeps_at(ratio, rounding):
        return np.array([uniform_keep(g, ratio, rounding) if f else k for g, f, k in zip(groups, free, base)])
    roundings = [opts]
    while roundings[-1].round_to > 1:
        roundings.append(replace(roundings[-1], round_to=roundings[-1].round_to // 2))
    floors = [resource.value(keeps_at(opts.max_ratio, r)) for r in roundings]
    rounding = roundings[finer_level(floors, goal) or 0] if floors[0] > goal else opts
    lo, hi = 0.0, float(opts.max_ratio)
    if resource.value(keeps_at(hi, rounding)) > goal:
        lo = hi
    for _ in range(40):
        if hi - lo < 1e-6:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if resource.value(keeps_at(mid, rounding)) <= goal else (mid, hi)
    keeps = _top_up(groups, free, keeps_at(hi, rounding), hi, rounding, resource, goal)
    sizes, cut = np.array([g.size for g in groups], dtype=np.float64), np.array(free, dtype=bool)
    def spread(k):
        """How uneven the removed shares are (of one point, or of each row of many)."""
        return np.var(1 - k[..., cut] / sizes[cut], axis=-1) if cut.any() else np.zeros(np.shape(k)[:-1])
    keeps = land(groups, resource, keeps, goal, opts.round_to, opts.max_ratio, free, even=spread)
    value = resource.value(keeps)
    return Allocation(keeps, np.zeros(len(groups)), runner.change(keeps), value, resource.full,
                      value <= goal + 1e-9, 0, runner.runs)


def _top_up(groups, free, keeps: np.ndarray, ratio: float, opts, resource: ResourceModel, goal: float) -> np.ndarray:
    """Rounding to ``--round-to`` moves all groups of a size at once (16 channels keep 16 or 8),
    so the one ratio that meets the budget can overshoot it by far (a MobileNetV3-small-like
    net asked for 0.75 of its MACs kept 0.67). Give one rounding step back to each group, those
    that rounding cut furthest below the ratio's even share first, while the budget holds."""
    keeps = keeps.copy()
    short = [(g.size * (1 - ratio) - k) / g.size for g, k in zip(groups, keeps)]
    for i in sorted(range(len(groups)), key=lambda i: -short[i]):
        g = groups[i]
        if not free[i] or keeps[i] >= g.size:
            continue
        trial = keeps.copy()
        trial[i] = min(g.size, keeps[i] + round_unit(g, opts.round_to))
        if resource.value(trial) <= goal:
            keeps = trial
    return keeps
