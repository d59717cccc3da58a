"""The plan: one value that says everything a pruning pass changes.

Stages: the analysis (``spa.analysis.analyze``) finds the groups; scoring and the planner choose
removed positions per group; :func:`make_plan` turns those into a :class:`Plan` — kept
indices of every space that shrinks, the concrete edits of size constants and attributes
(resolved from the rules' fix-up specs), weight updates (OBSPA compensation, bias
correction) and the per-group choices — and :meth:`Plan.check` validates it against the
model. Two interpreters read it: ``spa.rewrite.apply.rewrite`` (the pruned model) and
``spa.verify.masked.masked_model`` (the original with removed channels zeroed, for the oracle);
the report's groups come from it too, so model, oracle and report cannot disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import SpaError
from ..graph.dependency import Dependency
from ..graph.fixups import Edit, GraphView, SetInput, Space, resolve
from ..graph.groups import Group
from ..loading.model import tensor_names, unique_name
from ..loading.scopes import all_nodes

__all__ = ["Choice", "NewBias", "Plan", "PlanError", "make_plan", "removed_atoms"]


class PlanError(SpaError):
    """A plan that does not fit its model: a bug in spa, never the user's input."""


@dataclass
class Choice:
    """What one group loses: positions into its channels, with the scores that chose them."""

    group: int
    kind: str
    size: int
    removed: np.ndarray
    scores: np.ndarray | None = None
    note: str | None = None

    @property
    def kept(self) -> int:
        return self.size - len(self.removed)


@dataclass
class NewBias:
    """A bias OBSPA adds to a node that had none, in the original width of ``space`` (the
    node's output channel axis), under the initializer name ``name``."""

    node: str
    name: str
    value: np.ndarray
    space: Space


@dataclass(frozen=True)
class Plan:
    """What one pass changes, built once (``make_plan``) and never changed after: a variant
    (a refit's new values) is a new plan (``with_updates``)."""

    kept: dict[Space, np.ndarray]           # every space that shrinks -> its kept indices, sorted
    sizes: dict[Space, int]                 # ... and its size before
    edits: list[Edit] = field(default_factory=list)
    updates: dict[str, np.ndarray] = field(default_factory=dict)   # initializer -> new full value
    new_biases: list[NewBias] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    blocked: list[Group] = field(default_factory=list)
    # (node, input index, axis) where a shrinking space is summed away: where the oracle's
    # interpreter zeroes the removed channels
    contractions: list[tuple[str, int, int]] = field(default_factory=list)
    # + zero point input, and the axes its axes lie along (None: broadcast)
    integer_contractions: list[tuple[str, int, int, int, tuple[int, ...] | None]] = field(default_factory=list)

    def with_updates(self, updates: dict[str, np.ndarray]) -> "Plan":
        """This plan with more (or other) new initializer values."""
        return dataclasses.replace(self, updates={**self.updates, **updates})

    def kept_of(self, space: Space) -> np.ndarray | None:
        """Sorted kept indices of a space, or None when nothing of it is removed."""
        return self.kept.get(space)

    def new_size(self, space: Space, old: int) -> int:
        k = self.kept.get(space)
        return old if k is None else len(k)

    def slices(self, tensor: onnx.TensorProto) -> list[tuple[int, np.ndarray]]:
        """(axis, kept) for every axis of an initializer that shrinks."""
        return [(a, self.kept[(tensor.name, a)]) for a in range(len(tensor.dims)) if (tensor.name, a) in self.kept]

    @property
    def changes(self) -> bool:
        return bool(self.kept or self.edits or self.updates or self.new_biases)

    def check(self, model: onnx.ModelProto):
        """Validate before anything changes: kept indices in range, sorted, never empty;
        every initializer and node the plan names exists and has the size it expects."""
        for space, k in self.kept.items():
            n = self.sizes[space]
            if len(k) == 0:
                raise PlanError(f"plan empties {space[0]}[{space[1]}]")
            if k[0] < 0 or k[-1] >= n or (len(k) > 1 and np.any(np.diff(k) <= 0)):
                raise PlanError(f"plan keeps indices out of range or unsorted in {space[0]}[{space[1]}] (size {n})")
        inits = {t.name: t for t in model.graph.initializer}
        for t in inits.values():
            for axis, _ in self.slices(t):
                if t.dims[axis] != self.sizes[(t.name, axis)]:
                    raise PlanError(f"plan expects {t.name}[{axis}] of size {self.sizes[(t.name, axis)]}, "
                                    f"the model has {t.dims[axis]}")
        for name, value in self.updates.items():
            if name not in inits or tuple(inits[name].dims) != value.shape:
                raise PlanError(f"plan updates {name!r}, which is not an initializer of that shape")
        nodes = {n.name: n for n in all_nodes(model.graph)}
        for b in self.new_biases:
            if b.node not in nodes or b.value.shape != (self.sizes.get(b.space, len(b.value)),):
                raise PlanError(f"plan adds a bias to {b.node!r} that does not fit it")
        seen: dict = {}
        for e in self.edits:
            node = nodes.get(e.node)
            if node is None:
                raise PlanError(f"plan edits node {e.node!r}, which the model does not have")
            if isinstance(e, SetInput):
                if e.name and (e.input >= len(node.input) or node.input[e.input] != e.name):
                    raise PlanError(f"plan sets input {e.input} of {e.node!r} expecting {e.name!r}")
                key = (e.node, e.input)
                if key in seen and not np.array_equal(seen[key], e.value):
                    raise PlanError(f"two fix-ups disagree on input {e.input} of node {e.node!r}")
                seen[key] = e.value

    def groups_report(self, member_names, layer_names=lambda gid: []) -> list[dict]:
        return [{"id": c.group, "kind": c.kind, "channels": c.size, "removed": len(c.removed), "kept": c.kept,
                 "removed_channels": c.removed.tolist(), "members": member_names(c.group),
                 "layers": layer_names(c.group),
                 **({"scores": [float(v) for v in c.scores]} if c.scores is not None else {}),
                 **({"note": c.note} if c.note else {})} for c in self.choices]


def removed_atoms(dep: Dependency, groups: list[Group], removals) -> np.ndarray:
    """A removed flag per atom, from each group's removed positions."""
    removed = np.zeros(len(dep.root), dtype=bool)
    for g, rem in zip(groups, removals):
        removed[g.channels[rem]] = True
    return removed


def _kept_spaces(dep: Dependency, removed: np.ndarray) -> tuple[dict, dict]:
    """Kept indices of every space in a class that loses atoms (one array per class)."""
    kept, sizes = {}, {}
    if not removed.any():
        return kept, sizes
    gone_atoms = removed[dep.root]
    class_of = np.repeat(np.arange(len(dep.block_start)), dep.block_size)
    for c in np.unique(class_of[gone_atoms]).tolist():
        start, size = int(dep.block_start[c]), int(dep.block_size[c])
        k = np.nonzero(~gone_atoms[start:start + size])[0]
        for space in dep.class_spaces[c]:
            kept[space], sizes[space] = k, dep.couplings.sizes[space]
    return kept, sizes


def make_plan(analysis, removals, scores=None, notes: dict | None = None, updates: dict | None = None,
              new_biases: dict | None = None) -> Plan:
    """The plan for removing ``removals[i]`` (positions into ``groups[i].channels``) of each
    group of an ``spa.analysis.Analysis``; ``updates`` (initializer -> new value) and
    ``new_biases`` (node -> bias) are OBSPA's weight changes, in the original widths."""
    model, shapes, dep, groups = analysis.model, analysis.shapes, analysis.dep, analysis.groups
    notes = notes or {}
    removals = [np.asarray(r, dtype=np.int64) for r in removals]
    for g, r in zip(groups, removals):
        if len(r) and (r.min() < 0 or r.max() >= g.size or len(np.unique(r)) != len(r)):
            raise PlanError(f"group {g.id}: removed positions out of range or repeated")
        if len(r) >= g.size:
            raise PlanError(f"group {g.id}: every channel removed")
    kept, sizes = _kept_spaces(dep, removed_atoms(dep, groups, removals))
    choices = [Choice(g.id, g.kind, g.size, np.sort(r), None if scores is None else np.asarray(scores[i]),
                      notes.get(g.id)) for i, (g, r) in enumerate(zip(groups, removals))]
    biases = _new_biases(model, new_biases or {}, kept, sizes)
    contractions, integer_contractions, edits = [], [], []
    if kept:
        view = dep.view if dep.view is not None else GraphView.of(model, shapes)
        contractions = [(n, k, axis) for n, k, axis in dep.couplings.contractions
                        if k < len(view.nodes[n].input) and (view.nodes[n].input[k], axis) in kept]
        integer_contractions = [(n, k, axis, *rest) for n, k, axis, *rest in dep.couplings.integer_contractions
                                if (view.nodes[n].input[k], axis) in kept]

        def size(space):
            k = kept.get(space)
            return dep.couplings.sizes[space] if k is None else len(k)
        for spec in dep.couplings.fixups:
            edits.extend(resolve(spec, view, kept.get, size))
    return Plan(kept, sizes, edits, dict(updates or {}), biases, choices, list(analysis.blocked), contractions,
                integer_contractions)


def _new_biases(model: onnx.ModelProto, new_biases: dict, kept: dict, sizes: dict) -> list[NewBias]:
    """OBSPA's biases for bias-free layers, named anew; the kept and sizes of their spaces
    join ``kept`` and ``sizes``."""
    out = []
    taken = tensor_names(model) if new_biases else set()
    nodes = {n.name: n for n in all_nodes(model.graph)}
    for node, value in new_biases.items():
        space = (nodes[node].output[0], 1)
        out.append(NewBias(node, unique_name(f"{node}__spa_bias", taken), np.asarray(value), space))
        if space in kept:
            kept[(out[-1].name, 0)] = kept[space]
            sizes[(out[-1].name, 0)] = sizes[space]
    return out

