"""What a rule sees of one node, and the couplings it states about its axes.

A *space* is one axis of one tensor, keyed ``(tensor_name, axis)``; a rule may also make a
*virtual* space for a structure no tensor has as an axis (the groups of a grouped Conv),
keyed ``(node_name + "#" + label, 0)``. Rules only describe; they never change the graph:
how a node's size constants follow the pruning is stated as data (``sizes``, ``slice_bounds``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import onnx
from onnx import helper

from ..loading.model import tensor_array
from ..loading.scopes import bodies
from .fixups import SliceBounds, Sizes, Space

__all__ = ["Space", "NodeContext", "Couplings", "NOT_CHANNEL", "Reason"]

# Integer arithmetic a size may go through on its way to a size vector (x.size(-1) // heads)
_SIZE_ARITHMETIC = {"Div", "Mul", "Add", "Sub", "Mod", "Max", "Min", "Neg", "Abs"}

# Reason prefix for axes a rule leaves unmapped (kernel, spatial, size vectors): they are not
# channels, so the report does not list them as blocked groups.
NOT_CHANNEL = "not a channel axis of "


class Reason(str):
    """Why an axis cannot shrink: the message, typed at the place that states it with its
    ``kind`` (rule, no-rule, shapes-unknown, mixing, not-channel, graph-input, graph-output,
    excluded, subgraph, no-weight, numeric, merged) and the ``node``/``op`` it comes from (None for graph
    inputs and outputs). A str, so reasons stay plain values wherever text is enough."""

    kind: str
    node: str | None
    op: str | None

    def __new__(cls, message: str, kind: str, node: str | None = None, op: str | None = None):
        self = super().__new__(cls, message)
        self.kind, self.node, self.op = kind, node, op
        return self

    def __reduce__(self):
        return Reason, (str(self), self.kind, self.node, self.op)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "node": self.node, "op": self.op, "reason": str(self)}


@dataclass
class Couplings:
    """Everything the rules said, as plain data (the input of the dependency stage)."""

    sizes: dict[Space, int] = field(default_factory=dict)
    same: list[tuple[Space, Space, str]] = field(default_factory=list)
    offset: list[tuple[Space, Space, int, int, str]] = field(default_factory=list)  # small, big, start, step
    product: list[tuple[Space, list[Space], str]] = field(default_factory=list)  # whole, factors (row-major)
    fixed: list[tuple[Space, str]] = field(default_factory=list)
    mixing: list[tuple[Space, str]] = field(default_factory=list)
    free: set[Space] = field(default_factory=set)
    contractions: list[tuple[str, int, int]] = field(default_factory=list)  # node, input index, axis
    # integer inputs summed over an axis: (node, input index, axis, index of its zero point input,
    # the input's axes that the zero point's axes lie along or None for numpy broadcasting);
    # the oracle sets removed channels to the zero point there (zero is not "nothing" in integers)
    integer_contractions: list[tuple[str, int, int, int, tuple[int, ...] | None]] = field(default_factory=list)
    batch: set[Space] = field(default_factory=set)  # MatMul batch axes: where attention heads live
    per_group: set[Space] = field(default_factory=set)  # per-group widths of grouped convolutions
    fixups: list = field(default_factory=list)  # Sizes/SliceBounds specs (see fixups.py)


class NodeContext:
    """One node, its static shapes and constant inputs, and a place to state couplings."""

    def __init__(self, node: onnx.NodeProto, index: int, shapes, inits: dict, opset: int,
                 out: Couplings, producers: dict | None = None, consumers: dict | None = None):
        self.node = node
        self._producers = producers or {}
        self.consumers = consumers or {}
        self.index = index
        self.name = node.name or f"{node.op_type}_{index}"
        self.op = node.op_type
        self.opset = opset
        self._shapes = shapes
        self._inits = inits
        self.out = out
        self.mentioned: set[Space] = set()

    # ---- what the rule reads ------------------------------------------------------------
    def shape(self, tensor: str) -> tuple[int, ...] | None:
        return self._shapes.shape.get(tensor) if tensor else None

    def in_shape(self, k: int):
        return self.shape(self.node.input[k]) if k < len(self.node.input) else None

    def out_shape(self, k: int = 0):
        return self.shape(self.node.output[k]) if k < len(self.node.output) else None

    def has_input(self, k: int) -> bool:
        return k < len(self.node.input) and bool(self.node.input[k])

    def const(self, k: int) -> np.ndarray | None:
        """The value of input k if it is known before running (initializer or folded shape)."""
        if not self.has_input(k):
            return None
        name = self.node.input[k]
        if name in self._shapes.value:
            return self._shapes.value[name]
        if name in self._inits:
            return tensor_array(self._inits[name])
        return None

    def size_sources(self, k: int) -> list | None:
        """Where each entry of size-vector input k comes from: ``("dim", tensor, axis)`` when
        it is read from a shape (Shape -> Gather/Slice -> Unsqueeze -> Concat), ``("const",)``
        when it is a constant, ``("expr", ((tensor, axis), ...))`` when it is integer arithmetic
        on constants and the sizes listed (the legacy exporter's ``C // num_heads``:
        Shape -> Gather -> Div -> Cast), ``None`` when computed otherwise. None if not traceable."""
        return self._sources(self.node.input[k], 0) if self.has_input(k) else None

    def concat_pieces(self, k: int) -> list[int] | None:
        """For each entry of size-vector input k, how many entries the Concat input holding
        it has (1: the entry is a piece of its own, which the rewrite can replace alone);
        None when input k is not made by a Concat."""
        node = self._producers.get(self.node.input[k]) if self.has_input(k) else None
        if node is None or node.op_type != "Concat":
            return None
        out = []
        for name in node.input:
            value = self.const_of(name)
            shape = self.shape(name) if value is None else np.shape(value)
            if shape is None:
                return None
            n = int(np.prod(shape))
            out.extend([n] * n)
        return out

    def _sources(self, name: str, depth: int):
        if depth > 8:
            return None
        if name in self._inits or (name in self._shapes.value and name not in self._producers):
            n = self._shapes.value[name].size if name in self._shapes.value else int(np.prod(self._inits[name].dims))
            return [("const",)] * n
        node = self._producers.get(name)
        if node is None:
            return None
        op = node.op_type
        if op == "Shape":
            rank = len(self.shape(node.input[0]) or ())
            start = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "start"), 0)
            end = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "end"), rank)
            return [("dim", node.input[0], a) for a in range(rank)][start:end]
        if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
            return self._sources(node.input[0], depth + 1)
        if op == "Concat":
            parts = [self._sources(i, depth + 1) for i in node.input]
            return None if any(p is None for p in parts) else [e for p in parts for e in p]
        if op == "Gather":
            inner, idx = self._sources(node.input[0], depth + 1), self.const_of(node.input[1])
            if inner is None or idx is None:
                return None
            return [inner[int(i) % len(inner)] for i in np.ravel(idx)]
        if op in _SIZE_ARITHMETIC:
            parts = [self._sources(i, depth + 1) for i in node.input]
            if any(p is None for p in parts) or len({len(p) for p in parts} - {1}) > 1:
                return None
            n = max(len(p) for p in parts)
            out = []
            for j in range(n):
                reads = set()
                for p in parts:
                    src = p[j if len(p) > 1 else 0]
                    if src is None:
                        reads = None
                        break
                    reads.update([src[1:]] if src[0] == "dim" else src[1] if src[0] == "expr" else [])
                # constants only: still computed (the rewrite edits constant pieces only)
                out.append(None if reads is None else ("expr", tuple(sorted(reads))))
            return out
        if op == "Slice" and len(node.input) >= 3:
            inner = self._sources(node.input[0], depth + 1)
            starts, ends = self.const_of(node.input[1]), self.const_of(node.input[2])
            steps = self.const_of(node.input[4]) if len(node.input) > 4 and node.input[4] else None
            if inner is None or starts is None or ends is None:
                return None
            return inner[slice(int(np.ravel(starts)[0]), int(min(np.ravel(ends)[0], len(inner))),
                               int(np.ravel(steps)[0]) if steps is not None else 1)]
        return [None] * int(np.size(self._shapes.value[name])) if name in self._shapes.value else None

    def const_of(self, name: str):
        if name in self._shapes.value:
            return self._shapes.value[name]
        if name in self._inits:
            return tensor_array(self._inits[name])
        return None

    def is_initializer(self, k: int) -> bool:
        return self.has_input(k) and self.node.input[k] in self._inits

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def attr_or_input(self, name: str, k: int, since: int, default=None):
        """Attributes that became inputs at some opset (Split, Slice, Squeeze, Reduce*, Pad)."""
        if self.opset >= since or self.has_input(k):
            value = self.const(k)
            if value is not None:
                return value
            return None if self.has_input(k) else default
        value = self.attr(name, None)
        return default if value is None else np.asarray(value)

    # ---- what the rule states -------------------------------------------------------------
    def space(self, tensor: str, axis: int) -> Space:
        shape = self.shape(tensor)
        if axis < 0:
            axis += len(shape)
        key = (tensor, axis)
        self.out.sizes[key] = shape[axis]
        self.mentioned.add(key)
        return key

    def inp(self, k: int, axis: int) -> Space:
        return self.space(self.node.input[k], axis)

    def outp(self, k: int, axis: int) -> Space:
        return self.space(self.node.output[k], axis)

    def virtual(self, label: str, size: int) -> Space:
        key = (f"{self.name}#{label}", 0)
        self.out.sizes[key] = size
        return key

    def same(self, a: Space, b: Space):
        if self.out.sizes[a] != self.out.sizes[b]:
            self.fix(a, f"{self.op} {self.name!r}: axis sizes disagree")
            self.fix(b, f"{self.op} {self.name!r}: axis sizes disagree")
            return
        self.out.same.append((a, b, self.name))

    def offset(self, small: Space, big: Space, start: int, step: int = 1):
        self.out.offset.append((small, big, start, step, self.name))

    def product(self, whole: Space, factors: list[Space]):
        self.out.product.append((whole, factors, self.name))

    def batch(self, space: Space):
        """A MatMul batch axis: a split axis whose factor ends up here is a set of heads."""
        self.out.batch.add(space)

    def per_group(self, space: Space):
        """The per-group width of a grouped convolution (a factor of its channels beside the
        groups): with ``conv_groups="width"`` it carries the channels and the groups stay."""
        self.out.per_group.add(space)

    def fix(self, space: Space, reason: str | None = None):
        self.mentioned.add(space)
        if not isinstance(reason, Reason):
            reason = Reason(reason or f"{self.op} {self.name!r} does not allow pruning this axis", "rule",
                            self.name, self.op)
        self.out.fixed.append((space, reason))

    def mixing(self, space: Space):
        """Removing a channel here changes the others (normalization, softmax, mean): fixed,
        unless the analysis allows inexact pruning (hidden width)."""
        self.mentioned.add(space)
        self.out.mixing.append((space, Reason(f"{self.op} {self.name!r} mixes this axis (removing a channel "
                                              "changes the others)", "mixing", self.name, self.op)))

    def free(self, space: Space):
        """The node reads the axis without constraining it (Shape reads sizes only)."""
        self.mentioned.add(space)
        self.out.free.add(space)

    def contract(self, k: int, axis: int):
        """Input k is summed over this axis: where the oracle zeroes removed channels."""
        rank = len(self.in_shape(k))
        self.out.contractions.append((self.name, k, axis % rank))

    def contract_integer(self, k: int, axis: int, zero_point: int, zero_point_axes: tuple[int, ...] | None = None):
        """Integer input k is summed over this axis with the zero point of input
        ``zero_point``: where the oracle sets removed channels to that zero point.
        ``zero_point_axes``: the axes of input k that the zero point's axes lie along, where
        numpy broadcasting would misplace them (a zero point [dirs] of a weight [dirs, in, out])."""
        rank = len(self.in_shape(k))
        axes = None if zero_point_axes is None else tuple(a % rank for a in zero_point_axes)
        self.out.integer_contractions.append((self.name, k, axis % rank, zero_point, axes))

    def sizes(self, where: tuple[str, object], old, entries: dict[int, Space], scalar: bool = False,
              drop: tuple[str, ...] = (), frozen: dict[int, list[Space]] | None = None):
        """After pruning, entry p of the node's size vector or attribute ``where`` (see
        ``fixups.Sizes``) holds the new size of ``entries[p]``; a ``frozen`` entry, a piece
        computed from the sizes of the spaces listed, becomes a constant when one changes."""
        frozen = tuple((p, tuple((s, self.out.sizes[s]) for s in reads)) for p, reads in (frozen or {}).items())
        self.out.fixups.append(Sizes(self.name, where, tuple(int(v) for v in np.ravel(old)),
                                     tuple(entries.items()), scalar, tuple(drop), frozen))

    def slice_bounds(self, starts, ends, entries, as_attrs: bool):
        self.out.fixups.append(SliceBounds(self.name, tuple(int(v) for v in starts),
                                           tuple(int(v) for v in ends), tuple(entries), as_attrs))

    def fix_all(self, reason: str):
        """Every axis the node touches, its bodies' inputs and outputs included (what an If,
        Loop or Scan would have tied to its own: left free, a body output would shrink
        while the node's output keeps its size)."""
        boundary = [vi.name for _, body in bodies(self.node) for vi in list(body.input) + list(body.output)]
        for name in list(self.node.input) + list(self.node.output) + boundary:
            for axis in range(len(self.shape(name) or ())):
                self.fix(self.space(name, axis), reason)

    def fix_unmentioned(self):
        reason = Reason(f"{NOT_CHANNEL}{self.op} {self.name!r}", "not-channel", self.name, self.op)
        for name in list(self.node.input) + list(self.node.output):
            shape = self.shape(name)
            for axis in range(len(shape or ())):
                key = (name, axis)
                if key not in self.mentioned:
                    self.out.sizes[key] = shape[axis]
                    self.fix(key, reason)
