"""Fix-ups: what a node's size constants must become once channels are gone, as data.

A rule states a fix-up *spec* (``Sizes``, ``SliceBounds``) when it reads the graph; once
the kept channels are chosen, :func:`resolve` turns each spec into concrete *edits*
(``SetAttr``, ``DropAttr``, ``SetInput``) that the plan holds and the rewrite applies.
Specs and edits are plain values: nothing here changes a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from ..loading.model import tensor_array
from ..loading.scopes import all_nodes

Space = tuple[str, int]   # one axis of one tensor (or a rule's virtual axis); see context.py

__all__ = ["Sizes", "SliceBounds", "SetAttr", "DropAttr", "SetInput", "Edit", "Fixup", "resolve"]


# ---- specs: what rules state ---------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """Entries of a node's size vector or attribute that must hold the new size of a space.

    ``where`` is ``("attr", name)`` (a list attribute, or an int one with ``scalar``),
    ``("input", k)`` (input k becomes a constant), or ``("vector", k)`` (input k is a size
    vector that may be computed from shapes: only its constant pieces are rewritten, pieces
    read from shapes follow the pruned tensors by themselves). ``drop`` names attributes
    the new value supersedes (Split's ``num_outputs``).

    ``frozen`` lists entries of a computed ``vector`` that are pieces of their own, computed
    from other sizes (``other.shape[-1]``, ``x.size(-1) // heads``): position, then the spaces
    read with their sizes. Such a piece becomes a constant, the new size of its entry, when
    that size or one of the sizes read changes; both are channel widths then, fixed by weights,
    so the constant is the value it would have had."""

    node: str
    where: tuple[str, object]
    old: tuple[int, ...]
    entries: tuple[tuple[int, Space], ...]   # position in the vector -> space whose size goes there
    scalar: bool = False
    drop: tuple[str, ...] = ()
    frozen: tuple[tuple[int, tuple[tuple[Space, int], ...]], ...] = ()


@dataclass(frozen=True)
class SliceBounds:
    """A Slice whose sliced axes may lose channels: each entry is (position in starts/ends,
    the sliced input space, the output space, the clamped start). ``as_attrs`` before opset 10."""

    node: str
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    entries: tuple[tuple[int, Space, Space, int], ...]
    as_attrs: bool = False


Fixup = Sizes | SliceBounds


# ---- edits: what the plan holds --------------------------------------------------------------

@dataclass(frozen=True)
class SetAttr:
    node: str
    name: str
    value: object                       # int or tuple of ints

    def as_dict(self):
        return {"op": "set_attr", "node": self.node, "name": self.name,
                "value": list(self.value) if isinstance(self.value, tuple) else self.value}


@dataclass(frozen=True)
class DropAttr:
    node: str
    name: str

    def as_dict(self):
        return {"op": "drop_attr", "node": self.node, "name": self.name}


@dataclass(frozen=True, eq=False)
class SetInput:
    """Input ``input`` of ``node`` reads the constant ``value``: the initializer ``name`` is
    rewritten in place when this node is its only reader, else a new one is made."""

    node: str
    input: int
    name: str
    value: np.ndarray

    def as_dict(self):
        return {"op": "set_input", "node": self.node, "input": self.input, "name": self.name,
                "value": np.asarray(self.value).tolist()}


Edit = SetAttr | DropAttr | SetInput


# ---- resolution ------------------------------------------------------------------------------

@dataclass
class GraphView:
    """What resolving needs to read of the model: producers, initializers, shapes."""

    producers: dict
    inits: dict
    shapes: object
    nodes: dict                 # every node by name, those of If/Loop/Scan bodies too
    main_nodes: tuple = ()      # the names of the main graph's nodes

    @classmethod
    def of(cls, model, shapes) -> "GraphView":
        g = model.graph
        nodes = list(all_nodes(g))   # bodies' nodes too: names are unique in the whole model
        return cls({o: n for n in nodes for o in n.output}, {t.name: t for t in g.initializer},
                   shapes, {n.name: n for n in nodes}, tuple(n.name for n in g.node))


def resolve(spec: Fixup, view: GraphView, kept: Callable[[Space], np.ndarray | None],
            new_size: Callable[[Space], int]) -> list[Edit]:
    """The edits that make ``spec``'s node consistent with the kept channels ([] if none)."""
    if isinstance(spec, SliceBounds):
        return _slice_edits(spec, view, kept, new_size)
    new = np.array(spec.old, dtype=np.int64)
    for p, space in spec.entries:
        new[p] = new_size(space)
    freeze = {p for p, reads in spec.frozen
              if new[p] != spec.old[p] or any(new_size(s) != n for s, n in reads)}
    if np.array_equal(new, spec.old) and not freeze:
        return []
    edits = [DropAttr(spec.node, a) for a in spec.drop]
    kind, target = spec.where
    if kind == "attr":
        value = int(new[0]) if spec.scalar else tuple(int(v) for v in new)
        return [*edits, SetAttr(spec.node, target, value)]
    return [*edits, *_vector_edits(view, spec.node, target, np.array(spec.old), new,
                                   computed=kind == "vector", freeze=freeze)]


def _slice_edits(spec: SliceBounds, view, kept, new_size) -> list[Edit]:
    starts, ends = np.array(spec.starts, np.int64), np.array(spec.ends, np.int64)
    new_starts, new_ends = starts.copy(), ends.copy()
    pruned = []
    for p, space_in, space_out, start in spec.entries:
        k = kept(space_in)
        if k is None:
            continue
        new_starts[p] = int(np.searchsorted(k, start))
        new_ends[p] = new_starts[p] + new_size(space_out)
        pruned.append(p)
    if not pruned:
        return []
    if spec.as_attrs:
        return [SetAttr(spec.node, "starts", tuple(int(v) for v in new_starts)),
                SetAttr(spec.node, "ends", tuple(int(v) for v in new_ends))]
    # channel bounds only (a channel split): constants now, even where a value did not change
    # (a bound computed from the input's width, as the legacy exporter writes chunk(), would
    # follow the pruned width); otherwise the other axes' bounds may be computed from shapes,
    # so only constant pieces change
    computed = len(pruned) < len(spec.entries) or len(spec.entries) < len(spec.starts)
    return [*_vector_edits(view, spec.node, 1, starts, new_starts, computed),
            *_vector_edits(view, spec.node, 2, ends, new_ends, computed)]


def _vector_edits(view, node_name, k, old, new, computed, freeze=frozenset()) -> list[Edit]:
    node = view.nodes[node_name]
    name = node.input[k] if k < len(node.input) else ""
    if np.array_equal(old, new) and (computed or name in view.inits) and not freeze:
        return []
    dtype = tensor_array(view.inits[name]).dtype if name in view.inits else np.asarray(old).dtype
    if computed and name not in view.inits:
        edits: list[Edit] = []
        if _vector_pieces(view, name, np.asarray(old), np.asarray(new), edits, 0, freeze):
            return edits
    # a constant, or computed in a way not understood: the values it had at analysis
    return [SetInput(node_name, k, name, np.asarray(new).astype(dtype))]


# ops that only read and cut shape vectors: their result follows the pruned sizes
_SHAPE_OPS = {"Shape", "Size", "Slice", "Gather", "Squeeze", "Unsqueeze"}
# elementwise ops exporters use on size vectors: Where(Equal(shape, -1), 1, shape) ...
_VECTOR_OPS = {"Where", "Equal", "Mul", "Add", "Sub", "Max", "Min", "Cast", "Identity", "Abs"}


def _vector_pieces(view, name, old, new, edits, depth, freeze=frozenset()) -> bool:
    """Edits for the constant parts of a computed size vector, and for the pieces in
    ``freeze`` (positions of pieces of their own, made constants); False where its structure
    is not one of the understood ones (a Concat of pieces, elementwise ops over them), so
    that the caller writes the whole vector as a constant instead.

    The legacy exporter writes ``expand(b, kv, n_rep, s, d)`` with sizes read from shapes
    as Where(Equal(v, -1 x ConstantOfShape(Shape(v))), ConstantOfShape(...), v) with
    v = Reshape(Concat(pieces), [-1]): every operand that carries sizes must be understood
    (n_rep is a constant piece of the Concat), not just one of them."""
    if depth > 6:
        return False
    producer = view.producers.get(name)
    if producer is None:
        return False
    if producer.op_type == "Reshape" and _is_size_vector(view, name):
        # a size vector flattened: the same entries in the same order
        return _vector_pieces(view, producer.input[0], old, new, edits, depth + 1, freeze)
    if freeze and producer.op_type != "Concat":
        return False
    if producer.op_type in _SHAPE_OPS:  # read from tensors: follows their pruned sizes
        return True
    if producer.op_type in _VECTOR_OPS:
        carries = False
        for k, i in enumerate(producer.input):
            if i in view.inits:
                value = tensor_array(view.inits[i])
                if value.shape == old.shape and np.array_equal(value, old):
                    _add(edits, SetInput(producer.name, k, i, new.astype(value.dtype)))
                    carries = True
                continue          # another constant (the -1 compared with): no size in it
            if _size_free(view, i, old):
                continue          # -1 x ones of the vector's length: no size in it either
            if not _vector_pieces(view, i, old, new, edits, depth + 1):
                return False      # an operand computed in a way not understood
            carries = True
        return carries
    if producer.op_type != "Concat":
        return False
    start = 0
    for k, piece in enumerate(producer.input):
        value, reader, at = _constant_piece(view, producer, k)
        size = int(np.prod(view.shapes.shape.get(piece, (1,)))) if value is None else value.size
        if value is None and freeze.intersection(range(start, start + size)):
            if size != 1:
                return False
            _add(edits, SetInput(producer.name, k, piece, new[start:start + 1].astype(np.int64)))
        elif value is not None and not np.array_equal(value.ravel(), new[start:start + size]):
            _add(edits, SetInput(reader.name, at, reader.input[at],
                                 new[start:start + size].reshape(value.shape).astype(value.dtype)))
        start += size
    return True


def _add(edits: list, edit: SetInput):
    """Append ``edit`` unless the same input is already set (a vector reached twice, as
    Where's value and inside its condition)."""
    if not any(isinstance(e, SetInput) and (e.node, e.input) == (edit.node, edit.input) for e in edits):
        edits.append(edit)


def _size_free(view, name, old, depth=0) -> bool:
    """Whether ``name`` holds no size: a constant other than the vector ``old`` itself, a
    ConstantOfShape of a shape or a constant (a fill whose length, a vector's length that is
    never pruned, is all it takes from sizes), or elementwise ops over such values (-1 x ones)."""
    if name in view.inits:
        value = tensor_array(view.inits[name])
        return not (value.shape == old.shape and np.array_equal(value, old))
    node = view.producers.get(name)
    if node is None or depth > 4:
        return False
    if node.op_type == "ConstantOfShape":
        src = view.producers.get(node.input[0])
        return node.input[0] in view.inits or (
            src is not None and src.op_type == "Shape" and _is_size_vector(view, src.input[0]))
    return node.op_type in _VECTOR_OPS and all(_size_free(view, i, old, depth + 1) for i in node.input if i)


def _is_size_vector(view, name) -> bool:
    """An integer vector (its Shape is its length, which pruning never changes)."""
    return len(view.shapes.shape.get(name) or (0, 0)) == 1 and view.shapes.dtype.get(name) in (
        onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def _constant_piece(view, concat, k):
    """(value, node reading it, input index) of piece k of a Concat when it is constant,
    looking through Unsqueeze/Cast/Identity/Squeeze; (None, None, None) if computed."""
    reader, name = concat, concat.input[k]
    for _ in range(3):
        if name in view.inits:
            return tensor_array(view.inits[name]), reader, k
        node = view.producers.get(name)
        if node is None or node.op_type not in ("Unsqueeze", "Cast", "Identity", "Squeeze"):
            return None, None, None
        reader, k, name = node, 0, node.input[0]
    return None, None, None
