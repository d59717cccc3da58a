"""``prune``: the pipeline as a short list of named stages.

load/normalize -> analyze -> score -> allocate -> (calibrate) -> plan -> rewrite -> verify ->
report. The channel pass runs once, or once per incremental step, then one pass each for the
head dims, the grouped convs' width and the residual width when asked for. Every stage is
announced through ``on_stage`` before it starts; a failure carries the stages run so far.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import onnx

from .analysis import Analysis, analyze
from .plan.budget import Budget
from .plan.budget import spend as spend_budget
from .plan.budget import step as split_step
from .plan.landing import TOLERANCE as LANDING_TOLERANCE, explain
from .score.calibrated import choose_use
from .errors import SpaError, StrictModeError, UnsupportedModelError, VerificationError
from .score import score_groups
from .score.data import Calibration, default_damping
from .score.invert import INVERTED_SAMPLES
from .score.obs_costs import CostCurves, obs_cost_curves
from .score.obspa import DATA_CRITERIA, data_aware_plan
from .verify.metrics import count_macs, count_params
from .options import PruneOptions
from .rewrite.perp import refit_normalizations
from .plan.plan import Plan, make_plan
from .plan.planner import PlanOptions, plan_removals
from .loading.model import in_data_files, release_mapped, tensor_bytes
from .result import PruneResult, file_bytes
from .rewrite.apply import rewrite
from .runtime import FED_ABOVE, LARGE_GRAPH_NODES
from .loading.probe import infer_shapes
from .verify.oracle import check_shapes, check_signature, check_valid, masked_model, oracle, output_error

__all__ = ["prune", "Stages", "VERIFY_AUTO_MAX_PARAMS"]

log = logging.getLogger(__name__)

# The oracle runs by default below this many parameters and graph nodes: it builds two
# onnxruntime sessions with the users' default options, whose time grows much faster than the
# node count (spa.runtime.LARGE_GRAPH_NODES: minutes for a 100k-node chain).
VERIFY_AUTO_MAX_PARAMS = 2_000_000_000
VERIFY_AUTO_MAX_NODES = LARGE_GRAPH_NODES


class Stages:
    """The stages announced so far, in order; each is passed on to ``on_stage``."""

    def __init__(self, on_stage: Callable[[str], None] | None = None):
        self.run: list[str] = []
        self.on_stage = on_stage or (lambda name: None)

    def __call__(self, name: str):
        release_mapped()
        self.run.append(name)
        self.on_stage(name)

    def named(self, error: BaseException) -> BaseException:
        """``error``, carrying the stages run (``error.spa_stages``, and a note for tracebacks)."""
        if not hasattr(error, "spa_stages"):
            error.spa_stages = list(self.run)
            error.add_note(f"spa stages run: {' -> '.join(self.run) or 'none'}")
        return error


def prune(model_or_path, ratio: float | None = None, criterion: str | None = None, *,
          options: PruneOptions | None = None, on_stage: Callable[[str], None] | None = None,
          **kwargs) -> PruneResult:
    """Prune ``ratio`` of the channels of every prunable group, or what ``options``
    (a ``PruneOptions``) or the keyword arguments (its fields) ask for.

    Amounts: ``ratio`` (default 0.5, or 0 for every structure not named when ``heads``/``mlp``/
    ``head_dims``/``hidden``/``group_width`` is given); ``mlp`` and ``heads`` override it for
    plain channel groups and whole attention heads; ``head_dims`` then removes that share of
    the dims of every remaining head in a pass of its own, ``group_width`` that share of the
    per-group width of every grouped convolution, and ``hidden`` that share of the residual
    width (through LayerNorm/RMSNorm: inexact, the report gives the output error instead of
    the oracle) in a last pass.

    A budget replaces the uniform ratio: ``macs``, ``params`` or ``latency`` keep that share
    of the original's MACs, weights or onnxruntime latency, cut where the outputs change least
    (``spa.plan.allocate``; ``allocation="uniform"`` finds one ratio for every group instead),
    and a MACs or params budget lands within 3 % under its target where a reachable point is
    that close (``spa.plan.landing``; the report's ``budget`` says ``landed``, and why not).
    ``steps`` > 1 prunes incrementally, re-analyzing, re-scoring and re-compensating between
    steps (default: 3 for a measured MACs/params budget, else 1).

    Data-aware criteria (``obspa``, ``activation``, ``dead``) and ``recalibrate`` use
    activations of ``calib`` (an ``.npz`` path, a dict of arrays named after the inputs, or an
    iterable of feed dicts; with ``calib_samples``, at most that many of its samples) or,
    without it, of synthetic inputs drawn with ``input_stats``. ``criterion`` defaults to
    OBSPA, data-free without ``calib``; where the model cannot run on synthetic inputs that
    default falls back to l1 and the report's ``data`` says why. Without ``calib``,
    ``compensation`` picks how removals are compensated: "obs" (default), or from the weights
    alone, "merge" / "lsq" (spa/score/merge.py: for models whose BatchNorms were folded away;
    measured weaker than OBS on the folded Fashion CNNs, benchmarks/README.md).

    >>> result = prune("model.onnx", ratio=0.5, criterion="l1")   # doctest: +SKIP
    >>> result.save("model.pruned.onnx"); result.report["after"]["macs"]  # doctest: +SKIP
    """
    given = {k: v for k, v in (("ratio", ratio), ("criterion", criterion)) if v is not None}
    opts = (options or PruneOptions()).replace(**given, **kwargs) if given or kwargs or options is None \
        else options
    stages, calibration = Stages(on_stage), _calibration(opts)   # one, so every pass sees the same samples
    try:
        first = _analyze_stage(model_or_path, opts, stages)
        _invert_for_statistics(first, opts, stages, calibration)
        if calibration is not None and first.shapes.probe:
            calibration.longer_shapes = lambda: first.second_probe()[0]
        result = _channel_passes(first, opts, stages, calibration)
        for kind, ratio_of_kind, how in _later_passes(opts):
            a = _analyze_stage(result.model, opts, stages, shapes=result.report["input_shapes"], **how)
            plan = opts.pass_options(kind, ratio_of_kind)
            result = _merge_passes(result, _prune_pass(a, plan, opts, stages, calibration=calibration))
    except BaseException as e:
        raise stages.named(e)
    return _finish(result, first, opts)


def _later_passes(opts: PruneOptions) -> list[tuple[str, float, dict]]:
    """The passes after the channel pass: (kind, ratio, how to analyze for it)."""
    later = [("head-dims", opts.head_dims, {"attention": "head-dims"}),
             ("group-width", opts.group_width, {"conv_groups": "width"}),
             ("hidden", opts.hidden_ratio, {"allow_mixing": True})]
    return [(kind, r, how) for kind, r, how in later if r]


def _analyze_stage(model, opts: PruneOptions, stages: Stages, shapes: dict | None = None,
                   attention: str = "heads", allow_mixing: bool = False, conv_groups: str = "auto") -> Analysis:
    stages("analyze")
    shapes = {k: tuple(v) for k, v in (opts.input_shapes if shapes is None else shapes).items()}
    return analyze(model, shapes, list(opts.exclude), attention, allow_mixing, conv_groups)


def _calibration(opts: PruneOptions) -> Calibration | None:
    if opts.criterion_used not in DATA_CRITERIA and not opts.recalibrate:
        return None
    return Calibration(opts.calib, opts.input_stats, samples=opts.calib_samples or 64, seed=opts.seed,
                       select=opts.calib_samples if opts.calib is not None else None)


def _invert_for_statistics(a: Analysis, opts: PruneOptions, stages: Stages, calibration: Calibration | None):
    """Without data, OBSPA's statistics of an image classifier with no BatchNorm to steer by
    come from images inverted from the model (spa/score/invert.py), as ``synthetic`` says."""
    if calibration is None or calibration.data is not None or opts.criterion_used != "obspa" or \
            opts.synthetic == "noise" or opts.compensation != "obs" or not a.groups:
        return
    samples = opts.calib_samples or INVERTED_SAMPLES
    asked = opts.synthetic == "invert"           # asked for: whatever it costs
    if not calibration.invert(a.model, a.shapes.input_shapes, lambda: count_macs(a.model, a.shapes), samples, opts.seed,
                              budget=float("inf") if asked else None, announce=lambda: stages("invert")) and asked:
        raise SpaError(f"--synthetic invert: {calibration.inversion.get('inversion_skipped', 'not applicable')}")


def _channel_passes(first: Analysis, opts: PruneOptions, stages: Stages,
                    calibration: Calibration | None) -> PruneResult:
    """The channel and head pass: once, or in ``steps`` increments re-analyzed in between."""
    budget = None
    if opts.budget is not None:
        kind, target = opts.budget
        budget = Budget(kind, target, opts.calib, opts.input_stats, opts.seed, how=opts.allocation_used,
                        chosen=opts.allocation != "auto",
                        adds_biases=opts.criterion_used == "obspa")
    steps, plan = opts.steps_used, opts.plan_options()
    result = None
    for index in range(1, steps + 1):
        a = first if result is None else _analyze_stage(result.model, opts, stages,
                                                         shapes=result.report["input_shapes"])
        step_plan, step_budget = split_step(plan, budget, index, steps, result)
        one = _prune_pass(a, step_plan, opts, stages, step_budget, calibration)
        result = one if result is None else _merge_passes(result, one)
    if steps > 1 and budget is not None:
        _budget_over_steps(result.report, budget, steps, plan.max_ratio)
    return result


def _budget_over_steps(report: dict, budget: Budget, steps: int, max_ratio: float):
    """The budget entry of the whole run (each step's entry speaks of its own share)."""
    key = "params" if budget.kind == "params" else "macs"
    entry = report.setdefault("budget", {"kind": budget.kind})
    entry.update(target=budget.target, steps=steps, achieved=report["after"][key] / report["before"][key])
    entry["met"] = entry["achieved"] <= budget.target + 1e-9
    if entry.get("macs_share") is not None:   # the last step's share is not the run's
        entry["macs_share"] = report["after"]["macs"] / report["before"]["macs"]
    _landing_over_steps(entry, budget, max_ratio)


def _landing_over_steps(entry: dict, budget: Budget, max_ratio: float):
    """``landed`` and the reason of a miss for the whole run: the last step's speak of its own
    share of the model it was given (``achieved`` is already the run's)."""
    entry["landed"] = abs(entry["achieved"] - budget.target) <= LANDING_TOLERANCE * budget.target + 1e-9
    cause = entry.pop("cause", None)
    nearest, above = entry.pop("nearest", None), entry.pop("nearest_above", None)
    if cause is not None or entry["landed"]:
        entry.pop("reason", None)
    if entry["landed"] or cause is None:
        return
    miss = {"nearest": entry["achieved"], "target": budget.target, "kind": budget.kind, "cause": cause,
            "steps": entry["steps"]}
    if cause == "caps":
        miss["max_ratio"] = max_ratio
    elif above is not None and nearest:
        miss["nearest_above"] = above * entry["achieved"] / nearest   # the step's shares times what it was given
    entry.update(nearest=miss["nearest"], cause=cause, reason=explain(miss, LANDING_TOLERANCE))
    if miss.get("nearest_above") is not None:
        entry["nearest_above"] = miss["nearest_above"]


def _finish(result: PruneResult, first: Analysis, opts: PruneOptions) -> PruneResult:
    _restore_default_inputs(result.stored, first.default_inputs)
    if first.shapes.probe:  # later passes analyze at the sizes the first pass chose
        result.report["probe"] = first.shapes.probe
    result.report["options"] = opts.as_report()
    return result


def _restore_default_inputs(model: onnx.ModelProto, defaults: list):
    """Normalization hides inputs that have a default initializer (the analysis treats them
    as weights); the pruned model lists them again, with the shapes of their sliced values."""
    present = {i.name for i in model.graph.input}
    inits = {t.name: t for t in model.graph.initializer}
    for vi in defaults:
        if vi.name in present or vi.name not in inits:
            continue
        restored = onnx.ValueInfoProto()
        restored.CopyFrom(vi)
        if restored.type.HasField("tensor_type"):
            shape = restored.type.tensor_type.shape
            del shape.dim[:]
            for d in inits[vi.name].dims:
                shape.dim.add().dim_value = d
        model.graph.input.append(restored)


def _merge_passes(first: PruneResult, second: PruneResult) -> PruneResult:
    """One result for two passes: before of the first, after of the second, all groups."""
    rep = dict(second.report)
    rep["source"], rep["before"] = first.report["source"], first.report["before"]
    rep["passes"] = [first.report, second.report]
    rep["groups"] = first.report["groups"] + second.report["groups"]
    if "verify" in first.report and "verify" in second.report:
        v1, v2 = first.report["verify"], second.report["verify"]
        rep["verify"] = v1 if "skipped" in v1 or "skipped" in v2 else v2 if v2.get("exact") is False else {
            "max_abs_error": max(v1["max_abs_error"], v2["max_abs_error"]),
            "max_rel_error": max(v1["max_rel_error"], v2["max_rel_error"]),
            "ok": v1["ok"] and v2["ok"], "samples": v1["samples"],
            "noise": max((v["noise"] for v in (v1, v2) if v.get("noise") is not None), default=None),
            "rounded": v1.get("rounded", 0) + v2.get("rounded", 0),
            "rounded_noise": v1.get("rounded_noise", 0) + v2.get("rounded_noise", 0),
            "twin_max_rel_error": max((v["twin_max_rel_error"] for v in (v1, v2)
                                       if v.get("twin_max_rel_error") is not None), default=None),
            "twin_ok": v2.get("twin_ok", v1.get("twin_ok")),
            "judged_upstream": {**v1.get("judged_upstream", {}), **v2.get("judged_upstream", {})}}
    return PruneResult(second.stored, first.original, rep, first.source, first.files, first.plans + second.plans,
                       second.one_file)


@dataclass
class _Choice:
    """Which positions of each group go, why, and what the budget made of it."""

    removals: list
    scores: list
    notes: dict
    budget_report: dict | None = None
    changes: list | None = None                    # per group: the output change the allocation measured
    updates: dict = field(default_factory=dict)    # OBSPA: initializer -> new value
    new_biases: dict = field(default_factory=dict)
    data_info: dict | None = None


def _prune_pass(a: Analysis, plan: PlanOptions, opts: PruneOptions, stages: Stages,
                budget: Budget | None = None, calibration: Calibration | None = None) -> PruneResult:
    """One pass: score -> (allocate) -> (calibrate) -> plan -> rewrite -> check -> report -> verify.
    Requires an analysis of the model as it stands; ensures a pruned model with the original's
    inputs and outputs and consistent shapes, verified unless verification is off."""
    if opts.strict and a.dep.blocked_nodes:
        name, op, reason = a.dep.blocked_nodes[0]
        raise StrictModeError(f"--strict: {reason} ({len(a.dep.blocked_nodes)} node(s) blocked)")
    choice = _choose(a, plan, opts, budget, stages, calibration)
    if calibration is not None and a.groups:
        stages("calibrate")
        _calibrate_or_fall_back(a, choice, opts, calibration)
    stages("plan")
    the_plan = make_plan(a, choice.removals, choice.scores, choice.notes, choice.updates, choice.new_biases)
    if opts.recalibrate and calibration is not None and the_plan.kept:
        refit = {"skipped": "no --calib: fit to synthetic inputs it hurt (spa/rewrite/perp.py)"}
        if calibration.given:
            stages("recalibrate")
            the_plan, refit = refit_normalizations(a.model, the_plan,
                                                   calibration.batches(a.model, a.shapes.input_shapes), rewrite)
        choice.data_info = {**(choice.data_info or {}), "normalizations_refit": refit}
    stages("rewrite")
    # a session of a model held in memory is fed a copy of each weight (ScratchWeights), and a
    # model saved from memory is written while held: a large model's new weights go to a scratch file
    spill = _held_by_rewrite(a.model, the_plan) > FED_ABOVE
    pruned = rewrite(a.model, the_plan, spill=spill)
    check_signature(a.model, pruned)
    check_shapes(a.model, pruned, a.shapes.input_shapes)
    stages("report")
    report = _pass_report(a, the_plan, pruned, choice)
    # a user's model that holds its weights in its file (read in place, or given in memory): so does the result
    result = PruneResult(pruned, a.model, report, a.source, a.files, [the_plan], one_file=not in_data_files(a.model))
    _verify(a, the_plan, result, opts.verify, stages)
    return result


def _held_by_rewrite(model: onnx.ModelProto, plan) -> int:
    """At most how many weight bytes the pruned model would hold in memory: the ones the input
    holds, and the ones the plan changes (at their size before pruning)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL or t.name in plan.updates or plan.slices(t))


def _calibrate_or_fall_back(a: Analysis, choice: "_Choice", opts: PruneOptions, calibration: Calibration):
    try:
        _calibrate(a, choice, opts, calibration)
    except Exception as e:  # noqa: BLE001  (onnxruntime's errors share no base class but Exception)
        if not opts.may_fall_back or (isinstance(e, SpaError) and calibration.given):
            raise   # data the user gave that does not fit the model is their mistake to hear of
        # the default criterion must not refuse a model l1 prunes: keep l1's choice
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.info("OBSPA could not run this model on synthetic inputs (%s); channels chosen by l1", reason)
        choice.data_info = {"fallback": "l1", "reason": reason}


def _choose(a: Analysis, plan: PlanOptions, opts: PruneOptions, budget: Budget | None, stages: Stages,
            calibration: Calibration | None = None) -> _Choice:
    """Score every group and choose its removed positions: by the plan's ratios, or by
    spending the budget where the outputs change least."""
    stages("score")
    criterion = opts.criterion_used
    # data criteria choose which channels later; how many still comes from the plan (on l1)
    scores, notes = score_groups(a.model, a.dep, a.groups, "l1" if criterion in DATA_CRITERIA else criterion,
                                 opts.aggregate, opts.seed)
    removals = plan_removals(a.groups, scores, plan)
    choice = _Choice(removals, scores, notes)
    if budget is not None and a.groups:
        stages("allocate")
        choice.removals, choice.budget_report, choice.changes = spend_budget(
            a, scores, removals, plan, budget, lambda *how: _cost_curves(a, opts, calibration, *how))
    elif budget is not None:
        choice.budget_report = {"kind": budget.kind, "target": budget.target, "achieved": 1.0,
                                "met": budget.target >= 1.0, "reason": "no prunable groups"}
    return choice


def _cost_curves(a: Analysis, opts: PruneOptions, calibration: Calibration, depth, orders, probe,
                 anchored_only: bool) -> CostCurves:
    """Every group's OBS cost curve for the allocation; none (so the budget is spent
    uniformly) where the model does not run on the inputs OBSPA would use."""
    try:
        return obs_cost_curves(a.model, a.dep, a.groups, calibration, a.shapes.input_shapes, _damping(a, opts), depth,
                               orders, probe, count_macs(a.model, a.shapes), opts.compensation, anchored_only)
    except Exception as e:  # noqa: BLE001  (as _calibrate_or_fall_back: OBSPA itself will say more)
        if not opts.may_fall_back or (isinstance(e, SpaError) and calibration.given):
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.info("no OBS costs for the allocation (%s): spent uniformly", reason)
        return CostCurves([None] * len(a.groups), [None] * len(a.groups), {"unpriced": f"OBS failed ({reason})"})


def _damping(a: Analysis, opts: PruneOptions) -> float:
    """OBS's damping: the one asked for, else the model's default (``default_damping``)."""
    return opts.damping or default_damping(a.model)


def _calibrate(a: Analysis, choice: _Choice, opts: PruneOptions, calibration: Calibration):
    """Data-aware: re-choose with a data criterion, and compute OBSPA's weight updates.
    OBSPA with calibration data first chooses how to use it on held-out samples."""
    refit, held_out = None, None
    criterion, damping = opts.criterion_used, _damping(a, opts)
    macs = count_macs(a.model, a.shapes)
    by_obs = (choice.budget_report or {}).get("allocation") == "obs"
    if criterion == "obspa" and calibration.data is not None and any(len(r) for r in choice.removals):
        use, held_out = choose_use(a, choice.removals, calibration, damping, macs, opts.compensation, by_obs)
        if use == "data-free":
            calibration = calibration.without_data()
        refit = {"refit": True, "one pass": False}.get(use)
    dplan = data_aware_plan(a.model, a.dep, a.groups, [len(r) for r in choice.removals], criterion,
                            calibration, a.shapes.input_shapes, opts.recalibrate, damping, chosen=choice.removals,
                            macs=macs, refit=refit, compensation=opts.compensation,
                            chosen_by_obs=by_obs)
    if held_out is not None:
        dplan.info["held_out"] = held_out
    choice.removals = [r if r is not None else old for r, old in zip(dplan.removals, choice.removals)]
    choice.scores = [s if s is not None else old for s, old in zip(dplan.scores, choice.scores)]
    choice.notes.update(dplan.notes)
    choice.data_info = dplan.info
    choice.updates, choice.new_biases = dplan.weights, dplan.new_biases


def _pass_report(a: Analysis, plan: Plan, pruned: onnx.ModelProto, choice: _Choice) -> dict:
    """The report of one pass, from the plan (what was removed) and both models (sizes)."""
    after_shapes = infer_shapes(pruned, a.shapes.input_shapes, want_values=False)
    report = {
        "source": a.source,
        "input_shapes": {k: list(v) for k, v in a.shapes.input_shapes.items()},
        **({"probe": a.shapes.probe} if a.shapes.probe else {}),  # the verify step adds "second"
        "before": {"params": count_params(a.model), "macs": count_macs(a.model, a.shapes)},
        "after": {"params": count_params(pruned), "macs": count_macs(pruned, after_shapes)},
        "groups": plan.groups_report(lambda gid: a.member_names(a.groups[gid]),
                                     lambda gid: a.layer_names(a.groups[gid])),
        **{k: v for k, v in a.summary().items() if k != "groups"},
    }
    if a.files:
        report["before"]["file_bytes"] = file_bytes(a.files)
    if choice.data_info is not None:
        report["data"] = choice.data_info
    if choice.budget_report is not None:
        report["budget"] = _as_written(choice.budget_report, report)
    for row, change in zip(report["groups"], choice.changes or []):
        row["output_change"] = change
    return report


def _as_written(budget: dict, report: dict) -> dict:
    """A MACs or params budget's share as the written model has it (the allocation's model of
    it leaves out what the compensation adds: biases where a layer had none)."""
    kind = budget.get("kind")
    if kind not in ("macs", "params") or "achieved" not in budget or not report["before"][kind]:
        return budget
    actual = report["after"][kind] / report["before"][kind]
    if abs(actual - budget["achieved"]) > 1e-12:
        budget.update(allocated=budget["achieved"], achieved=actual, met=actual <= budget["target"] + 1e-9,
                      landed=abs(actual - budget["target"]) <= LANDING_TOLERANCE * budget["target"] + 1e-9)
        if budget.get("macs_share") is not None and kind == "macs":
            budget["macs_share"] = actual
    return budget


def _verifies(a: Analysis, params: int, verify: bool | None) -> bool:
    """Whether a pass of a model of ``params`` parameters is verified: as asked, or by default
    below VERIFY_AUTO_MAX_PARAMS and VERIFY_AUTO_MAX_NODES."""
    if verify is not None:
        return verify
    return params <= VERIFY_AUTO_MAX_PARAMS and len(a.model.graph.node) <= VERIFY_AUTO_MAX_NODES


def _verify(a: Analysis, plan: Plan, result: PruneResult, verify: bool | None, stages: Stages):
    """The oracle (exact pruning) or the output error (hidden width) into the report; by
    default only below VERIFY_AUTO_MAX_PARAMS. Raises when the pruned model is wrong."""
    report, pruned = result.report, result.stored
    asked = verify
    if not _verifies(a, report["before"]["params"], verify):
        return
    stages("verify")
    check_valid(pruned, a.model)
    if any(c.kind == "hidden" and len(c.removed) for c in plan.choices):
        report["verify"] = output_error(a.model, pruned, a.shapes.input_shapes)
        if not report["verify"]["finite"]:
            raise VerificationError("pruning the hidden width made the outputs non-finite")
        return
    shapes = a.shapes.input_shapes
    if a.shapes.probe:  # sizes spa chose: check a second size too, so none holds for one shape only
        second, report["probe"]["second"] = a.second_probe()
        shapes = [shapes, second] if second else shapes
    try:
        checked = oracle(pruned, masked_model(a.model, plan, a.shapes), shapes, a.model)
    except UnsupportedModelError as e:
        if asked:
            raise
        report["verify"] = {"skipped": str(e)}
        log.info("not verified: %s", e)
        return
    report["verify"] = checked.as_dict()
    if not checked.ok:
        raise VerificationError(
            f"pruned model differs from the masked original ({checked.describe()}); please report this model")
