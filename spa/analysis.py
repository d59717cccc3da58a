"""The analysis stage: a model read (or given), normalized, its shapes inferred, its channel
dependency built and its groups found. It describes; it never changes what it was given
(except a model spa read itself, which it normalizes in place)."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field

import onnx

from .errors import SpaError
from .loading.fold import fold_normalized_weights
from .graph.dependency import Dependency, build_dependency
from .graph.groups import Group, find_groups
from .interop import from_graphsurgeon, is_graphsurgeon_graph
from .loading.model import normalize, opset_of, read, release_mapped
from .loading.probe import infer_shapes, second_probe
from .loading.scopes import all_nodes
from .loading.shapes import Shapes

__all__ = ["Analysis", "Loaded", "analyze"]


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
    _producers: dict | None = field(default=None, repr=False, compare=False)
    _second_probe: tuple | None = field(default=None, repr=False, compare=False)

    def member_names(self, group: Group) -> list[str]:
        inits = self.dep.view.inits if self.dep.view is not None else {t.name for t in self.model.graph.initializer}
        return [f"{t}[{a}]" for t, a in group.spaces if t in inits]

    def layer_names(self, group: Group) -> list[str]:
        """The layers whose outputs are the group's channels, as a person knows them: the
        node's name where the exporter kept the module path in it (``/layer1/layer1.0/conv1/Conv``),
        else the weight's name (``features.3.fc1.weight``), without spa's ``__useN`` copies."""
        if self._producers is None:   # once: a report names every group
            self._producers = _producer_axes(self.model)
        producers = self._producers
        names = []
        for t, axis in group.spaces:
            node = producers.get((t, axis))
            if node is not None:
                names.append(_readable(node, t))
        return list(dict.fromkeys(names))

    def second_probe(self) -> tuple[dict | None, dict]:
        """Other sizes for the dims the probe chose, at which the original runs, and what the
        report says of them (``probe.second_probe``); found once: the oracle checks the pruned
        model there, and a fixed-batch token model's synthetic samples run that long."""
        if self._second_probe is None:
            self._second_probe = second_probe(self.model, self.shapes)
            release_mapped()    # it read every weight of the original
        return self._second_probe

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
        nodes = {n.name or f"{n.op_type}_{i}": n for i, n in enumerate(all_nodes(self.model.graph))}
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
    files it was read from (see ``spa.loading.model.read``)."""

    model: onnx.ModelProto
    path: str
    files: dict

    @classmethod
    def read(cls, path) -> "Loaded":
        model, files = read(path, in_place=True)    # (weights left in a large file: this holds it open)
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
    for node in all_nodes(model.graph):      # topologically sorted, bodies after their node
        if node.op_type == "Constant" or all(i in known for i in node.input) and node.input:
            known.update(node.output)
    known.discard("")
    return known


# weight input and the axis of it that is an output channel, per op that makes channels
_OUTPUT_AXIS = {"Conv": (1, 0), "ConvTranspose": (1, 1), "ConvInteger": (1, 0), "QLinearConv": (3, 0),
                "MatMul": (1, -1), "MatMulInteger": (1, -1), "Gemm": (1, None)}


def _producer_axes(model: onnx.ModelProto) -> dict:
    """(weight, axis) -> the node whose output channels that axis of the weight makes."""
    inits = {t.name: len(t.dims) for t in model.graph.initializer}
    out = {}
    for node in all_nodes(model.graph):
        k, axis = _OUTPUT_AXIS.get(node.op_type, (None, None))
        if node.op_type == "Gemm":
            k, axis = 1, 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
        if k is None or k >= len(node.input) or node.input[k] not in inits:
            continue
        out.setdefault((node.input[k], axis % max(inits[node.input[k]], 1)), node)
    return out


def _readable(node: onnx.NodeProto, weight: str) -> str:
    from .loading.model import copied_from
    base = copied_from(weight) or weight
    generic = not node.name or node.name.startswith(("node_", f"{node.op_type}_")) or "__" in node.name
    if not generic and "/" in node.name:
        return node.name
    if not base.startswith(("onnx::", "val_")) and not base.isdigit():
        return base.removesuffix(".weight")
    return node.name or base

