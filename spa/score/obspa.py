"""Data-aware selection and recovery: OBSPA, activation-weighted magnitude, dead channels,
and bias correction (``recalibrate``), all from one pass of activation statistics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.dependency import Dependency
from ..loading.model import release_mapped, tensor_array, tensor_names, unique_name
from ..graph.groups import Group
from ..progress import track
from .data import (BatchLayout, Calibration, ConsumerSpec, collect_stats, consumer_specs, from_weight_matrix,
                   weight_matrix)
from .obs import Consumer, LowRankConsumer, damped_inverse, damping_of, greedy_obs
from .blocks import BlockRunner, NotBlockable
from .steer import steer_batch_norms

__all__ = ["COMPENSATIONS", "DATA_CRITERIA", "SYNTHETIC", "DataPlan", "data_aware_plan"]

log = logging.getLogger(__name__)

DATA_CRITERIA = ("obspa", "activation", "dead")
# Data-free compensation of the removed channels. Weight-only compensation does not need the
# BatchNorm statistics that steer synthetic inputs (steer.py), but on the BN-folded Fashion
# CNNs OBS on unsteered synthetic inputs still compensates better (benchmarks/accuracy.py,
# fashion_*_folded; at half the MACs: ResNet 0.74 OBS / 0.55 merge / 0.51 lsq, VGG 0.85 / 0.73
# / 0.83): OBS stays the default, the others are options.
COMPENSATIONS = ("obs", "merge", "lsq")
# without data, the synthetic inputs: "auto" inverts image classifiers that have no BatchNorm to
# steer by where torch and onnx2torch are installed (invert.py), "invert" insists, "noise" never
SYNTHETIC = ("auto", "noise", "invert")
WEIGHT_ONLY = ("merge", "lsq")


@dataclass
class DataPlan:
    removals: list[np.ndarray]
    scores: list[np.ndarray]
    weights: dict[str, np.ndarray] = field(default_factory=dict)   # initializer -> new value
    new_biases: dict[str, np.ndarray] = field(default_factory=dict)  # node name -> bias to add
    notes: dict[int, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def _columns(group: Group, dep: Dependency, spec: ConsumerSpec, axis: int) -> list[np.ndarray]:
    idx, ch = group.member(dep, (spec.data, axis))
    taps = np.arange(spec.taps)
    cols = [[] for _ in range(group.size)]
    for i, c in zip(idx, ch):
        cols[c].extend((i * spec.taps + taps).tolist())
    return [np.array(c, dtype=np.int64) for c in cols]


# Sequential OBSPA runs the model twice per pruned group; above this many multiply-adds in
# all (groups x samples x model MACs) it falls back to one pass of statistics.
SEQUENTIAL_BUDGET = 2e11
MAX_HESSIAN_DIM = 8192


def data_aware_plan(model: onnx.ModelProto, dep: Dependency, groups: list[Group], n_remove: list[int],
                    criterion: str, calibration: Calibration, input_shapes: dict,
                    recalibrate: bool = False, damping: float = 0.01,
                    chosen: list[np.ndarray] | None = None, macs: int = 0, refit: bool | None = None,
                    compensation: str = "obs", chosen_by_obs: bool = False) -> DataPlan:
    """Choose the channels to remove with a data criterion (DATA_CRITERIA), or take them as
    ``chosen`` by another criterion, and compute the weight updates: OBS compensation for
    ``obspa``, bias correction when ``recalibrate``.

    Steps: the layers that read the groups (``_consumers_of``) -> statistics of their inputs
    -> a choice per group (``_choose``) -> the weight updates.

    With calibration data OBSPA refits group after group (``_obspa_sequential``) when
    ``refit`` is True, or by default when that fits ``SEQUENTIAL_BUDGET``; else one pass.

    Without data, ``compensation`` (COMPENSATIONS) says how removals are compensated: "obs"
    (OBS on the statistics of synthetic inputs), or from the weights alone (merge.py), on the
    channels l1 chose, wherever that is exact to apply (OBS elsewhere): "merge" (each removed
    channel into its most similar kept one) or "lsq" (into all kept ones, least squares under
    Gaussian inputs). With calibration data it is ignored.

    ``chosen_by_obs``: ``chosen`` is what the OBS cost allocation (obs_costs.py) chose, on the
    same statistics: only the compensation is left to compute."""
    inits = {t.name: t for t in model.graph.initializer}
    used, axis_of, too_wide = _consumers_of(model, dep, groups, inits)
    batches = calibration.batches(model, input_shapes)
    release_mapped()      # writing text ran the whole model
    layout = BatchLayout.of(model, input_shapes)
    samples = int(sum(layout.count(b) for b in batches))
    info = {"hessian_source": calibration.source, "samples": samples, "consumers": len(used), **calibration.inversion}
    if too_wide:
        info["too_wide_for_a_hessian"] = too_wide
    # Refitting to the original's outputs pays off on real data (demo CNN at 50% channels:
    # 0.76 -> 0.87 accuracy); on synthetic inputs it chases the noise, so data-free stays one-pass.
    if refit is None:
        refit = sum(1 for k in n_remove if k) * samples * macs <= SEQUENTIAL_BUDGET
    if criterion == "obspa" and calibration.data is not None and refit:
        info["mode"] = "sequential (each group refit on the inputs of the already pruned model)"
        return _obspa_sequential(model, dep, groups, n_remove, used, axis_of, batches, damping, inits, info,
                                 chosen if chosen_by_obs else None)
    source, steered, images = statistics_source(model, calibration, layout, batches, info)
    keep_choice = False
    if criterion == "obspa" and (chosen_by_obs or chooses_by_magnitude(calibration, images, steered, compensation)):
        keep_choice = True
        info["mode"] = ("channels chosen by their OBS costs across groups (the allocation), removal compensated by "
                        "OBS" if chosen_by_obs else "data-free: channels chosen by l1, removal compensated by OBS")
    elif criterion == "obspa":
        info["mode"] = "one pass (statistics of the unpruned model)"
    plan = DataPlan([None] * len(groups), [None] * len(groups), info=info)
    removed_by_merge: set[str] = set()
    if criterion == "obspa" and keep_choice:
        plan.removals = [np.asarray(c, dtype=np.int64) for c in chosen]
        for g in groups:
            if not any((spec.data, axis_of[name]) in set(g.spaces) for name, spec in used.items()):
                plan.notes[g.id] = _without_consumers(dep, g)
        if compensation in WEIGHT_ONLY:
            removed_by_merge = set(_merge(plan, model, dep, groups, used, axis_of, inits, compensation))
    for part, part_used, stats in statistics_by_part(source, groups, used, axis_of, inits, batches,
                                                     calibration.seed, info):
        if criterion == "obspa" and keep_choice:
            removed_cols = _removed_columns(plan, dep, groups, part_used, stats, axis_of)
            for name in removed_by_merge:
                removed_cols.pop(name, None)
            _refit(plan, removed_cols, part_used, stats, inits, damping)
            continue
        _choose(plan, criterion, dep, groups, n_remove, chosen, part_used, axis_of, stats, inits, damping,
                part.groups)
        if recalibrate and criterion != "obspa":
            _bias_correction(plan, _removed_columns(plan, dep, groups, part_used, stats, axis_of), part_used,
                             stats, inits)
    return plan


@dataclass
class Part:
    """Groups (indices) whose statistics are collected and used together, and the consumers
    that read them: no consumer reads a group of another part."""

    groups: list[int]
    consumers: list[str]


# One part's statistics take at most this share of the model's weight bytes (and at least
# PART_MIN_BYTES): a model where that is less than all of them is run once per part, so memory
# stays proportional to its weights (the 2048 sampled rows of a 1.1B decoder's 44 consumers
# are 1.4 GB, a third of its size). Each part costs a pass over the calibration samples.
PART_SHARE = 1 / 4
PART_MIN_BYTES = 128 << 20


def _parts(groups: list[Group], used: dict[str, ConsumerSpec], axis_of: dict, inits: dict) -> list[Part]:
    """The groups in parts that fit the memory bound, closed under shared consumers, in order."""
    from ..loading.model import tensor_bytes
    spaces = [set(g.spaces) for g in groups]
    readers = {name: [gi for gi, sp in enumerate(spaces) if (spec.data, axis_of[name]) in sp]
               for name, spec in used.items()}
    root = list(range(len(groups)))

    def find(i):
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for gis in readers.values():
        for gi in gis[1:]:
            root[find(gi)] = find(gis[0])
    components: dict[int, Part] = {}
    for gi in range(len(groups)):
        components.setdefault(find(gi), Part([], [])).groups.append(gi)
    for name, gis in readers.items():
        if gis:
            components[find(gis[0])].consumers.append(name)
    limit = max(PART_MIN_BYTES, int(PART_SHARE * sum(tensor_bytes(t) for t in inits.values())))
    parts: list[Part] = []
    size = 0
    for c in components.values():
        cost = sum(_statistics_bytes(used[name], inits) for name in c.consumers)
        if not parts or size + cost > limit:
            parts.append(Part([], []))
            size = 0
        parts[-1].groups.extend(c.groups)
        parts[-1].consumers.extend(c.consumers)
        size += cost
    return parts


def _statistics_bytes(spec: ConsumerSpec, inits: dict) -> int:
    """What a consumer's statistics hold: the Gram matrix (float64), or the 2048 sampled rows
    (float32) where those are smaller."""
    d = weight_matrix(spec, np.empty(tuple(inits[spec.weight].dims), np.int8)).shape[1] + 1
    return min(8 * d * d, 4 * 2048 * d)


def _consumers_of(model, dep: Dependency, groups: list[Group], inits: dict):
    """The layers whose weights read a group's channels (by name), the axis each contracts
    its input over, and those too wide for a Hessian."""
    axis_of = {}
    for node_name, k, axis in dep.couplings.contractions:
        if k == 0:
            axis_of[node_name] = axis
    specs = consumer_specs(model, dep.couplings.contractions)
    group_spaces = [set(g.spaces) for g in groups]
    used = {name: s for name, s in specs.items()
            if any((s.data, axis_of[name]) in sp for sp in group_spaces)}
    # A layer reading more than MAX_HESSIAN_DIM features (crepe's 1024-channel x 64-tap conv:
    # 65536) would need a 32 GB Hessian: it is left out, its groups fall back to l1.
    too_wide = sorted(name for name, spec in used.items()
                      if weight_matrix(spec, np.empty(tuple(inits[spec.weight].dims), np.int8)).shape[1]
                      > MAX_HESSIAN_DIM)
    return {name: spec for name, spec in used.items() if name not in too_wide}, axis_of, too_wide


def _without_consumers(dep: Dependency, group: Group) -> str:
    """Why a group has no layer statistics, as its note: none of its layers reads it with a
    weight, or they all sit inside If/Loop/Scan bodies (onnxruntime fetches no tensor there)."""
    main = set(dep.view.main_nodes) if dep.view is not None else set()
    spaces = set(group.spaces)
    inside = dep.view is not None and any(
        name not in main and name in dep.view.nodes and k < len(dep.view.nodes[name].input)
        and (dep.view.nodes[name].input[k], axis) in spaces for name, k, axis in dep.couplings.contractions)
    if inside:
        return "its layers are inside an If/Loop/Scan body, where no statistics are collected: chosen by l1"
    return "no layer with weights reads this group: chosen by l1"


def statistics_source(model: onnx.ModelProto, calibration: Calibration, layout: BatchLayout, batches: list[dict],
                      info: dict) -> tuple[onnx.ModelProto, int, bool]:
    """The model whose layer inputs the statistics are taken from, how many BatchNormalizations
    steered it, and whether its inputs are synthetic images."""
    images = calibration.data is None and _image_inputs(model)
    if not images:
        return model, 0, False
    # Synthetic images, their statistics steered by the BatchNormalizations' running ones
    # (steer.py), top-1 at ratio 0.2 / 0.3 / 0.5 with OBS choosing (l1 choosing): Fashion
    # ResNet 0.916 / 0.893 / 0.709 (0.916 / 0.838 / 0.498), VGG 0.908 / 0.899 / 0.803
    # (0.897 / 0.887 / 0.786), mobile net 0.814 / 0.387 / 0.181 (0.791 / 0.344 / 0.197).
    # Not on 1-D signals: the pitch CNN at ratio 0.3 / 0.5 keeps 0.744 / 0.504 plain and
    # 0.688 / 0.226 steered, its variance matching being what hurts (mean only: 0.812 / 0.438).
    source, steered = steer_batch_norms(model, min(layout.count(b) for b in batches))
    if steered:
        info["batch_norms_steered"] = steered
    return source, steered, True


def chooses_by_magnitude(calibration: Calibration, images: bool, steered: int, compensation: str) -> bool:
    """Whether OBSPA takes the channels l1 chose and only compensates their removal."""
    # Unsteered synthetic images compensate well but choose badly (Fashion-MNIST VGG at
    # ratio 0.3 on 1/f noise: OBS choice 0.64, l1 choice 0.81, l1 choice + OBS compensation
    # 0.88; on dead-leaves images, ratio 0.2 / 0.3 / 0.5, Fashion ResNet OBS choice 0.84 /
    # 0.69 / 0.27, l1 choice 0.89 / 0.69 / 0.34): there the magnitude criterion picks the
    # channels and OBS repairs the consumers. On token inputs OBS both chooses and
    # compensates (MiniLM MLP 30%: OBS choice keeps cosine 0.86, l1 choice + compensation 0.51).
    return calibration.data is None and (images and not steered or compensation in WEIGHT_ONLY)


def obs_consumer(spec: ConsumerSpec, st, inits: dict, damping: float) -> Consumer | LowRankConsumer:
    """One layer's OBS state: its weights (with the bias column where it has or may get a
    bias) in float64 and its damped inverse Hessian, or its sampled rows where those are
    fewer than its inputs."""
    w = weight_matrix(spec, tensor_array(inits[spec.weight]).astype(np.float64))
    bias = np.zeros(w.shape[0]) if spec.bias is None else tensor_array(inits[spec.bias]).astype(np.float64)
    can_bias = spec.bias is not None or spec.kind in ("conv", "gemm")
    # (astype made ``w`` ours: a MatMul's is the transpose of the stored (D, out), kept in that order)
    m = np.hstack([w, bias[:, None]]) if can_bias else w
    if st.rows is not None:
        rows = st.rows if can_bias else st.rows[:, :-1]
        return LowRankConsumer(m, rows, damping_of(st.diag[:rows.shape[1]], damping), [])
    h = st.h if can_bias else st.h[:-1, :-1]
    return Consumer(m, damped_inverse(h, damping), [])


def statistics_by_part(source: onnx.ModelProto, groups: list[Group], used: dict, axis_of: dict, inits: dict,
                       batches: list[dict], seed: int, info: dict):
    """Yield (part, its consumers, their statistics) one part at a time (``_parts``), the parts
    run block by block where the model allows (``BlockRunner``)."""
    parts = _parts(groups, used, axis_of, inits)
    if len(parts) > 1:
        info["statistics_parts"] = len(parts)
    blocks = BlockRunner(source, [[used[name].data for name in part.consumers] for part in parts]) \
        if len(parts) > 1 else None
    for k, part in enumerate(parts):
        # one part's statistics and float64 weights at a time: a 1.1B decoder's would be 0.4x its size
        part_used = {name: used[name] for name in part.consumers}
        if blocks is not None:
            try:
                blocks.start(k)
            except NotBlockable:    # the rest run from the model's inputs, each to its own tensors
                blocks = None
        stats = collect_stats(source, part_used, batches, axis_of, seed=seed,
                              run=None if blocks is None else (lambda b, feeds, k=k: blocks.run(k, b, feeds)))
        release_mapped()
        yield part, part_used, stats


def _choose(plan: DataPlan, criterion, dep, groups, n_remove, chosen, used, axis_of, stats, inits, damping,
            part: list[int]):
    """Set the removals and scores of the groups in ``part`` (indices). A consumer's weights
    OBS updated are written into the plan once the last group reading it is done, and its
    statistics and float64 state are dropped then: one layer's at a time for a decoder."""
    consumers: dict[str, Consumer] = {}

    def consumer(name: str) -> Consumer:
        if name not in consumers:
            consumers[name] = obs_consumer(used[name], stats[name], inits, damping)
        return consumers[name]

    group_spaces = [set(g.spaces) for g in groups]
    readers = {name: sum((used[name].data, axis_of[name]) in sp for sp, k in zip(group_spaces, n_remove) if k)
               for name in used}
    mine_of = {gi: [name for name in used if (used[name].data, axis_of[name]) in group_spaces[gi] and name in stats]
               for gi in part}
    left = {name: sum(name in mine for mine in mine_of.values()) for name in used}
    dead_rates = {}
    for gi in track(part, unit="groups"):
        _choose_group(plan, criterion, dep, groups[gi], gi, n_remove[gi], chosen, used, axis_of, stats, mine_of[gi],
                      consumer, readers, dead_rates)
        for name in mine_of[gi]:
            left[name] -= 1
            if left[name] == 0:
                c = consumers.pop(name, None)
                if criterion == "obspa":    # (other criteria's bias correction reads the statistics after)
                    stats.pop(name, None)
                    if c is not None:
                        _write_back(plan, used[name], c.weight, inits)
    if dead_rates:
        plan.info.setdefault("dead_rate", {}).update(dead_rates)


def _choose_group(plan: DataPlan, criterion, dep, g: Group, gi: int, k: int, chosen, used, axis_of, stats,
                  mine: list[str], consumer, readers: dict, dead_rates: dict):
    """One group's removals and scores, from the consumers reading it (``mine``)."""
    if criterion == "dead":
        alive = np.zeros(g.size, dtype=bool)
        for name in mine:
            idx, ch = g.member(dep, (used[name].data, axis_of[name]))
            np.logical_or.at(alive, ch, stats[name].channel_max[idx] > 0)
        dead = np.nonzero(~alive)[0] if mine else np.array([], np.int64)
        if len(dead) >= g.size:
            dead = dead[1:]                      # keep one channel
        plan.removals[gi], plan.scores[gi] = dead, alive.astype(float)
        dead_rates[g.id] = float(len(dead) / g.size)
    elif criterion in ("activation", "obspa") and not mine:
        plan.notes[g.id] = _without_consumers(dep, g)
        plan.removals[gi] = None
    elif criterion == "activation":
        score = np.zeros(g.size)
        for name in mine:
            c = consumer(name)
            cols = _columns(g, dep, used[name], axis_of[name])
            norms = np.sqrt(np.maximum(stats[name].diag[:-1], 0) / max(stats[name].n, 1))
            contrib = np.abs(c.weight[:, :len(norms)]).sum(axis=0) * norms
            score += [contrib[col].sum() for col in cols]
        plan.removals[gi], plan.scores[gi] = np.sort(np.argsort(score, kind="stable")[:k]), score
    elif criterion != "obspa":
        plan.removals[gi] = chosen[gi]
    else:
        group_consumers = []
        for name in mine:
            c = consumer(name)
            c.columns = _columns(g, dep, used[name], axis_of[name])
            c.shared = readers[name] > 1
            group_consumers.append(c)
        removed, cost = greedy_obs(group_consumers, g.size, k) if k else (np.array([], np.int64),
                                                                           np.zeros(g.size))
        plan.removals[gi], plan.scores[gi] = removed, -cost


def _merge(plan: DataPlan, model, dep, groups, used, axis_of, inits, how: str) -> list[str]:
    """Weight-only compensation (merge.py, ``how``: "merge" or "lsq") for every group it is
    exact to apply to and whose consumers read no group left to OBS; returns the consumers
    it updated."""
    from .merge import merge_compensation, mergeable
    spaces = [set(g.spaces) for g in groups]
    removing = [i for i, r in enumerate(plan.removals) if r is not None and len(r)]
    reads = {name: {i for i in removing if (spec.data, axis_of[name]) in spaces[i]} for name, spec in used.items()}
    ok = {i for i in removing if not isinstance(mergeable(model, dep, groups[i], used, axis_of), str)}
    while True:      # a consumer reading any group left to OBS is refit by OBS: its other groups too
        mixed = {i for name, gs in reads.items() if gs - ok for i in gs}
        if not mixed & ok:
            break
        ok -= mixed
    if not ok:
        return []
    result = merge_compensation(model, dep, groups, plan.removals, used, axis_of,
                                lambda g, spec, axis: _columns(g, dep, spec, axis), only=ok,
                                how=how)
    for name, m in result.weights.items():
        _write_back(plan, used[name], m, inits)
    plan.info["merged"] = {"groups": len(result.groups), "channels merged": result.merged,
                           "of which exact": result.exact, "dropped": result.dropped}
    plan.info["mode"] = ("data-free: channels chosen by l1, removal compensated by merging into the most similar kept "
                         "channel" + (" (OBS where merging is not exact to apply)" if len(ok) < len(removing) else ""))
    return list(result.weights)


def _image_inputs(model: onnx.ModelProto) -> bool:
    from ..loading.shapes import graph_inputs
    return all(vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
               and len(vi.type.tensor_type.shape.dim) == 4 for vi in graph_inputs(model))


def _removed_columns(plan, dep, groups, used, stats, axis_of) -> dict[str, np.ndarray]:
    """Per consumer, the input columns of every channel the plan removes."""
    removed_cols: dict[str, list[np.ndarray]] = {}
    for g, removed in zip(groups, plan.removals):
        if removed is None or not len(removed):
            continue
        for name in used:
            if name in stats and (used[name].data, axis_of[name]) in set(g.spaces):
                cols = _columns(g, dep, used[name], axis_of[name])
                removed_cols.setdefault(name, []).extend(cols[j] for j in removed)
    return {name: np.concatenate(parts) for name, parts in removed_cols.items()}


def _refit(plan, removed_cols, used, stats, inits, damping):
    """With the removed set known, OBS's joint update equals the least-squares refit of the
    kept columns, W_K = W H[:, K] (H_KK)^-1: one solve of the kept size, no D x D inverse."""
    for name, cols in track(list(removed_cols.items()), unit="layers refit"):
        spec, st = used[name], stats[name]
        w = weight_matrix(spec, tensor_array(inits[spec.weight]).astype(np.float64))
        bias = np.zeros(w.shape[0]) if spec.bias is None else tensor_array(inits[spec.bias]).astype(np.float64)
        m = np.hstack([w, bias[:, None]])
        width = m.shape[1] - (spec.bias is None and spec.kind == "matmul")
        m = m[:, :width]
        lam = damping_of(st.diag[:width], damping)
        if st.rows is not None:
            c = LowRankConsumer(m, st.rows[:, :width], lam, [cols])
            c.remove([0], last=True)
            _write_back(plan, spec, c.weight, inits)
            continue
        h = st.h[:width, :width] + lam * np.eye(width)   # the damped H that OBS uses, in both terms
        kept = np.setdiff1d(np.arange(width), cols)
        new = np.zeros_like(m)
        new[:, kept] = np.linalg.solve(h[np.ix_(kept, kept)], (m @ h[:, kept]).T).T
        _write_back(plan, spec, new, inits)


def _bias_correction(plan, removed_cols, used, stats, inits):
    """Closed form: each consumer's bias absorbs the mean of what the removed channels fed
    it, so every layer's mean output is what it was before pruning."""
    for name, cols in removed_cols.items():
        spec = used[name]
        w = weight_matrix(spec, tensor_array(inits[spec.weight]).astype(np.float64))
        shift = w[:, cols] @ stats[name].mean[cols]
        bias = np.zeros(w.shape[0]) if spec.bias is None else tensor_array(inits[spec.bias]).astype(np.float64)
        if spec.bias is None and spec.kind == "matmul":
            plan.info.setdefault("no_bias_slot", []).append(name)
            continue
        _write_back(plan, spec, np.hstack([w, (bias + shift)[:, None]]), inits, weight_too=False)


def _write_back(plan: DataPlan, spec: ConsumerSpec, m: np.ndarray, inits, weight_too: bool = True):
    """Split an (out, D [+1]) matrix back into the consumer's weight and bias."""
    w = inits[spec.weight]
    d = weight_matrix(spec, np.empty(tuple(w.dims), dtype=np.int8)).shape[1]
    weight, bias = m[:, :d], (m[:, d] if m.shape[1] > d else None)
    if weight_too:
        plan.weights[spec.weight] = from_weight_matrix(spec, weight, tuple(w.dims)).astype(
            tensor_array(w).dtype)
    if bias is None:
        return
    if spec.bias is not None:
        plan.weights[spec.bias] = bias.astype(tensor_array(inits[spec.bias]).dtype)
    elif np.any(bias != 0):
        dtype = tensor_array(w).dtype
        plan.new_biases[spec.node.name] = bias.astype(dtype if dtype.kind == "f" else np.float32)  # float16 conv: float16 bias


def _obspa_sequential(model, dep, groups, n_remove, used, axis_of, batches, damping, inits, info,
                      chosen: list | None = None) -> DataPlan:
    """OBSPA group after group, upstream first. Each group's consumers are first refit so that,
    on the inputs the already-pruned model now gives them, they reproduce the original layer's
    output (least squares with the cross moments of original and current inputs); then OBS
    removes the group's channels with compensation (the ``chosen`` ones where given: what the
    OBS allocation chose). Errors no longer compound layer by layer."""
    plan = DataPlan([], [], info=info)
    working = onnx.ModelProto()
    working.CopyFrom(model)
    w_inits = {t.name: t for t in working.graph.initializer}
    state = {}   # consumer -> (original (out, D+1), current (out, D+1), alive columns)
    for name, spec in used.items():
        w0 = weight_matrix(spec, tensor_array(inits[spec.weight]).astype(np.float64))
        b0 = np.zeros(w0.shape[0]) if spec.bias is None else tensor_array(inits[spec.bias]).astype(np.float64)
        alive = np.ones(w0.shape[1] + 1, dtype=bool)
        alive[-1] = spec.bias is not None or spec.kind in ("conv", "gemm")
        m0 = np.hstack([w0, b0[:, None]])
        state[name] = (m0, m0.copy(), alive)
    first_use = {n.name: i for i, n in enumerate(model.graph.node)}
    order = sorted(range(len(groups)), key=lambda i: min(
        [first_use[name] for name in used if (used[name].data, axis_of[name]) in set(groups[i].spaces)]
        or [len(first_use)]))
    removals: list = [None] * len(groups)
    for gi in track(order, unit="groups"):   # their statistics' own counts stay quiet
        g, k = groups[gi], n_remove[gi]
        mine = [name for name in used if (used[name].data, axis_of[name]) in set(g.spaces)]
        if not mine:
            plan.notes[g.id] = _without_consumers(dep, g)
            continue
        if not k:
            removals[gi] = np.array([], np.int64)
            continue
        stats = collect_stats(working, {n: used[n] for n in mine}, batches, axis_of, reference=model)
        consumers = []
        for name in mine:
            m0, _, alive = state[name]
            st = stats[name]
            idx = np.nonzero(alive)[0]
            hinv = np.zeros_like(st.h)
            hinv[np.ix_(idx, idx)] = damped_inverse(st.h[np.ix_(idx, idx)], damping)
            fit = np.zeros_like(m0)
            fit[:, idx] = m0 @ st.cross[:, idx] @ hinv[np.ix_(idx, idx)]
            consumers.append(Consumer(fit, hinv, _columns(g, dep, used[name], axis_of[name])))
        removed, cost = greedy_obs(consumers, g.size, k, order=None if chosen is None else np.asarray(chosen[gi]))
        removals[gi] = np.sort(removed)
        plan.scores.append(None)
        for name, c in zip(mine, consumers):
            m0, _, alive = state[name]
            for j in removed:
                alive[c.columns[j]] = False
            state[name] = (m0, c.weight, alive)
            _set_consumer(working, w_inits, used[name], c.weight)
    plan.removals = removals
    plan.scores = [None] * len(groups)
    for name, (m0, m, alive) in state.items():
        if not np.array_equal(m0, m):
            _write_back(plan, used[name], m if alive[-1] else m[:, :-1], inits)
    return plan


def _set_consumer(working: onnx.ModelProto, w_inits: dict, spec: ConsumerSpec, m: np.ndarray):
    """Put a consumer's new (out, D+1) weights into the working model (adding a bias input)."""
    w = w_inits[spec.weight]
    d = m.shape[1] - 1
    w.CopyFrom(numpy_helper.from_array(
        from_weight_matrix(spec, m[:, :d], tuple(w.dims)).astype(np.float32), w.name))
    if spec.bias is not None:
        w_inits[spec.bias].CopyFrom(numpy_helper.from_array(m[:, d].astype(np.float32), spec.bias))
    elif spec.kind in ("conv", "gemm"):
        node = next(n for n in working.graph.node if n.name == spec.node.name)
        if len(node.input) > 2 and node.input[2] in w_inits:  # the bias an earlier call added
            name = node.input[2]
            w_inits[name].CopyFrom(numpy_helper.from_array(m[:, d].astype(np.float32), name))
        else:
            name = unique_name(f"{node.name}__spa_bias", tensor_names(working))
            working.graph.initializer.append(numpy_helper.from_array(m[:, d].astype(np.float32), name))
            w_inits[name] = working.graph.initializer[-1]
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name

