"""Physical surgery: slice every member of every pruned channel, fix size constants.

Works on a copy; the plan (a removed-flag per channel atom) is validated before anything
changes, so a failure leaves no half-edited model behind.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph.dependency import Dependency
from .model import copy_fields, tensor_array, tensor_names, unique_name

__all__ = ["Rewriter", "rewrite"]


class Rewriter:
    """What rules' rewrite callbacks see: kept indices per space, and setters."""

    def __init__(self, model: onnx.ModelProto, dep: Dependency, removed_roots: np.ndarray, shapes=None):
        self.model = model
        self._shapes = shapes
        self.dep = dep
        self.removed = removed_roots  # bool per atom; meaningful at representative atoms
        self.index_initializers()
        self._kept_cache: dict[int, np.ndarray | None] = {}
        self._taken: set[str] | None = None  # tensor names, once a new one is needed

    def index_initializers(self):
        self._inits = {t.name: t for t in self.model.graph.initializer}

    def kept(self, space) -> np.ndarray | None:
        """Sorted kept indices of a space, or None when nothing of it is removed."""
        c = self.dep.space_class.get(space)
        if c is None:
            return None
        if c not in self._kept_cache:
            start, size = self.dep.block_start[c], self.dep.block_size[c]
            gone = self.removed[self.dep.root[start:start + size]]
            self._kept_cache[c] = np.nonzero(~gone)[0] if gone.any() else None
        return self._kept_cache[c]

    def new_size(self, space) -> int:
        kept = self.kept(space)
        return self.dep.couplings.sizes[space] if kept is None else len(kept)

    def set_attr(self, node: onnx.NodeProto, name: str, value):
        self.remove_attr(node, name)
        node.attribute.append(helper.make_attribute(name, value))

    def remove_attr(self, node: onnx.NodeProto, name: str):
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                return

    def set_input(self, node: onnx.NodeProto, k: int, value: np.ndarray):
        name = node.input[k] if k < len(node.input) else ""
        if name in self._inits:
            self._inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
            return
        if self._taken is None:
            self._taken = tensor_names(self.model)
        new = numpy_helper.from_array(np.asarray(value), unique_name(f"{node.name}__spa_const", self._taken))
        self.model.graph.initializer.append(new)
        self._inits[new.name] = self.model.graph.initializer[-1]
        while len(node.input) <= k:
            node.input.append("")
        node.input[k] = new.name

    def set_size_vector(self, node: onnx.NodeProto, k: int, old: np.ndarray, new: np.ndarray):
        """Give a size input (Reshape/Expand target) its new value. An initializer is replaced;
        a vector concatenated from pieces (the legacy exporter's Shape -> Slice -> Concat with
        constants) gets its constant pieces rewritten, while pieces computed from shapes follow
        the pruned sizes by themselves."""
        if np.array_equal(old, new):
            return
        name = node.input[k]
        if name in self._inits or not self._rewrite_vector(name, np.asarray(old), np.asarray(new)):
            # a constant, or computed in a way not understood: the values it had at analysis
            self.set_input(node, k, np.asarray(new).astype(np.asarray(old).dtype))

    # ops that only read and cut shape vectors: their result follows the pruned sizes
    _SHAPE_OPS = {"Shape", "Size", "Slice", "Gather", "Squeeze", "Unsqueeze"}
    # elementwise ops exporters use on size vectors: Where(Equal(shape, -1), 1, shape) ...
    _VECTOR_OPS = {"Where", "Equal", "Mul", "Add", "Sub", "Max", "Min", "Cast", "Identity", "Abs"}

    def _rewrite_vector(self, name: str, old: np.ndarray, new: np.ndarray, depth: int = 0) -> bool:
        """Rewrite the constant parts of a computed size vector; False where its structure is
        not one of the understood ones (a Concat of pieces, elementwise ops over them)."""
        if depth > 4:
            return False
        if name in self._inits:
            init = self._inits[name]
            value = tensor_array(init)
            if value.shape == old.shape and np.array_equal(value, old):
                init.CopyFrom(numpy_helper.from_array(new.astype(value.dtype), name))
            return True
        producer = self._producers().get(name)
        if producer is None:
            return False
        if producer.op_type in self._SHAPE_OPS:  # read from tensors: follows their pruned sizes
            return True
        if producer.op_type in self._VECTOR_OPS:
            return any([self._rewrite_vector(i, old, new, depth + 1) for i in producer.input])
        if producer.op_type != "Concat":
            return False
        start = 0
        for piece in producer.input:
            value, init = self._constant_piece(piece)
            size = int(np.prod(self._shapes.shape.get(piece, (1,)))) if value is None else value.size
            if value is not None and not np.array_equal(value.ravel(), new[start:start + size]):
                init.CopyFrom(numpy_helper.from_array(
                    new[start:start + size].reshape(value.shape).astype(value.dtype), init.name))
            start += size
        return True

    def _producers(self):
        if not hasattr(self, "_producer_map"):
            self._producer_map = {o: n for n in self.model.graph.node for o in n.output}
        return self._producer_map

    def _constant_piece(self, name):
        """(value, initializer) of a constant piece, looking through Unsqueeze/Cast/Identity."""
        for _ in range(3):
            if name in self._inits:
                return tensor_array(self._inits[name]), self._inits[name]
            node = self._producers().get(name)
            if node is None or node.op_type not in ("Unsqueeze", "Cast", "Identity", "Squeeze"):
                return None, None
            name = node.input[0]
        return None, None


def rewrite(model: onnx.ModelProto, dep: Dependency, removed_roots: np.ndarray, shapes) -> onnx.ModelProto:
    """Return a pruned copy of ``model`` (the normalized model the dependency was built on)."""
    # Copy everything but the initializers, then add each one already sliced: the full
    # weights are never held twice.
    pruned = onnx.ModelProto()
    copy_fields(model, pruned, skip={"graph"})
    copy_fields(model.graph, pruned.graph, skip={"initializer", "value_info"})
    initializers = model.graph.initializer
    rw = Rewriter(pruned, dep, removed_roots, shapes)
    for t in initializers:
        slices = [(axis, rw.kept((t.name, axis))) for axis in range(len(t.dims))]
        slices = [(axis, kept) for axis, kept in slices if kept is not None]
        if not slices:
            pruned.graph.initializer.append(t)
            continue
        w = tensor_array(t)
        for axis, kept in slices:
            w = np.take(w, kept, axis=axis)
        pruned.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), t.name))
    rw.index_initializers()
    nodes = {n.name: n for n in pruned.graph.node}

    for node, fn in dep.couplings.rewrites:
        fn(nodes[node.name], rw)
    return pruned
