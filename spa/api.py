"""The pipeline as stages: load -> normalize -> analyze -> score -> plan -> rewrite -> verify."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx

from .budget import Budget
from .calibrated import choose_use
from .budget import spend as spend_budget
from .budget import step as split_step
from .errors import SpaError, StrictModeError, UnsupportedModelError, VerificationError
from .graph.dependency import Dependency, build_dependency
from .graph.groups import Group, find_groups
from .importance import CRITERIA, score_groups
from .importance.data import Calibration
from .importance.obspa import DATA_CRITERIA, data_aware_plan
from .interop import from_graphsurgeon, is_graphsurgeon_graph, to_graphsurgeon
from .metrics import count_macs, count_params
from .fold import fold_normalized_weights
from .model import normalize, opset_of, read, save
from .shapes import Shapes, infer_shapes
from .perp import refit_normalizations
from .plan import Plan, make_plan
from .planner import PlanOptions, plan_removals
from .probe import second_probe
from .runtime import LARGE_GRAPH_NODES
from .rewrite import rewrite
from .verify import check_shapes, check_signature, check_valid, masked_model, oracle, output_error

__all__ = ["Analysis", "Loaded", "PruneResult", "analyze", "prune", "DEFAULT_ROUND_TO"]

log = logging.getLogger(__name__)

# ``hidden=HIDDEN_AS_RATIO`` (a bare --hidden) prunes the residual width by ``ratio``.
HIDDEN_AS_RATIO = -1.0
# Kept channels are rounded to a multiple of this by default (see benchmarks/README.md).
DEFAULT_ROUND_TO = 8
# benchmarks/accuracy.py: without data, OBSPA keeps more accuracy than l1 at every ratio >= 0.3
# on 7 of its 8 models (not the depthwise/SE mobile net, where both collapse); it falls back to
# l1 where the model cannot run
DEFAULT_CRITERION = "obspa"
# The oracle runs by default below this many parameters and graph nodes: it builds two
# onnxruntime sessions with the users' default options, whose time grows much faster than the
# node count (spa.runtime.LARGE_GRAPH_NODES: minutes for a 100k-node chain).
VERIFY_AUTO_MAX_PARAMS = 50_000_000
VERIFY_AUTO_MAX_NODES = LARGE_GRAPH_NODES


@dataclass
class Analysis:
    """A normalized model, its static shapes, its channel dependency and its groups."""

    model: onnx.ModelProto
    shapes: Shapes
    dep: Dependency
    groups: list[Group]
    blocked: list[Group]
    source: str | None = None
    default_inputs: list = field(default_factory=list)  # IR >= 4 inputs with a default initializer
    files: dict = field(default_factory=dict)           # the files read: what each is -> path

    def member_names(self, group: Group) -> list[str]:
        inits = self.dep.view.inits if self.dep.view is not None else {t.name for t in self.model.graph.initializer}
        return [f"{t}[{a}]" for t, a in group.spaces if t in inits]

    def span(self, group: Group) -> int:
        """How many indices of a heads or head-dim axis one channel of the group covers: a
        key/value head shared by N query heads spans N, a RoPE pair of head dims spans 2."""
        best = 1
        for space in group.spaces:
            c = self.dep.space_class[space]
            if c in self.dep.head_classes or c in self.dep.head_dim_classes:
                best = max(best, len(group.member(self.dep, space)[0]) // max(1, group.size))
        return best

    @property
    def graph(self):
        """The dependency graph as a networkx MultiGraph: one node per space (tensor axis,
        id ``"tensor[axis]"``) with its ``tensor``, ``axis``, ``size``, ``group`` (id, -1 if
        in no group), ``kind`` and ``blocked`` (reason, "" if none); one edge per coupling
        the rules stated (``coupling``: same, offset, product; ``node``: the node that
        stated it). A contraction (the input axis a node sums over) is an edge to an operator
        node ``"op:<name>"``."""
        import networkx as nx
        dep, graph = self.dep, nx.MultiGraph()
        where: dict = {}
        for g in self.groups + self.blocked:
            for space in g.spaces:
                where.setdefault(space, g)

        def sid(space):
            return f"{space[0]}[{space[1]}]"

        for space, size in dep.couplings.sizes.items():
            g = where.get(space)
            graph.add_node(sid(space), tensor=space[0], axis=int(space[1]), size=int(size),
                           group=g.id if g else -1, kind=(g.kind if g and not g.blocked else
                                                          "blocked" if g else ""),
                           blocked=(g.blocked or "") if g else "")
        for a, b, node in dep.couplings.same:
            graph.add_edge(sid(a), sid(b), coupling="same", node=node)
        for small, big, start, step, node in dep.couplings.offset:
            graph.add_edge(sid(small), sid(big), coupling="offset", node=node, start=int(start), step=int(step))
        for whole, factors, node in dep.couplings.product:
            for f in factors:
                graph.add_edge(sid(whole), sid(f), coupling="product", node=node)
        nodes = {n.name or f"{n.op_type}_{i}": n for i, n in enumerate(self.model.graph.node)}
        for name, k, axis in dep.couplings.contractions:   # input k of the node is summed over
            node = nodes.get(name)
            space = (node.input[k], axis) if node is not None and k < len(node.input) else None
            if space in dep.couplings.sizes:
                graph.add_node(f"op:{name}", op=node.op_type, kind="operator", group=-1)
                graph.add_edge(sid(space), f"op:{name}", coupling="contraction", node=name)
        return graph

    def summary(self) -> dict:
        return {
            "groups": [{"id": g.id, "kind": g.kind, "channels": g.size, "span": self.span(g),
                        "members": self.member_names(g)} for g in self.groups],
            "blocked": [{"id": g.id, "channels": g.size, "members": self.member_names(g), "reason": g.blocked,
                         "reasons": g.reasons} for g in self.blocked],
            "blocked_nodes": [{"node": n, "op": op, "reason": r} for n, op, r in self.dep.blocked_nodes],
        }


@dataclass
class Loaded:
    """A model spa read from ``path`` itself (so it may be normalized in place), and the
    files it was read from (see ``spa.model.read``)."""

    model: onnx.ModelProto
    path: str
    files: dict

    @classmethod
    def read(cls, path) -> "Loaded":
        model, files = read(path)
        return cls(model, str(path), files)


def _as_model(model_or_path) -> tuple[onnx.ModelProto, Loaded | None]:
    """The model, and where it came from when spa read it (then spa owns the proto)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, None
    if is_graphsurgeon_graph(model_or_path):
        return from_graphsurgeon(model_or_path), None
    if not isinstance(model_or_path, (str, os.PathLike, Loaded)):
        raise SpaError(f"expected a path, an onnx.ModelProto or an onnx_graphsurgeon Graph, "
                       f"got {type(model_or_path).__name__}")
    loaded = model_or_path if isinstance(model_or_path, Loaded) else Loaded.read(model_or_path)
    return loaded.model, loaded


def analyze(model_or_path, input_shapes: dict | None = None, exclude: list[str] | None = None,
            attention: str = "heads", allow_mixing: bool = False, conv_groups: str = "auto") -> Analysis:
    """Load (if a path), normalize, infer shapes and find the groups. ``attention`` picks
    whether attention splits are pruned as whole ``heads`` or as ``head-dims``;
    ``allow_mixing`` also offers channels that normalizations mix (inexact ``hidden`` groups);
    ``conv_groups="width"`` offers the per-group width of grouped convolutions (the same
    positions of every group, ``group-width`` groups) where ``auto`` prunes the larger of
    groups and width."""
    model, loaded = _as_model(model_or_path)
    inits = {t.name for t in model.graph.initializer}
    defaults = [vi for vi in model.graph.input if vi.name in inits] if model.ir_version >= 4 else []
    with _cycle_collection_paused():
        model = normalize(model, copy=loaded is None)
        fold_normalized_weights(model)
        shapes = infer_shapes(model, input_shapes)
        dep = build_dependency(model, shapes, opset_of(model), exclude, attention, allow_mixing, conv_groups)
        groups, blocked = find_groups(dep, _constants(model))
    return Analysis(model, shapes, dep, groups, blocked, loaded and loaded.path, defaults,
                    loaded.files if loaded else {})


@contextlib.contextmanager
def _cycle_collection_paused():
    """The analysis makes millions of small tuples, lists and dicts (a few per tensor axis),
    none of them cyclic garbage; Python's cycle collector would walk them again and again
    (a 100k-node chain: a quarter of its analysis time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _constants(model: onnx.ModelProto) -> set[str]:
    """Tensors known before running: initializers and outputs of nodes that read only them
    (a dequantized or transposed weight)."""
    known = {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:      # topologically sorted
        if node.op_type == "Constant" or all(i in known for i in node.input) and node.input:
            known.update(node.output)
    known.discard("")
    return known


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


@dataclass
class PruneResult:
    model: onnx.ModelProto
    original: onnx.ModelProto
    report: dict = field(default_factory=dict)
    source: str | None = None
    files: dict = field(default_factory=dict)  # what the original was read from: never written
    plans: list = field(default_factory=list)  # the Plan of each pass, in order

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pruned model atomically; refuses to overwrite the input model or its
        external data."""
        written = save(self.model, path, inputs=self.files)
        after = self.report.setdefault("after", {})
        after["file_bytes"] = sum(os.path.getsize(p) for p in written)
        after["files"] = [str(p) for p in written]
        return written[0]

    def save_plan(self, path: str | os.PathLike) -> list[Path]:
        """Write the plan file (JSON, and an ``.npz`` beside it when values changed): what
        this pruning changed per tensor of the original, for ``spa.torch.apply_plan``. See
        ``spa.plan_file``."""
        from .files import check_outputs
        from .plan_file import write_plan
        path = Path(path)
        check_outputs({"--plan": path, "--plan arrays": path.with_name(path.name + ".npz")},
                      {k: Path(v) for k, v in self.files.items()})
        return write_plan(self, path)

    def to_graphsurgeon(self):
        """The pruned model as an ``onnx_graphsurgeon.Graph`` (extra ``graphsurgeon``)."""
        return to_graphsurgeon(self.model)


def _file_bytes(files: dict) -> int:
    return sum(os.path.getsize(f) for f in files.values())


def prune(model_or_path, ratio: float | None = None, criterion: str | None = None, *, heads: float | None = None,
          mlp: float | None = None, head_dims: float | None = None, hidden: float | None = None,
          group_width: float | None = None, global_rank: bool = False,
          max_ratio: float = 0.9, round_to: int | str = DEFAULT_ROUND_TO, exclude: list[str] | None = None,
          input_shapes: dict | None = None, verify: bool | None = None, strict: bool = False,
          aggregate: str = "sum", seed: int = 0, calib=None, input_stats: dict | None = None,
          recalibrate: bool = False, calib_samples: int | None = None, damping: float = 0.01,
          macs: float | None = None, params: float | None = None, latency: float | None = None,
          steps: int | None = None, allocation: str = "auto", on_stage: Callable[[str], None] | None = None) -> PruneResult:
    """Prune ``ratio`` of the channels of every prunable group (or globally). Without a
    ratio: 0.5, or 0 for every structure not named when ``heads``/``mlp``/``head_dims``/
    ``hidden`` is given (the CLI means the same).

    Data-aware criteria (``obspa``, ``activation``, ``dead``) and ``recalibrate`` use
    activations of ``calib`` (an ``.npz`` path, a dict of arrays named after the inputs, or an
    iterable of feed dicts; with ``calib_samples``, at most that many of its samples, one from
    each cluster of the model's outputs: ``spa.importance.select``) or, without it, of
    ``calib_samples`` (64) synthetic inputs drawn with
    ``input_stats`` ({input: (mean, std)}, per channel or scalar). OBSPA damps each Hessian
    by ``damping`` times its mean diagonal.

    ``mlp`` and ``heads`` override ``ratio`` for plain channel groups (conv channels, MLP
    neurons) and for whole attention heads; ``head_dims`` then removes that share of the
    dims of every remaining head in a second pass on the pruned model, and ``hidden`` that
    share of the residual width (through LayerNorm/RMSNorm: inexact, the report gives the
    output error instead of the oracle) in a last pass. ``group_width`` removes that share of
    the per-group width of every grouped convolution (the same positions in each group, the
    group count kept) in a pass of its own after the channel passes: ``ratio`` removes whole
    groups where a grouped conv has more groups than channels per group (RegNet, ResNeXt),
    ``group_width`` thins the groups that are left.

    A budget replaces the uniform ratio: ``macs``, ``params`` or ``latency`` keep that share
    of the original's MACs, weights or onnxruntime latency (measured here, one thread), and
    the cut goes where it changes the outputs least (see ``spa.allocate``): each group's
    sensitivity is measured on ``calib`` or synthetic inputs. ``heads``/``mlp`` then pin
    those kinds at their ratio and the budget is spent on the rest. ``allocation="uniform"``
    instead finds the one ratio for every group that just meets the budget; ``"auto"``
    measures for magnitude criteria and goes uniform for OBSPA (see benchmarks/README.md).

    ``steps`` > 1 prunes incrementally: each step removes an equal share of what is to go
    (of the budget, or ``1 - (1 - ratio) ** (1 / steps)`` of every group), and the next step
    re-analyzes, re-scores and re-compensates the already pruned model. Default: 3 for a
    measured MACs/params budget, else 1.

    ``criterion`` defaults to ``DEFAULT_CRITERION`` (OBSPA, data-free without ``calib``); when
    the model cannot be run on synthetic inputs, that default falls back to l1 and the report's
    ``data`` says why. A criterion given explicitly never falls back.

    >>> result = prune("model.onnx", ratio=0.5, criterion="l1")   # doctest: +SKIP
    >>> result.save("model.pruned.onnx"); result.report["after"]["macs"]  # doctest: +SKIP
    """
    # The one place options get their defaults (the CLI passes what the user typed).
    budgets = {k: v for k, v in (("macs", macs), ("params", params), ("latency", latency)) if v is not None}
    if budgets and ratio is not None:
        raise SpaError("--ratio and a budget (--macs/--params/--latency F) exclude each other")
    if hidden == HIDDEN_AS_RATIO:
        hidden = ratio if ratio is not None else 0.5
    if ratio is None:  # structures the user does not name are left whole
        named = any(r is not None for r in (heads, mlp, head_dims, hidden, group_width))
        ratio = 0.0 if named else 0.5
    for name, r in (("ratio", ratio), ("heads", heads), ("mlp", mlp), ("head-dims", head_dims),
                    ("hidden", hidden), ("group-width", group_width)):
        if r is not None and not 0 <= r < 1:
            raise SpaError(f"--{name} must be in [0, 1), got {r}")
    if round_to == "auto":   # the CPU's vector width (see benchmarks/round_to.py for what it buys)
        from .runtime import vector_channels
        round_to = vector_channels()
    if not isinstance(round_to, int) or round_to < 1:
        raise SpaError(f"--round-to must be at least 1 or 'auto', got {round_to!r}")
    if len(budgets) > 1:
        raise SpaError(f"give one budget, not {' and '.join('--' + k for k in budgets)}")
    for name, v in budgets.items():
        if not 0 < v <= 1:
            raise SpaError(f"--{name} is the share of the original to keep, in (0, 1]; got {v}")
    default_criterion = criterion is None
    if default_criterion:
        criterion = DEFAULT_CRITERION
    if criterion not in CRITERIA:
        raise SpaError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    options = {"ratio": ratio, "heads": heads, "mlp": mlp, "head_dims": head_dims, "hidden": hidden,
               "group_width": group_width,
               "criterion": criterion,
               "global": global_rank, "max_ratio": max_ratio, "round_to": round_to,
               "exclude": list(exclude or []), "aggregate": aggregate, "seed": seed}
    ratios = tuple((k, r) for k, r in (("channels", mlp), ("heads", heads)) if r is not None)
    plan = PlanOptions(ratio, ratios, global_rank, max_ratio, round_to)
    options.update(calib=str(calib) if isinstance(calib, (str, os.PathLike)) else
                   ("given" if calib is not None else None), recalibrate=recalibrate)
    calibration = Calibration(calib, input_stats, samples=calib_samples or 64, seed=seed,
                              select=calib_samples if calib is not None else None) \
        if criterion in DATA_CRITERIA or recalibrate else None
    args = dict(criterion=criterion, fallback=default_criterion, aggregate=aggregate, seed=seed, verify=verify,
                strict=strict,
                calibration=calibration, recalibrate=recalibrate, damping=damping, on_stage=on_stage or (lambda name: None))
    first = _analyze_stage(model_or_path, input_shapes, exclude, "heads", args["on_stage"])
    budget = None
    if budgets:
        (kind, target), = budgets.items()
        if allocation not in ("auto", "measured", "uniform"):
            raise SpaError(f"allocation must be auto, measured or uniform, got {allocation!r}")
        if allocation == "auto":
            # benchmarks/allocation.py: measuring where to cut pays for magnitude criteria (l1
            # beats uniform in 8 of 12 cells, 9 of 12 with calibration images: Fashion ResNet
            # at 0.65 MACs 0.38 -> 0.82); for OBSPA, whose compensation repairs an even cut,
            # it is a coin toss (6 of 12 data-free, calibrated within a point)
            allocation = "uniform" if criterion == "obspa" else "measured"
        budget = Budget(kind, target, calib, input_stats or {}, seed, how=allocation)
        options["budget"] = {kind: target, "allocation": allocation}
    if steps is None:
        # benchmarks/steps.py: re-measuring between 3 steps pays for a measured allocation
        # (Fashion VGG l1 at 0.49 MACs: 0.54 -> 0.85 top-1) but not for OBSPA's even cut
        # (within +-4 points at 2-4x the time)
        steps = 3 if budget is not None and budget.how == "measured" and budget.kind != "latency" else 1
    if steps < 1:
        raise SpaError(f"--steps must be at least 1, got {steps}")
    if budgets and (head_dims or hidden or group_width):
        raise SpaError("a budget (--macs/--params/--latency) spends on channels and heads; --head-dims, "
                       "--group-width and --hidden cannot share it yet: give them with --ratio")
    if steps > 1 and latency is not None:
        raise SpaError("--steps with --latency is not supported: use --macs, or one step")
    result = None
    for step in range(1, steps + 1):
        a = first if result is None else _analyze_stage(result.model, result.report["input_shapes"], exclude,
                                                         "heads", args["on_stage"])
        step_plan, step_budget = split_step(plan, budget, step, steps, result)
        one = _prune_pass(a, step_plan, budget=step_budget, **args)
        result = one if result is None else _merge_passes(result, one)
    if steps > 1 and budget is not None:
        key = "params" if budget.kind == "params" else "macs"
        result.report.setdefault("budget", {"kind": budget.kind}).update(target=budget.target, steps=steps,
                                       achieved=result.report["after"][key] / result.report["before"][key])
        result.report["budget"]["met"] = result.report["budget"]["achieved"] <= budget.target + 1e-9
        if result.report["budget"].get("macs_share") is not None:   # the last step's share is not the run's
            result.report["budget"]["macs_share"] = result.report["after"]["macs"] / result.report["before"]["macs"]
    if head_dims:
        plan = PlanOptions(0.0, (("head-dims", head_dims),), global_rank, max_ratio, round_to)
        second = _prune_pass(_analyze_stage(result.model, result.report["input_shapes"], exclude, "head-dims",
                                           args["on_stage"]), plan, **args)
        result = _merge_passes(result, second)
    if group_width:
        plan = PlanOptions(0.0, (("group-width", group_width),), global_rank, max_ratio, round_to)
        width = _prune_pass(_analyze_stage(result.model, result.report["input_shapes"], exclude, "heads",
                                           args["on_stage"], conv_groups="width"), plan, **args)
        result = _merge_passes(result, width)
    if hidden:
        plan = PlanOptions(0.0, (("hidden", hidden),), global_rank, max_ratio, round_to)
        third = _prune_pass(_analyze_stage(result.model, result.report["input_shapes"], exclude, "heads",
                                           args["on_stage"], allow_mixing=True), plan, **args)
        result = _merge_passes(result, third)
    _restore_default_inputs(result.model, first.default_inputs)
    if first.shapes.probe:  # later passes analyze at the sizes the first pass chose
        result.report["probe"] = first.shapes.probe
    result.report["options"] = options
    return result


def _analyze_stage(model, input_shapes, exclude, attention, on_stage, allow_mixing=False,
                   conv_groups="auto") -> Analysis:
    on_stage("analyze")
    shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    return analyze(model, shapes, exclude, attention, allow_mixing, conv_groups)


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
            "rounded_noise": v1.get("rounded_noise", 0) + v2.get("rounded_noise", 0)}
    return PruneResult(second.model, first.original, rep, first.source, first.files, first.plans + second.plans)


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


def _prune_pass(a: Analysis, plan: PlanOptions, *, criterion, aggregate, seed, verify, strict,
                calibration, recalibrate, damping, on_stage, budget: Budget | None = None,
                fallback: bool = False) -> PruneResult:
    """One pass: choose -> (calibrate) -> plan -> rewrite -> check -> report -> verify."""
    if strict and a.dep.blocked_nodes:
        name, op, reason = a.dep.blocked_nodes[0]
        raise StrictModeError(f"--strict: {reason} ({len(a.dep.blocked_nodes)} node(s) blocked)")
    choice = _choose(a, plan, criterion, aggregate, seed, budget, on_stage)
    if calibration is not None and a.groups:
        on_stage("calibrate")
        try:
            _calibrate(a, choice, criterion, calibration, recalibrate, damping)
        except Exception as e:  # noqa: BLE001  (onnxruntime's errors share no base class but Exception)
            if not fallback:
                raise
            # the default criterion must not refuse a model l1 prunes: keep l1's choice
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.info("OBSPA could not run this model on synthetic inputs (%s); channels chosen by l1", reason)
            choice.data_info = {"fallback": "l1", "reason": reason}
    the_plan = make_plan(a, choice.removals, choice.scores, choice.notes, choice.updates, choice.new_biases)
    if recalibrate and calibration is not None and the_plan.kept:
        refit = {"skipped": "no --calib: fit to synthetic inputs it hurt (spa/perp.py)"}
        if calibration.data is not None:
            on_stage("recalibrate")
            refit = refit_normalizations(a.model, the_plan, calibration.batches(a.model, a.shapes.input_shapes),
                                         rewrite)
        choice.data_info = {**(choice.data_info or {}), "normalizations_refit": refit}
    on_stage("rewrite")
    pruned = rewrite(a.model, the_plan)
    check_signature(a.model, pruned)
    check_shapes(a.model, pruned, a.shapes.input_shapes)
    report = _pass_report(a, the_plan, pruned, choice)
    result = PruneResult(pruned, a.model, report, a.source, a.files, [the_plan])
    _verify(a, the_plan, result, verify, on_stage)
    return result


def _choose(a: Analysis, plan: PlanOptions, criterion, aggregate, seed, budget, on_stage) -> _Choice:
    """Score every group and choose its removed positions: by the plan's ratios, or by
    spending the budget where the outputs change least."""
    on_stage("score")
    try:
        # data criteria choose which channels later; how many still comes from the plan (on l1)
        scores, notes = score_groups(a.model, a.dep, a.groups, "l1" if criterion in DATA_CRITERIA else criterion,
                                     aggregate, seed)
        removals = plan_removals(a.groups, scores, plan)
    except ValueError as e:
        raise SpaError(str(e)) from None
    choice = _Choice(removals, scores, notes)
    if budget is not None and a.groups:
        on_stage("allocate")
        choice.removals, choice.budget_report, choice.changes = spend_budget(a, scores, removals, plan, budget)
    elif budget is not None:
        choice.budget_report = {"kind": budget.kind, "target": budget.target, "achieved": 1.0,
                                "met": budget.target >= 1.0, "reason": "no prunable groups"}
    return choice


def _calibrate(a: Analysis, choice: _Choice, criterion, calibration, recalibrate, damping):
    """Data-aware: re-choose with a data criterion, and compute OBSPA's weight updates.
    OBSPA with calibration data first chooses how to use it on held-out samples."""
    refit, held_out = None, None
    macs = count_macs(a.model, a.shapes)
    if criterion == "obspa" and calibration.data is not None and any(len(r) for r in choice.removals):
        use, held_out = choose_use(a, choice.removals, calibration, damping, macs)
        if use == "data-free":
            calibration = calibration.without_data()
        refit = {"refit": True, "one pass": False}.get(use)
    dplan = data_aware_plan(a.model, a.dep, a.groups, [len(r) for r in choice.removals], criterion,
                            calibration, a.shapes.input_shapes, recalibrate, damping, chosen=choice.removals,
                            macs=macs, refit=refit)
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
        "groups": plan.groups_report(lambda gid: a.member_names(a.groups[gid])),
        **{k: v for k, v in a.summary().items() if k != "groups"},
    }
    if a.files:
        report["before"]["file_bytes"] = _file_bytes(a.files)
    if choice.data_info is not None:
        report["data"] = choice.data_info
    if choice.budget_report is not None:
        report["budget"] = choice.budget_report
    for row, change in zip(report["groups"], choice.changes or []):
        row["output_change"] = change
    return report


def _verify(a: Analysis, plan: Plan, result: PruneResult, verify, on_stage):
    """The oracle (exact pruning) or the output error (hidden width) into the report; by
    default only below VERIFY_AUTO_MAX_PARAMS. Raises when the pruned model is wrong."""
    report, pruned = result.report, result.model
    asked = verify
    if verify is None:
        verify = (report["before"]["params"] <= VERIFY_AUTO_MAX_PARAMS
                  and len(a.model.graph.node) <= VERIFY_AUTO_MAX_NODES)
    if not verify:
        return
    on_stage("verify")
    check_valid(pruned, a.model)
    if any(c.kind == "hidden" and len(c.removed) for c in plan.choices):
        report["verify"] = output_error(a.model, pruned, a.shapes.input_shapes)
        if not report["verify"]["finite"]:
            raise VerificationError("pruning the hidden width made the outputs non-finite")
        return
    shapes = a.shapes.input_shapes
    if a.shapes.probe:  # sizes spa chose: check a second size too, so none holds for one shape only
        second, report["probe"]["second"] = second_probe(a.model, a.shapes)
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
