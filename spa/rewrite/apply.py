"""Physical surgery: the interpreter that turns a :class:`~spa.plan.plan.Plan` into the pruned model.

Works on a copy, after ``Plan.check`` validated the plan against the model, so a failure
leaves no half-edited model behind. Every initializer axis the plan shrinks is sliced to its
kept indices (after OBSPA's updates), and the plan's edits set the size constants.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.fixups import DropAttr, SetAttr, SetInput
from ..loading.model import (ScratchWeights, copy_fields, rejoin_copies, release_mapped, spillable, stored_bytes, tensor_array,
                              tensor_names, unique_name)
from ..loading.scopes import all_nodes, body_graphs, value_infos
from ..plan.plan import Plan

__all__ = ["rewrite", "apply_updates", "apply_edits"]

log = logging.getLogger(__name__)


def rewrite(model: onnx.ModelProto, plan: Plan, spill: bool = False) -> onnx.ModelProto:
    """Return a pruned copy of ``model`` (the normalized model the plan was made on). With
    ``spill``, every weight it would hold in memory is written to a scratch file instead
    (``ScratchWeights``), as it is made: no protobuf copies of a large model's weights on the
    way (0.7B decoder: 6 s of copies). Where that file cannot be written they stay in memory."""
    plan.check(model)
    pruned = _spilled_or_held(lambda put: _sliced(model, plan, put), spill)
    _add_biases(pruned, plan, sliced=True)
    apply_edits(pruned, plan.edits)
    _resize_bodies(pruned, plan)
    return rejoin_copies(pruned)


def _spilled_or_held(build, spill: bool) -> onnx.ModelProto:
    """``build(put)``, its weights written by ``put`` to a scratch file (``ScratchWeights``) with
    ``spill``, or ``build(None)``, holding them, where that file cannot be made or written."""
    scratch = ScratchWeights.open() if spill else None
    if scratch is not None:
        try:
            made = build(scratch.put)
            scratch.close()     # (its last bytes are written here)
            return made
        except OSError as e:    # a full or read-only temporary folder
            log.info("weights stay in memory (%s)", e)
            scratch.close(written=False)
    return build(None)


# numpy arrays whose bytes are these types' raw data as ONNX stores it (not 4-bit types, not strings)
_PLAIN_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def _sliced(model: onnx.ModelProto, plan: Plan, put) -> onnx.ModelProto:
    """A copy of ``model`` with every initializer sliced and updated as the plan says (nothing
    else changed yet); ``put(tensor, bytes) -> reference`` takes the weights it would hold in
    memory (``spillable``), or None."""
    # Copy everything but the initializers, then add each one already sliced: the full
    # weights are never held twice.
    pruned = onnx.ModelProto()
    copy_fields(model, pruned, skip={"graph"})
    copy_fields(model.graph, pruned.graph, skip={"initializer", "value_info"})
    for t in model.graph.initializer:
        pruned.graph.initializer.append(_sliced_tensor(t, plan, put))
        if put:
            release_mapped()    # the slices written are freed heap: back to the system (0.15B decoder: 0.2x its size)
    return pruned


def _sliced_tensor(t: onnx.TensorProto, plan: Plan, put) -> onnx.TensorProto:
    slices = plan.slices(t)
    if not slices and t.name not in plan.updates:
        return put(t, stored_bytes(t)) if put and spillable(t) else t
    w = plan.updates[t.name] if t.name in plan.updates else tensor_array(t)
    for axis, kept in slices:
        w = np.take(w, kept, axis=axis)
    return _as_tensor(t, w, put)


def _as_tensor(t: onnx.TensorProto, w: np.ndarray, put) -> onnx.TensorProto:
    """``w`` as the initializer ``t`` (its name and type), written by ``put`` where that takes it."""
    w = np.ascontiguousarray(w)
    if put and w.nbytes >= 1024 and t.data_type in _PLAIN_TYPES and w.dtype == helper.tensor_dtype_to_np_dtype(t.data_type):
        return put(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=w.shape), w)
    new = numpy_helper.from_array(w, t.name)
    return put(new, new.raw_data) if put and spillable(new) else new


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


def apply_updates(model: onnx.ModelProto, plan: Plan, spill: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` with the plan's weight updates and new biases, nothing removed:
    the function the pruned model is compared with (after masking). With ``spill``, the
    updated weights go to a scratch file as ``rewrite``'s do: each session of a large masked
    original run in parts was handed its own copies of them."""
    if not plan.updates and not plan.new_biases:
        return model
    out = _spilled_or_held(lambda put: _updated(model, plan, put), spill and bool(plan.updates))
    _add_biases(out, plan, sliced=False)
    return out


def _updated(model: onnx.ModelProto, plan: Plan, put) -> onnx.ModelProto:
    out = onnx.ModelProto()
    copy_fields(model, out, skip={"graph"})
    copy_fields(model.graph, out.graph, skip={"initializer"})
    for t in model.graph.initializer:
        out.graph.initializer.append(t if t.name not in plan.updates else
                                     _as_tensor(onnx.TensorProto(name=t.name, data_type=t.data_type),
                                                plan.updates[t.name], put))
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
