"""What removing each group's channels costs once OBS has compensated it: the curves a
budget is spent along (``--allocate obs``).

An allocation compares cuts across groups: k neurons of one MLP against a key/value head of
another layer. Two things set what a cut costs:

- **Its shape, from OBS.** Removing a group's channels one chunk at a time, cheapest first
  (``greedy_obs``), prices each removal by the increase of its layers' output error
  ``||(W' - W) X||^2`` with the kept weights refit: the cumulative cost after k removals, for
  every k, is the group's curve. It is what OBSPA's compensation leaves behind, which the
  measured allocation (zeroing channels, no compensation) cannot see.
- **Its scale, measured.** A layer's error is in its own output's units, and what reaches the
  model's outputs depends on everything after it. So each curve is scaled by one
  measurement: the model run with that group alone cut at ``probe`` channels and compensated
  (its layers' weights fed to the session as OBS left them), the change of the outputs
  divided by the curve's cost at that point.

The allocation (``spa.plan.allocate``, ``CostRunner``) then spends the budget where the sum of
the scaled curves grows least per parameter or MAC saved: a head, which saves as many
parameters as a few hundred neurons, goes only where it is that cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from ..graph.dependency import Dependency
from ..graph.groups import Group
from ..loading.model import release_mapped
from ..progress import track
from .data import BatchLayout, Calibration, _attr
from .obs import LowRankConsumer, greedy_obs
from .obspa import (DataPlan, _columns, _consumers_of, _write_back, chooses_by_magnitude, obs_consumer,
                    statistics_by_part, statistics_source)

__all__ = ["CostCurves", "obs_cost_curves"]

# A probe run costs at most this many multiply-adds (samples x the model's MACs): one run a group
PROBE_MACS = 2e10


@dataclass
class CostCurves:
    """Per group: its channels in the order they go, and ``costs[k]``, what removing the first
    k costs in output change (``costs[0] == 0``; as long as the deepest cut asked for). None
    for a group no layer with statistics reads."""

    orders: list[np.ndarray | None]
    costs: list[np.ndarray | None]
    info: dict = field(default_factory=dict)


def obs_cost_curves(model: onnx.ModelProto, dep: Dependency, groups: list[Group], calibration: Calibration,
                    input_shapes: dict, damping: float, depth: list[int], magnitude_orders: list[np.ndarray],
                    probe: list[int], macs: int = 0, compensation: str = "obs",
                    anchored_only: bool = False) -> CostCurves:
    """The cost curve of every group, down to ``depth[g]`` channels removed, on the statistics
    OBSPA's compensation will use (the same calibration, so self-written text is written once),
    scaled by the output change measured with ``probe[g]`` channels removed. Where OBSPA lets
    the magnitude criterion choose (``chooses_by_magnitude``), the curve follows
    ``magnitude_orders`` (lowest score first) and OBS prices each removal all the same.

    ``anchored_only``: no curves (``info["unanchored"]`` says why) unless the statistics come
    from calibration data or synthetic images steered by BatchNorm statistics. Measured on
    unanchored inputs the curves misplace the cuts: SmolLM2 on its self-written text at 20 %
    of its parameters, perplexity 232 against 142 uniform; Fashion VGG with BatchNorm folded at
    half its MACs, top-1 0.41 against 0.85 (benchmarks/lm_smollm2.py, benchmarks/accuracy.py)."""
    inits = {t.name: t for t in model.graph.initializer}
    used, axis_of, _ = _consumers_of(model, dep, groups, inits)
    batches = calibration.batches(model, input_shapes)
    release_mapped()
    info: dict = {}
    layout = BatchLayout.of(model, input_shapes)
    source, steered, images = statistics_source(model, calibration, layout, batches, info)
    by_magnitude = chooses_by_magnitude(calibration, images, steered, compensation)
    if anchored_only and calibration.data is None and not steered:
        info["unanchored"] = ("no calibration data and no BatchNorm statistics to steer synthetic inputs by: "
                              "the output change they measure misplaces cuts")
        return CostCurves([None] * len(groups), [None] * len(groups), info)
    # the model as it is: a steered copy renormalizes each batch, undoing much of any change
    runner = _ProbeRunner(model, used, inits, _probe_feeds(layout, batches[0], macs))
    curves = CostCurves([None] * len(groups), [None] * len(groups), info)
    scales: dict[int, float] = {}
    spaces = [set(g.spaces) for g in groups]
    for part, part_used, stats in statistics_by_part(source, groups, used, axis_of, inits, batches,
                                                     calibration.seed, info):
        for gi in track(part.groups, unit="groups priced"):
            g = groups[gi]
            mine = [name for name in part_used if (used[name].data, axis_of[name]) in spaces[gi] and name in stats]
            k = int(depth[gi])
            if not mine:
                continue
            if not k:           # (the cap allows no cut of this group)
                curves.orders[gi], curves.costs[gi] = np.asarray(magnitude_orders[gi], np.int64), np.zeros(1)
                continue
            consumers = []
            for name in mine:
                c = obs_consumer(used[name], stats[name], inits, damping)
                c.columns = _columns(g, dep, used[name], axis_of[name])
                consumers.append(c)
            at = int(np.clip(probe[gi], 1, k))
            probed: dict = {}

            def after_step(count, consumers=consumers, at=at, probed=probed):
                if count >= at and not probed:
                    probed["count"] = count
                    probed["change"] = runner.change({name: c.weight for name, c in zip(mine, consumers)})
            order = np.asarray(magnitude_orders[gi][:k]) if by_magnitude else None
            # in steps even on wide layers (greedy_obs would take all in one): a curve needs the
            # joint cost at each point and the probe its own; rows-only layers in fewer steps
            steps = 8 if any(isinstance(c, LowRankConsumer) for c in consumers) else 32
            removed, cost = greedy_obs(consumers, g.size, k, steps=steps, max_dim=np.inf, ordered=True, order=order,
                                       after_step=after_step)
            info.setdefault("probes", []).append((g.id, at, probed["count"]))
            rest = np.setdiff1d(np.asarray(magnitude_orders[gi]), removed, assume_unique=True)
            curves.orders[gi] = np.concatenate([removed, rest]).astype(np.int64)
            curve = np.concatenate([[0.0], np.cumsum(np.maximum(cost[removed], 0.0))])
            curves.costs[gi] = curve
            if curve[probed["count"]] > 0 and probed["change"] > 0:
                scales[gi] = probed["change"] / curve[probed["count"]]
        stats.clear()
    # a group whose probe cost nothing either way (a cut OBS undoes exactly) takes the typical scale
    typical = float(np.median(list(scales.values()))) if scales else 1.0
    for gi, curve in enumerate(curves.costs):
        if curve is not None:
            curves.costs[gi] = curve * scales.get(gi, typical)
    info["probe_runs"] = runner.runs
    return curves


def _probe_feeds(layout: BatchLayout, feeds: dict, macs: int) -> dict:
    """The first calibration batch, cut to the samples ``PROBE_MACS`` allows where the batch
    size is free."""
    samples = max(1, int(PROBE_MACS // max(macs, 1)))
    if not layout.free or layout.count(feeds) <= samples:
        return feeds
    return {name: np.take(v, np.arange(samples), axis=layout.axes[name]) if layout.axes.get(name) is not None else v
            for name, v in feeds.items()}


class _ProbeRunner:
    """The model with every OBS layer's weight and bias as an input (a Conv or Gemm without a
    bias gets one: OBS refits it with one): ``change(updated)`` runs it with some layers'
    (out, D [+1]) matrices replaced and returns the relative change of its outputs."""

    def __init__(self, model: onnx.ModelProto, used: dict, inits: dict, feeds: dict):
        from ..loading.model import tensor_names, unique_name
        from ..loading.tensors import weight_view
        from ..plan.allocate import _output_change
        from ..runtime import _structure, session
        self.used, self.feeds, self._change = dict(used), feeds, _output_change
        weights = {n for spec in used.values() for n in (spec.weight, spec.bias) if n is not None}
        listed = {i.name for i in model.graph.input}
        self.weights = {t.name: weight_view(t) for t in model.graph.initializer if t.name in weights}
        probe = _structure(model, {n: None for n in self.weights if n not in listed}, ())
        self.inits = dict(inits)
        taken = tensor_names(model)
        nodes = {n.name: n for n in probe.graph.node}
        for name, spec in used.items():
            node = nodes.get(spec.node.name)
            if spec.bias is not None or spec.kind not in ("conv", "gemm") or node is None:
                continue
            w = inits[spec.weight]
            out = int(w.dims[1] if spec.kind == "gemm" and _attr(spec.node, "transB", 0) == 0 else w.dims[0])
            zero = onnx.numpy_helper.from_array(np.zeros(out, onnx.helper.tensor_dtype_to_np_dtype(w.data_type)),
                                                unique_name(f"{node.name}__probe_bias", taken))
            taken.add(zero.name)
            probe.graph.input.append(onnx.helper.make_tensor_value_info(zero.name, w.data_type, [out]))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = zero.name
            self.weights[zero.name] = onnx.numpy_helper.to_array(zero)
            self.inits[zero.name] = zero
            self.used[name] = replace(spec, bias=zero.name)
        self.session = session(probe)
        self.reference = self.session.run(None, {**feeds, **self.weights})
        self.runs = 0

    def change(self, updated: dict[str, np.ndarray]) -> float:
        plan = DataPlan([], [])
        for name, m in updated.items():
            _write_back(plan, self.used[name], m, self.inits)
        self.runs += 1
        got = self.session.run(None, {**self.feeds, **self.weights, **plan.weights})
        return float(self._change([np.asarray(y) for y in got], self.reference))
