"""Budgets: keep a share of the original's MACs, weights or latency, spent where it hurts least.

``spend`` turns a budget into per-group removals for one pruning pass (the allocation itself is
``spa.plan.allocate``); ``search_latency`` finds the MACs share that meets a latency target by
measuring; ``step`` splits a budget or ratio over incremental steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from .allocate import CostRunner, MaskedRunner, ResourceModel, allocate, allocate_uniform, removed_positions
from .landing import TOLERANCE, fewest_kept, off_round, why_not_landed
from .plan import make_plan
from ..errors import SpaError
from ..score.data import Calibration
from ..verify.metrics import count_macs
from .planner import PlanOptions
from ..progress import track
from ..rewrite.apply import rewrite

if TYPE_CHECKING:
    from ..analysis import Analysis
    from ..result import PruneResult

__all__ = ["Budget", "spend", "step"]


@dataclass(frozen=True)
class Budget:
    """Keep ``target`` of the original's ``kind`` (macs, params or latency)."""

    kind: str
    target: float
    calib: object = None        # where the sensitivity inputs come from (else synthetic)
    input_stats: dict = field(default_factory=dict)
    seed: int = 0
    samples: int | None = None  # default: 8, fewer for models over 250 MMACs a sample
    how: str = "measured"       # or "uniform": one ratio for every group, just enough; or "obs": OBS cost curves
    adds_biases: bool = False   # OBSPA's compensation may give a bias to a Conv/Gemm without one
    chosen: bool = True         # the allocation was asked for (not ``auto``'s pick): "obs" even unanchored


def step(plan: PlanOptions, budget: Budget | None, index: int, steps: int, done: PruneResult | None):
    """The plan and budget of step ``index`` (from 1) of ``steps`` incremental steps, relative to the model as
    pruned by the steps before (``done``)."""
    if steps == 1:
        return plan, budget
    share = lambda r: 1 - (1 - r) ** (1 / steps)  # noqa: E731 - per-step share of a total ratio
    step_plan = replace(plan, ratio=share(plan.ratio), ratios=tuple((k, share(r)) for k, r in plan.ratios),
                        max_ratio=share(plan.max_ratio))  # N capped steps never remove more than the cap
    if budget is None:
        return step_plan, None
    goal = 1 - (1 - budget.target) * index / steps          # share of the original after this step
    key = "params" if budget.kind == "params" else "macs"
    now = done.report["after"][key] / done.report["before"][key] if done is not None else 1.0
    return step_plan, replace(budget, target=min(1.0, goal / now))


def spend(a: Analysis, scores, removals, plan: PlanOptions, budget: Budget, curves=None):
    """Per-group removals that meet the budget where the outputs change least, the report's
    ``budget`` entry, and per group the output change its cuts added. The entry says whether
    the share kept landed within 3 % of the target (``landed``), which groups left the
    rounding unit for it (``off_round``), and where it did not, the ``nearest`` reachable
    share and the ``reason``. With ``budget.how == "obs"``, ``curves(depth, orders)`` gives
    every group's OBS cost curve (``spa.score.obs_costs``) down to ``depth`` removals: the
    change is their sum and the channels go in their order."""
    pinned = dict(plan.ratios)
    free = [g.kind not in pinned for g in a.groups]
    start = np.array([g.size - (len(r) if not f else 0) for g, r, f in zip(a.groups, removals, free)])
    orders = [np.argsort(s, kind="stable") for s in scores]
    resource = ResourceModel(a.model, a.shapes, a.dep, a.groups, "params" if budget.kind == "params" else "macs",
                             bias_slots=budget.adds_biases)
    how, why_not_obs = budget.how, None
    if how == "obs" and resource.full:
        runner, orders, why_not_obs = _cost_runner(a.groups, free, start, plan, orders, curves, budget, resource)
        how = "obs" if why_not_obs is None else "uniform"
        samples = None
    if how != "obs":
        # every run of the search costs a forward pass: bound it near 2 GMACs (ResNet-50: 1 sample)
        samples = budget.samples or int(np.clip(2e9 // max(count_macs(a.model, a.shapes), 1), 1, 8))
        feeds = [Calibration(budget.calib, budget.input_stats, samples=samples, batch=samples,
                             seed=budget.seed).first_batch(a.model, a.shapes.input_shapes)]
        runner = MaskedRunner(a.model, a.dep, a.shapes, a.groups, orders, feeds)
    if not resource.full:
        raise SpaError(f"--{budget.kind}: the model has no {'weights' if budget.kind == 'params' else 'MACs'} spa "
                       "can count (Conv, Gemm, MatMul, LSTM/GRU/RNN, Einsum with static shapes); use --ratio" +
                       ("" if budget.kind == "params" else " or --params"))

    def spend(target):
        if how == "uniform":
            return allocate_uniform(a.groups, runner, resource, target, plan, free, start)
        return allocate(a.groups, runner, resource, target, plan.round_to, plan.max_ratio, free, start)

    kind = "calibration sample" if budget.calib is not None else "synthetic sample"
    report = {"kind": budget.kind, "target": budget.target, "allocation": how,
              "measured_on": "OBS costs of each group's layers" if how == "obs" else
              f"{samples} {kind}{'s' if samples != 1 else ''}"}
    if why_not_obs is not None:
        report["obs_allocation_skipped"] = why_not_obs
    if budget.kind == "latency":
        alloc, report["achieved"], report["latency_search"] = search_latency(a, orders, spend, budget.target)
        report["met"] = report["achieved"] <= budget.target * 1.05
    else:
        alloc = spend(budget.target)
        report.update(achieved=_share(alloc), met=bool(alloc.met))
        report.update(_landing(a.groups, resource, alloc, budget, plan, free))
    report.update(macs_share=_share(alloc) if budget.kind != "params" else None, output_change=alloc.change,
                  cuts=alloc.steps, runs=runner.runs)
    return removed_positions(a.groups, orders, alloc.keeps), report, [float(v) for v in alloc.marginal]


def _cost_runner(groups, free, start, plan: PlanOptions, orders, curves, budget: Budget, resource: ResourceModel):
    """(runner, orders, None) from the groups' OBS cost curves, each measured where one ratio
    for every free group would meet the budget (``_even_share``), or (None, orders, why not)
    where a free group has none (no layer with statistics reads it), OBS failed, or ``auto``
    picked them and the statistics are not anchored in real inputs."""
    depth = [g.size - fewest_kept(g.size, plan.max_ratio) for g in groups]
    share = _even_share(groups, free, start, resource, budget.target, plan.max_ratio)
    probe = [int(round(g.size * share)) for g in groups]
    found = curves(depth, orders, probe, not budget.chosen)
    for key in ("unanchored", "unpriced"):
        if found.info.get(key):
            return None, orders, found.info[key] + ": uniform"
    missing = [g.id for g, f, c in zip(groups, free, found.costs) if f and c is None]
    if missing:
        return None, orders, f"{len(missing)} group(s) have no layer OBS can price (e.g. {missing[0]}): uniform"
    # a pinned group's cut is fixed: a flat curve leaves it out of every comparison
    costs = [c if f else np.zeros(g.size + 1) for g, f, c in zip(groups, free, found.costs)]
    orders = [o if o is not None else old for o, old in zip(found.orders, orders)]
    return CostRunner(groups, costs), orders, None


def _even_share(groups, free, start, resource: ResourceModel, target: float, max_ratio: float) -> float:
    """The share of channels that, taken from every free group alike, meets ``target``
    (bisection on the exact resource; a conv's MACs fall with the square of its channels)."""
    goal = target * resource.full
    sizes = np.array([g.size for g in groups], dtype=np.float64)
    cut = np.array(free, dtype=bool)

    def value(r):
        return resource.value(np.where(cut, np.maximum(1, np.round(sizes * (1 - r))), start))
    lo, hi = 0.0, float(max_ratio)
    if value(hi) > goal:
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if value(mid) <= goal else (mid, hi)
    return hi


def _landing(groups, resource, alloc, budget: Budget, plan: PlanOptions, free) -> dict:
    """Whether the allocation landed within ``TOLERANCE`` of the target, the groups it took off
    the rounding unit to get there, and where it did not land, the nearest reachable point and why."""
    goal = budget.target * resource.full
    out = {"landed": bool(abs(alloc.value - goal) <= TOLERANCE * goal + 1e-9),
           "off_round": off_round(groups, alloc.keeps, plan.round_to)}
    return {**out, **why_not_landed(groups, resource, alloc.keeps, goal, plan.max_ratio, free, budget.kind)}


def _share(alloc) -> float:
    return alloc.value / alloc.full if alloc.full else 1.0


def search_latency(a: Analysis, orders, spend, target: float, tries: int = 6):
    """Latency is measured, not modelled: prune to a MACs share, time original and pruned
    interleaved on onnxruntime (one thread), correct the MACs share by the miss, repeat. A
    measured allocation's greedy path is computed once, down to ``target ** 2`` of the MACs,
    and each try takes its prefix. Returns the allocation with the largest measured latency
    share within 5 % of the target (else the fastest one), its latency share, and every try."""
    from ..verify.bench import latency as measure
    deep = spend(max(0.01, target * target))
    tried = []
    share = target
    for _ in track(range(tries), unit="latency tries"):
        alloc = deep.at(share) if deep.path and share >= _share(deep) else spend(share)
        if tried and np.array_equal(alloc.keeps, tried[-1]["alloc"].keeps):
            break  # the caps allow nothing else: timing it again tells nothing new
        pruned = rewrite(a.model, make_plan(a, removed_positions(a.groups, orders, alloc.keeps)))
        before, after = measure([a.model, pruned], a.shapes.input_shapes, runs=20)
        ratio = after / before if before else 1.0
        tried.append({"macs": _share(alloc), "latency": ratio, "alloc": alloc})
        if abs(ratio - target) <= 0.05 * target or (ratio < target and not alloc.met):
            break
        share = float(np.clip(share * target / max(ratio, 1e-6), 0.01, 1.0))
    fits = [t for t in tried if t["latency"] <= target * 1.05]
    best = max(fits, key=lambda t: t["macs"]) if fits else min(tried, key=lambda t: t["latency"])
    return best["alloc"], best["latency"], [{"macs": t["macs"], "latency": t["latency"]} for t in tried]
