"""From rule couplings to channel atoms and their equivalence classes.

Every space (tensor axis) tied to others by ``same`` shares one block of *atoms*, one per
index; ``offset`` and ``product`` couplings then unite single atoms (union-find). Two atoms
in one class must be removed together. ``product`` (a merged axis such as Flatten's C*H*W, or
a grouped Conv's groups x channels) ties each index of the whole to the index of one factor,
the *carrier*: the largest factor not already fixed. The other factors are fixed, so a merged
axis loses whole slices of its carrier, which is always a valid structured removal.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx

from .context import Couplings, NodeContext, Space
from .rules import apply_rule

__all__ = ["Dependency", "build_dependency"]

log = logging.getLogger(__name__)


@dataclass
class Dependency:
    couplings: Couplings
    space_class: dict[Space, int]          # space -> id of its same-class (atom block)
    class_spaces: list[list[Space]]        # same-class id -> its spaces
    block_start: np.ndarray                # same-class id -> first atom
    block_size: np.ndarray
    root: np.ndarray                       # atom -> representative atom of its class
    fixed_reason: dict[int, str]           # representative atom -> why it cannot be removed
    blocked_nodes: list[tuple[str, str, str]] = field(default_factory=list)  # name, op, reason
    initializer_classes: set[int] = field(default_factory=set)
    inexact: set[int] = field(default_factory=set)            # representatives of mixed channels
    head_classes: set[int] = field(default_factory=set)      # split factors that are heads
    head_dim_classes: set[int] = field(default_factory=set)  # the per-head dims beside them
    attention: str = "heads"                                  # which of the two carries splits

    def atoms(self, space: Space) -> np.ndarray:
        c = self.space_class[space]
        return np.arange(self.block_start[c], self.block_start[c] + self.block_size[c])


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))
        self.reason: list[str | None] = [None] * n

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra > rb:
                ra, rb = rb, ra
            self.parent[rb] = ra
            if self.reason[ra] is None:
                self.reason[ra] = self.reason[rb]

    def fix(self, a: int, reason: str):
        r = self.find(a)
        if self.reason[r] is None:
            self.reason[r] = reason

    def fixed(self, a: int) -> bool:
        return self.reason[self.find(a)] is not None


def collect_couplings(model: onnx.ModelProto, shapes, opset: int,
                      exclude: list[str] | None = None) -> tuple[Couplings, list]:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    out = Couplings()
    blocked = []
    patterns = list(exclude or [])
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for k, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, k))
    for index, node in enumerate(g.node):
        ctx = NodeContext(node, index, shapes, inits, opset, out, producers, consumers)
        reason = apply_rule(ctx)
        if reason:
            blocked.append((ctx.name, node.op_type, reason))
        elif patterns and any(fnmatch.fnmatchcase(ctx.name, p) for p in patterns):
            ctx.fix_all(f"excluded by pattern (node {ctx.name!r})")
    for name, node_name in _outer_scope_references(g):
        shape = shapes.shape.get(name)
        for axis in range(len(shape or ())):
            out.sizes[(name, axis)] = shape[axis]
            out.fixed.append(((name, axis), f"used inside a subgraph of node {node_name!r}"))
    for vi, what in [(i, "input") for i in g.input] + [(o, "output") for o in g.output]:
        shape = shapes.shape.get(vi.name)
        for axis in range(len(shape or ())):
            out.sizes[(vi.name, axis)] = shape[axis]
            out.fixed.append(((vi.name, axis), f"graph {what} {vi.name!r}"))
    if patterns:
        for space in list(out.sizes):
            if any(fnmatch.fnmatchcase(space[0], p) for p in patterns):
                out.fixed.append((space, f"excluded by pattern (tensor {space[0]!r})"))
    return out, blocked


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [b for a in node.attribute for b in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def _outer_scope_references(graph: onnx.GraphProto):
    """Tensors of ``graph`` that subgraphs (If/Loop/Scan bodies) read by name: their axes
    must keep their sizes, since the body is not analyzed."""
    def refs(sub: onnx.GraphProto) -> set[str]:
        local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
        used = set()
        for node in sub.node:
            used.update(n for n in node.input if n)
            for body in _subgraphs(node):
                used |= refs(body)
            local.update(node.output)
        return used - local
    for node in graph.node:
        for body in _subgraphs(node):
            for name in sorted(refs(body)):
                yield name, node.name


ATTENTION_MODES = ("heads", "head-dims")


def build_dependency(model: onnx.ModelProto, shapes, opset: int, exclude: list[str] | None = None,
                     attention: str = "heads", allow_mixing: bool = False) -> Dependency:
    """``attention`` says what a split of a hidden axis into heads x head_dim carries:
    whole ``heads`` (the factor that becomes a MatMul batch axis) or ``head-dims`` (the same
    dims removed from every head). Other splits carry their largest free factor.
    ``allow_mixing`` leaves mixed axes (LayerNorm, RMSNorm, ...) free but inexact."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    couplings, blocked = collect_couplings(model, shapes, opset, exclude)

    graph = nx.Graph()
    graph.add_nodes_from(couplings.sizes)
    graph.add_edges_from((a, b) for a, b, _ in couplings.same)
    class_spaces = [sorted(c, key=str) for c in nx.connected_components(graph)]
    class_spaces.sort(key=lambda c: str(c[0]))
    space_class = {s: i for i, c in enumerate(class_spaces) for s in c}
    sizes = np.array([couplings.sizes[c[0]] for c in class_spaces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    uf = _UnionFind(int(sizes.sum()))

    def block(space):
        c = space_class[space]
        return range(int(starts[c]), int(starts[c] + sizes[c]))

    for space, reason in couplings.fixed + ([] if allow_mixing else couplings.mixing):
        for a in block(space):
            uf.fix(a, reason)
    for small, big, start, step, _ in couplings.offset:
        bs, bb = block(small), block(big)
        for i, a in enumerate(bs):
            j = start + i * step
            if 0 <= j < len(bb):
                uf.union(a, bb[j])
    batch_classes = _head_classes(couplings, space_class)
    heads, head_dims = set(), set()
    for whole, factors, node in couplings.product:
        preferred = None
        in_batch = [f for f in factors if space_class[f] in batch_classes and couplings.sizes[f] > 1]
        if in_batch and len(in_batch) < len([f for f in factors if couplings.sizes[f] > 1]):
            heads.update(space_class[f] for f in in_batch)
            others = [f for f in factors if f not in in_batch and couplings.sizes[f] > 1]
            head_dims.update(space_class[f] for f in others)
            preferred = set(in_batch) if attention == "heads" else set(others)
        _unite_product(uf, block, couplings.sizes, whole, factors, node, preferred)

    root = np.fromiter((uf.find(a) for a in range(len(uf.parent))), dtype=np.int64,
                       count=len(uf.parent))
    fixed_reason = {int(r): uf.reason[r] for r in np.unique(root) if uf.reason[r] is not None}
    inexact = {int(root[a]) for space, _ in couplings.mixing for a in block(space)} if allow_mixing else set()
    init_names = {t.name for t in model.graph.initializer}
    init_classes = {c for s, c in space_class.items() if s[0] in init_names}
    return Dependency(couplings, space_class, class_spaces, starts, sizes, root, fixed_reason,
                      blocked, init_classes, inexact, heads, head_dims, attention)


def _head_classes(couplings: Couplings, space_class: dict) -> set[int]:
    """Classes of MatMul batch axes, and of the factors merged into one (grouped-query
    attention merges key/value heads x repeats into the query heads)."""
    classes = {space_class[s] for s in couplings.batch if s in space_class}
    changed = True
    while changed:
        changed = False
        for whole, factors, _ in couplings.product:
            if space_class[whole] in classes:
                for f in factors:
                    if couplings.sizes[f] > 1 and space_class[f] not in classes:
                        classes.add(space_class[f])
                        changed = True
    return classes


def _unite_product(uf, block, sizes, whole, factors, node, preferred=None):
    factors = [f for f in factors if sizes[f] != 1]
    whole_atoms = block(whole)
    if int(np.prod([sizes[f] for f in factors])) != len(whole_atoms):
        for a in whole_atoms:
            uf.fix(a, f"{node!r}: axis sizes do not factor")
        for f in factors:
            for a in block(f):
                uf.fix(a, f"{node!r}: axis sizes do not factor")
        return
    if not factors:
        return
    free = [f for f in factors if not any(uf.fixed(a) for a in block(f))]
    if not free:
        reason = uf.reason[uf.find(block(factors[0])[0])]
        for a in whole_atoms:
            uf.fix(a, reason)
        return
    candidates = [f for f in free if f in preferred] if preferred else []
    carrier = max(candidates or free, key=lambda f: sizes[f])
    for f in free:
        if f != carrier:
            for a in block(f):
                uf.fix(a, f"node {node!r} merges this axis with a larger one that carries the channels")
    pos = factors.index(carrier)
    inner = int(np.prod([sizes[f] for f in factors[pos + 1:]]))
    carrier_atoms = block(carrier)
    n = sizes[carrier]
    for i, a in enumerate(whole_atoms):
        uf.union(a, carrier_atoms[(i // inner) % n])
