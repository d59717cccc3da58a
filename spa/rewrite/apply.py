"""Physical surgery: the interpreter that turns a :class:`~spa.plan.plan.Plan` into the pruned model.

Works on a copy, after ``Plan.check`` validated the plan against the model, so a failure
leaves no half-edited model behind. Every initializer axis the plan shrinks is sliced to its
kept indices (after OBSPA's updates), and the plan's edits set the size constants.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.fixups import DropAttr, SetAttr, SetInput
from ..loading.model import copy_fields, rejoin_copies, tensor_array, tensor_names, unique_name
from ..loading.scopes import all_nodes, body_graphs, value_infos
from ..plan.plan import Plan

__all__ = ["rewrite", "apply_updates", "apply_edits"]


def rewrite(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """Return a pruned copy of ``model`` (the normalized model the plan was made on)."""
    plan.check(model)
    # Copy everything but the initializers, then add each one already sliced: the full
    # weights are never held twice.
    pruned = onnx.ModelProto()
    copy_fields(model, pruned, skip={"graph"})
    copy_fields(model.graph, pruned.graph, skip={"initializer", "value_info"})
    for t in model.graph.initializer:
        slices = plan.slices(t)
        if not slices and t.name not in plan.updates:
            pruned.graph.initializer.append(t)
            continue
        w = plan.updates[t.name] if t.name in plan.updates else tensor_array(t)
        for axis, kept in slices:
            w = np.take(w, kept, axis=axis)
        pruned.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), t.name))
    _add_biases(pruned, plan, sliced=True)
    apply_edits(pruned, plan.edits)
    _resize_bodies(pruned, plan)
    return rejoin_copies(pruned)


def _resize_bodies(model: onnx.ModelProto, plan: Plan):
    """The shapes If/Loop/Scan bodies declare for their inputs, outputs and values, at the
    pruned sizes (the main graph's value_info is dropped instead; its inputs and outputs
    never shrink). In place."""
    if not plan.kept:
        return
    for body in body_graphs(model.graph):
        for vi in value_infos(body):
            if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
                continue
            for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                kept = plan.kept.get((vi.name, axis))
                if kept is not None and d.HasField("dim_value"):
                    d.dim_value = len(kept)


def apply_updates(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """A copy of ``model`` with the plan's weight updates and new biases, nothing removed:
    the function the pruned model is compared with (after masking)."""
    if not plan.updates and not plan.new_biases:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in plan.updates:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(plan.updates[t.name]), t.name))
    _add_biases(out, plan, sliced=False)
    return out


def _add_biases(model: onnx.ModelProto, plan: Plan, sliced: bool):
    nodes = {n.name: n for n in all_nodes(model.graph)}
    for b in plan.new_biases:
        value = b.value
        kept = plan.kept_of(b.space)
        if sliced and kept is not None:
            value = value[kept]
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), b.name))
        node = nodes[b.node]
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = b.name


def apply_edits(model: onnx.ModelProto, edits):
    """Set attributes and constant inputs as the edits say (in place)."""
    nodes = {n.name: n for n in all_nodes(model.graph)}
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in all_nodes(model.graph):
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    taken = None
    for e in edits:
        node = nodes[e.node]
        if isinstance(e, (SetAttr, DropAttr)):
            for i, a in enumerate(node.attribute):
                if a.name == e.name:
                    del node.attribute[i]
                    break
            if isinstance(e, SetAttr):
                value = list(e.value) if isinstance(e.value, tuple) else e.value
                node.attribute.append(helper.make_attribute(e.name, value))
        elif isinstance(e, SetInput):
            value = np.asarray(e.value)
            if e.name in inits and readers.get(e.name, 0) == 1:   # its only reader: in place
                inits[e.name].CopyFrom(numpy_helper.from_array(value, e.name))
                continue
            if taken is None:
                taken = tensor_names(model)
            new = numpy_helper.from_array(value, unique_name(f"{node.name}__spa_const", taken))
            model.graph.initializer.append(new)
            inits[new.name] = model.graph.initializer[-1]
            while len(node.input) <= e.input:
                node.input.append("")
            node.input[e.input] = new.name
            readers[new.name] = 1
        else:
            raise TypeError(f"unknown edit {e!r}")
