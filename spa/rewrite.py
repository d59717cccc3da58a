"""Physical surgery: slice every member of every pruned channel, fix size constants.

Works on a copy; the plan (a removed-flag per channel atom) is validated before anything
changes, so a failure leaves no half-edited model behind.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UnsupportedModelError
from .graph.dependency import Dependency

__all__ = ["Rewriter", "rewrite"]


class Rewriter:
    """What rules' rewrite callbacks see: kept indices per space, and setters."""

    def __init__(self, model: onnx.ModelProto, dep: Dependency, removed_roots: np.ndarray):
        self.model = model
        self.dep = dep
        self.removed = removed_roots  # bool per atom; meaningful at representative atoms
        self.index_initializers()
        self._kept_cache: dict[int, np.ndarray | None] = {}
        self._counter = 0

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
        self._counter += 1
        new = numpy_helper.from_array(np.asarray(value), f"{node.name}__spa_const{self._counter}")
        self.model.graph.initializer.append(new)
        self._inits[new.name] = self.model.graph.initializer[-1]
        while len(node.input) <= k:
            node.input.append("")
        node.input[k] = new.name

    def fail(self, message: str):
        raise UnsupportedModelError(message)


def _copy_fields(src, dst, skip):
    for desc, value in src.ListFields():
        if desc.name in skip:
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__.startswith("Repeated"):
            getattr(dst, desc.name).extend(value)
        elif desc.message_type:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


def rewrite(model: onnx.ModelProto, dep: Dependency, removed_roots: np.ndarray) -> onnx.ModelProto:
    """Return a pruned copy of ``model`` (the normalized model the dependency was built on)."""
    # Copy everything but the initializers, then add each one already sliced: the full
    # weights are never held twice.
    pruned = onnx.ModelProto()
    _copy_fields(model, pruned, skip={"graph"})
    _copy_fields(model.graph, pruned.graph, skip={"initializer", "value_info"})
    initializers = model.graph.initializer
    rw = Rewriter(pruned, dep, removed_roots)
    for t in initializers:
        slices = [(axis, rw.kept((t.name, axis))) for axis in range(len(t.dims))]
        slices = [(axis, kept) for axis, kept in slices if kept is not None]
        if not slices:
            pruned.graph.initializer.append(t)
            continue
        w = numpy_helper.to_array(t)
        for axis, kept in slices:
            w = np.take(w, kept, axis=axis)
        pruned.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), t.name))
    rw.index_initializers()
    nodes = {n.name: n for n in pruned.graph.node}

    for node, fn in dep.couplings.rewrites:
        fn(nodes[node.name], rw)
    return pruned
