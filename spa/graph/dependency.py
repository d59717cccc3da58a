"""From rule couplings to channel atoms and their equivalence classes.

Every space (tensor axis) tied to others by ``same`` shares one block of *atoms*, one per
index; ``offset`` and ``product`` couplings then unite single atoms (union-find). Two atoms
in one class must be removed together. ``product`` (a merged axis such as Flatten's C*H*W, or
a grouped Conv's groups x channels) ties each index of the whole to the index of one factor,
the *carrier*: the largest factor not already fixed (first, every factor of an axis that
can lose no index is fixed too), unless a mode prefers one (``attention``: heads or head dims;
``conv_groups="width"``: a grouped conv's per-group width); failing that, the largest factor
only partly fixed (a Concat of a prunable and a fixed piece). The other factors are fixed, so
a merged axis loses whole slices of its carrier, which is always a valid structured removal.

Memory follows what can be pruned, not what a file declares. Only same-classes connected
(through ``offset``/``product`` couplings) to an initializer axis can ever hold a prunable or
reported channel; every other class (spatial and sequence axes, a 2^27-wide axis declared by
a weightless model) gets one fixed stand-in atom, whatever its width: it is in ``collapsed``,
its ``block_size`` is 1 (or 0), and its atoms never reach a group, so nothing changes for the
groups, the rewrite or the oracle. The union-find runs on numpy arrays, over whole blocks,
in bounded chunks. A model whose weight-connected axes would still need far more channel
indices than it has weight values is refused (``UnsupportedModelError``) before anything big
is allocated.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import UnsupportedModelError
from .context import NOT_CHANNEL, Couplings, NodeContext, Reason, Space
from .fixups import GraphView
from .rules import apply_rule
from ..loading.scopes import body_graphs, walk
from .unionfind import _CHUNK, NO_REASON, _PendingUnions, _UnionFind, sorted_unique

__all__ = ["Dependency", "build_dependency", "MAX_EXTRA_ATOMS", "NO_REASON", "sorted_unique", "ATTENTION_MODES",
           "CONV_GROUP_MODES"]

log = logging.getLogger(__name__)

# Channel indices (atoms) allowed beyond one per weight value. Each atom costs a few tens of
# bytes while analyzing (union-find, roots, groups), so 2^22 of them are ~150 MB.
MAX_EXTRA_ATOMS = 1 << 22


class FixedReasons(Mapping):
    """``representative atom -> why its channel cannot be removed``, for fixed classes only
    (a read-only mapping over ``Dependency.root`` and ``reason_ids``, not a dict per atom)."""

    def __init__(self, root: np.ndarray, reason_ids: np.ndarray, reasons: list[str]):
        self._root, self._ids, self._reasons = root, reason_ids, reasons

    def __getitem__(self, atom):
        a = int(atom)
        if not 0 <= a < len(self._root) or self._root[a] != a or self._ids[a] == NO_REASON:
            raise KeyError(atom)
        return self._reasons[int(self._ids[a])]

    def _keys(self) -> np.ndarray:
        out = []
        for s in range(0, len(self._root), _CHUNK):
            r = self._root[s:s + _CHUNK]
            out.append(s + np.flatnonzero((r == np.arange(s, s + len(r))) & (self._ids[s:s + _CHUNK] != NO_REASON)))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def __iter__(self):
        return iter(self._keys().tolist())

    def __len__(self):
        return len(self._keys())


@dataclass
class Dependency:
    couplings: Couplings
    space_class: dict[Space, int]          # space -> id of its same-class (atom block)
    class_spaces: list[list[Space]]        # same-class id -> its spaces
    block_start: np.ndarray                # same-class id -> first atom
    block_size: np.ndarray                 # atoms of the class: its width, 1 if collapsed
    root: np.ndarray                       # atom -> representative atom of its class
    fixed_reason: Mapping[int, str]        # representative atom -> why it cannot be removed
    blocked_nodes: list[tuple[str, str, str]] = field(default_factory=list)  # name, op, reason
    initializer_classes: set[int] = field(default_factory=set)
    inexact: set[int] = field(default_factory=set)            # representatives of mixed channels
    head_classes: set[int] = field(default_factory=set)      # split factors that are heads
    head_dim_classes: set[int] = field(default_factory=set)  # the per-head dims beside them
    attention: str = "heads"                                  # which of the two carries splits
    group_width_classes: set[int] = field(default_factory=set)  # conv_groups="width": per-group widths
    collapsed: set[int] = field(default_factory=set)  # classes tied to no weight: one fixed atom
    reason_ids: np.ndarray | None = None   # atom -> index into ``reasons`` (NO_REASON: free)
    reasons: list[str] = field(default_factory=list)
    view: GraphView | None = None          # the model's producers, initializers, nodes by name

    def atoms(self, space: Space) -> np.ndarray:
        """The atoms of a space, one per index, or the single stand-in of a collapsed class
        (whose indices are never removed)."""
        c = self.space_class[space]
        return np.arange(self.block_start[c], self.block_start[c] + self.block_size[c])


def collect_couplings(model: onnx.ModelProto, shapes, opset: int,
                      exclude: list[str] | None = None) -> tuple[Couplings, list, GraphView]:
    """Every node's rule, the nodes of If/Loop/Scan bodies included (their reads of outer-scope
    tensors are the same spaces as outside; ``rules/control.py`` ties the bodies' boundaries),
    then the main graph's inputs and outputs fixed."""
    g = model.graph
    view = GraphView.of(model, shapes)
    inits = view.inits
    out = Couplings()
    blocked = []
    patterns = list(exclude or [])
    producers = view.producers
    consumers: dict[str, list] = {}
    for _, n in walk(g):
        for k, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, k))
    for index, (_, node) in enumerate(walk(g)):
        ctx = NodeContext(node, index, shapes, inits, opset, out, producers, consumers)
        reason = apply_rule(ctx)
        if reason:
            blocked.append((ctx.name, node.op_type, reason))
        elif patterns and any(fnmatch.fnmatchcase(ctx.name, p) for p in patterns):
            ctx.fix_all(Reason(f"excluded by pattern (node {ctx.name!r})", "excluded", ctx.name, node.op_type))
    for body in body_graphs(g):    # a body's own weights (normalize moves them to the main graph)
        for t in body.initializer:
            for axis in range(len(t.dims)):
                out.sizes[(t.name, axis)] = int(t.dims[axis])
                out.fixed.append(((t.name, axis), Reason(f"initializer {t.name!r} kept inside a body",
                                                         "subgraph")))
    for vi, what in [(i, "input") for i in g.input] + [(o, "output") for o in g.output]:
        shape = shapes.shape.get(vi.name)
        for axis in range(len(shape or ())):
            out.sizes[(vi.name, axis)] = shape[axis]
            out.fixed.append(((vi.name, axis), Reason(f"graph {what} {vi.name!r}", f"graph-{what}")))
    if patterns:
        for space in list(out.sizes):
            if any(fnmatch.fnmatchcase(space[0], p) for p in patterns):
                out.fixed.append((space, Reason(f"excluded by pattern (tensor {space[0]!r})", "excluded")))
    return out, blocked, view


ATTENTION_MODES = ("heads", "head-dims")
CONV_GROUP_MODES = ("auto", "width")


def weight_values(model: onnx.ModelProto) -> int:
    """How many values the model's initializers hold: their declared element counts, except
    for a tensor that holds no data at all (declared dims alone buy no analysis memory).
    Loading a file checks raw and external data against the dims; reading ``raw_data`` here
    would copy it."""
    total = 0
    for t in model.graph.initializer:
        declared = math.prod(int(d) for d in t.dims)
        if t.data_location == onnx.TensorProto.EXTERNAL or t.HasField("raw_data"):
            total += declared
        else:
            total += min(declared, sum(len(getattr(t, f)) for f in (
                "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")))
    return total


def _components(n: int, a: list[int], b: list[int]) -> np.ndarray:
    """Connected components of nodes 0..n-1 under edges (a[i], b[i]): each node's smallest
    member (a union-find on numpy arrays: networkx takes seconds per 100k nodes)."""
    uf = _UnionFind(n)
    uf.union(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64))
    return uf.roots()


def _same_classes(couplings: Couplings) -> tuple[list[list[Space]], dict[Space, int]]:
    """The spaces tied by ``same`` couplings, as classes: each class's spaces sorted by their
    text, the classes by their first space's text (a stable order for reports and tests)."""
    index = {s: i for i, s in enumerate(couplings.sizes)}
    for a, b, _ in couplings.same:
        index.setdefault(a, len(index))
        index.setdefault(b, len(index))
    spaces = list(index)
    root = _components(len(spaces), [index[a] for a, _, _ in couplings.same],
                       [index[b] for _, b, _ in couplings.same])
    texts = [str(sp) for sp in spaces]
    by_text = np.array(sorted(range(len(spaces)), key=texts.__getitem__), dtype=np.int64)
    order = by_text[np.argsort(root[by_text], kind="stable")]   # by class, each by text
    first = np.flatnonzero(np.concatenate([[True], root[order[1:]] != root[order[:-1]]])) \
        if len(order) else np.zeros(0, np.int64)
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_text] = np.arange(len(order))
    bounds = np.append(first, len(order)).tolist()
    ordered = [spaces[i] for i in order.tolist()]
    class_spaces = [ordered[bounds[i]:bounds[i + 1]] for i in np.argsort(rank[order[first]]).tolist()]
    space_class = {sp: c for c, members in enumerate(class_spaces) for sp in members}
    return class_spaces, space_class


def _weight_classes(couplings: Couplings, space_class: dict, n_classes: int,
                    init_classes: set[int]) -> np.ndarray:
    """Which same-classes are connected to an initializer class through offset/product
    couplings (the only links between atoms of different classes): bool per class."""
    a, b = [], []
    for small, big, *_ in couplings.offset:
        a.append(space_class[small])
        b.append(space_class[big])
    for whole, factors, _ in couplings.product:
        for f in factors:
            a.append(space_class[whole])
            b.append(space_class[f])
    root = _components(n_classes, a, b)
    return np.isin(root, root[sorted(init_classes)])


def _refuse_if_too_wide(model, couplings, class_spaces, sizes, keep):
    for c in np.flatnonzero(sizes < 0):
        space = class_spaces[c][0]
        raise UnsupportedModelError(f"tensor {space[0]!r} axis {space[1]} declares a negative size {int(sizes[c])}")
    atoms = sum(int(sizes[c]) for c in np.flatnonzero(keep))  # Python ints: no overflow
    values = weight_values(model)
    limit = values + MAX_EXTRA_ATOMS
    if atoms <= limit:
        return
    widest = max(np.flatnonzero(keep), key=lambda c: (int(sizes[c]), -c))
    space = next((s for s in class_spaces[widest]
                  if s[0] not in {t.name for t in model.graph.initializer}), class_spaces[widest][0])
    raise UnsupportedModelError(
        f"tensor {space[0]!r} axis {space[1]} is {int(sizes[widest])} wide and tied to the weights: "
        f"channel analysis would track {atoms} indices, more than the model's {values} weight "
        f"values justify ({limit}); spa refuses to analyze it (check the model's declared shapes)")


def build_dependency(model: onnx.ModelProto, shapes, opset: int, exclude: list[str] | None = None,
                     attention: str = "heads", allow_mixing: bool = False,
                     conv_groups: str = "auto") -> Dependency:
    """``attention`` says what a split of a hidden axis into heads x head_dim carries:
    whole ``heads`` (the factor that becomes a MatMul batch axis) or ``head-dims`` (the same
    dims removed from every head). ``conv_groups`` says what a grouped convolution's channels
    (groups x per-group width) carry: ``auto``, the larger free factor, or ``width``, the
    per-group width (the same positions removed from every group, the group count kept;
    depthwise convolutions, whose per-group width is 1, keep losing whole groups). Other
    splits carry their largest free factor. ``allow_mixing`` leaves mixed axes (LayerNorm,
    RMSNorm, ...) free but inexact."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if conv_groups not in CONV_GROUP_MODES:
        raise ValueError(f"conv_groups must be one of {CONV_GROUP_MODES}, got {conv_groups!r}")
    couplings, blocked, view = collect_couplings(model, shapes, opset, exclude)

    class_spaces, space_class = _same_classes(couplings)
    widths = np.array([couplings.sizes[c[0]] for c in class_spaces], dtype=np.int64)
    init_names = {t.name for t in model.graph.initializer}
    init_classes = {c for s, c in space_class.items() if s[0] in init_names}
    keep = _weight_classes(couplings, space_class, len(class_spaces), init_classes)
    _refuse_if_too_wide(model, couplings, class_spaces, widths, keep)
    collapsed = set(np.flatnonzero(~keep).tolist())
    sizes = np.where(keep, widths, np.minimum(widths, 1))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    uf = _UnionFind(int(sizes.sum()))

    def block(space):
        c = space_class[space]
        return int(starts[c]), int(sizes[c])

    _first_fixes(uf, starts, sizes, collapsed, space_class,
                 couplings.fixed + ([] if allow_mixing else couplings.mixing))
    _unite_offsets(uf, couplings, space_class, collapsed, block)
    _fix_factors_of_fixed(uf, block, couplings, space_class, collapsed)
    heads, head_dims, group_width = _unite_products(uf, couplings, space_class, collapsed, block, view,
                                                    attention, conv_groups)

    root = uf.roots()
    reason_ids = uf.reason       # atom -> reason of its root, in place: a root's own entry
    for s in range(0, len(root), _CHUNK):   # never changes, and roots precede their atoms
        reason_ids[s:s + _CHUNK] = reason_ids[root[s:s + _CHUNK]]
    del uf.parent, uf.reason
    inexact = set()
    if allow_mixing:
        for space, _ in couplings.mixing:
            s, n = block(space)
            inexact.update(sorted_unique(root[s:s + n]).tolist())
    return Dependency(couplings, space_class, class_spaces, starts, sizes, root,
                      FixedReasons(root, reason_ids, uf.texts), blocked, init_classes, inexact,
                      heads, head_dims, attention, group_width, collapsed, reason_ids, uf.texts, view)


def _first_fixes(uf: _UnionFind, starts, sizes, collapsed: set, space_class: dict, fixed: list):
    """What ``fix_block`` would do for the collapsed classes, then for every fixed space in
    order, before any union (every atom its own root): each block keeps the reason of the
    first fix that reaches it, and reason ids follow the order the reasons are stated in."""
    first: dict[int, int] = {}
    for c in sorted(collapsed):   # never part of a group: one shared reason is enough
        first[c] = uf.reason_id(Reason(f"{NOT_CHANNEL}any weight (tied to no initializer)", "no-weight"))
    for space, reason in fixed:
        c = space_class[space]
        if c not in collapsed:
            rid = uf.reason_id(reason)
            first.setdefault(c, rid)
    if not first:
        return
    classes = np.fromiter(first, dtype=np.int64, count=len(first))
    rids = np.fromiter(first.values(), dtype=np.int32, count=len(first))
    n = sizes[classes]
    atoms = np.repeat(starts[classes] - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(int(n.sum()))
    uf.reason[atoms] = np.repeat(rids, n)


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


def _fix_factors_of_fixed(uf: _UnionFind, block, couplings: Couplings, space_class: dict, collapsed: set):
    """A factor of an axis that cannot lose any index cannot lose one either: fix it before
    carriers are chosen, so that a product sharing that factor (the C/G of the exporters'
    GroupNorm, C -> G x C/G beside C/G*H*W -> C/G x H x W, normalized over) lets another of
    its factors carry instead of one that is fixed later."""
    changed = True
    while changed:
        changed = False
        for whole, factors, _ in couplings.product:
            w0, wn = block(whole)
            if wn == 0 or not (space_class[whole] in collapsed or uf.block_all_fixed(w0, wn)):
                continue
            for f in factors:
                if space_class[f] in collapsed or couplings.sizes[f] == 1:
                    continue
                f0, fn = block(f)
                if not uf.block_all_fixed(f0, fn):
                    uf.fix_block(f0, fn, uf.block_reason(w0, wn))
                    changed = True


def _unite_product(pending: _PendingUnions, block, sizes, whole, factors, node, proto=None, preferred=None):
    uf = pending.uf
    factors = [f for f in factors if sizes[f] != 1]
    w0, wn = block(whole)
    if len(factors) == 1 and sizes[factors[0]] == sizes[whole] and wn:
        # the common case (a conv's channels = 1 group x its width): the factor carries if it
        # is not all fixed, which its first atom tells when that one is free
        f0, fn = block(factors[0])
        if fn and pending.atom_free(f0):
            for s in range(0, wn, _CHUNK):
                i = np.arange(s, min(s + _CHUNK, wn), dtype=np.int64)
                pending.add(w0 + i, f0 + i % fn)
            return
    pending.settle([block(f) for f in factors])
    if math.prod(sizes[f] for f in factors) != sizes[whole]:
        pending.settle([(w0, wn)])
        reason = Reason(f"{node!r}: axis sizes do not factor", "rule", node, proto and proto.op_type)
        uf.fix_block(w0, wn, reason)
        for f in factors:
            uf.fix_block(*block(f), reason)
        return
    if not factors:
        return
    # A factor is free when none of its indices is fixed, partly free when only some are (a
    # Concat of a prunable piece and a fixed one, merged by a Flatten): the carrier is a free
    # factor if there is one, else a partly free one (its fixed indices fix the slices of the
    # whole they carry). Every other factor that can still lose an index is fixed whole: a
    # factor neither carrying nor fixed would lose channels the whole does not follow.
    open_ = [f for f in factors if not uf.block_all_fixed(*block(f))]
    if not open_:
        pending.settle([(w0, wn)])
        uf.fix_block(w0, wn, uf.block_reason(*block(factors[0])))
        return
    free = [f for f in open_ if len(open_) == 1 or not uf.block_fixed(*block(f))] or open_
    candidates = [f for f in free if f in preferred] if preferred else []
    carrier = max(candidates or free, key=lambda f: sizes[f])
    for f in open_:
        if f != carrier:
            uf.fix_block(*block(f), Reason(f"node {node!r} merges this axis with a larger one that carries the channels",
                                           "merged", node, proto and proto.op_type))
    pos = factors.index(carrier)
    inner = math.prod(sizes[f] for f in factors[pos + 1:])
    c0, n = block(carrier)
    for s in range(0, wn, _CHUNK):
        i = np.arange(s, min(s + _CHUNK, wn), dtype=np.int64)
        pending.add(w0 + i, c0 + (i // inner) % n)

def _unite_offsets(uf: "_UnionFind", couplings, space_class: dict, collapsed: set, block):
    """Tie each channel of a part (a Concat input, a Split output, a Slice) to its place in
    the whole, in chunks of pairs."""
    pairs_a, pairs_b, pending = [], [], 0
    for small, big, start, step, _ in couplings.offset:
        if space_class[small] in collapsed:
            continue
        (s0, ns), (b0, nb) = block(small), block(big)
        for i0 in range(0, ns, _CHUNK):
            i = np.arange(i0, min(i0 + _CHUNK, ns), dtype=np.int64)
            j = start + i * step
            ok = (j >= 0) & (j < nb)
            pairs_a.append(s0 + i[ok])
            pairs_b.append(b0 + j[ok])
            pending += int(ok.sum())
            if pending >= _CHUNK:
                uf.union(np.concatenate(pairs_a), np.concatenate(pairs_b))
                pairs_a, pairs_b, pending = [], [], 0
    if pairs_a:
        uf.union(np.concatenate(pairs_a), np.concatenate(pairs_b))


def _unite_products(uf: "_UnionFind", couplings, space_class: dict, collapsed: set, block, view,
                    attention: str, conv_groups: str) -> tuple[set, set, set]:
    """Tie each factorised axis (heads x head_dim, groups x width) to its factors, carrying
    the factor ``attention``/``conv_groups`` prefer; the classes of heads, head dims and
    per-group widths found on the way."""
    batch_classes = _head_classes(couplings, space_class)
    heads, head_dims, group_width = set(), set(), set()
    pending = _PendingUnions(uf)
    for whole, factors, node in couplings.product:
        preferred = None
        in_batch = [f for f in factors if space_class[f] in batch_classes and couplings.sizes[f] > 1]
        if in_batch and len(in_batch) < len([f for f in factors if couplings.sizes[f] > 1]):
            heads.update(space_class[f] for f in in_batch)
            others = [f for f in factors if f not in in_batch and couplings.sizes[f] > 1]
            head_dims.update(space_class[f] for f in others)
            preferred = set(in_batch) if attention == "heads" else set(others)
        elif conv_groups == "width" and couplings.per_group.intersection(factors):
            preferred = couplings.per_group.intersection(factors)
            group_width.update(space_class[f] for f in preferred)
        if space_class[whole] not in collapsed:
            _unite_product(pending, block, couplings.sizes, whole, factors, node, view.nodes.get(node), preferred)
    pending.flush()
    return heads, head_dims, group_width
