"""The masked original: the plan's second interpreter, the function the oracle compares the
pruned model with (``spa.verify.oracle.oracle``).

Removing a channel is the same function as zeroing it wherever it is summed away (every
contraction the rules record), so the original with those inputs masked, and the plan's weight
updates applied, computes what the pruned model must.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..loading.model import tensor_names, unique_name
from ..loading.scopes import body_graphs
from ..plan.plan import Plan
from ..rewrite.apply import apply_updates
from ..runtime import FED_ABOVE, weight_bytes

__all__ = ["mask_contractions", "masked_model"]


def _insert_before(model: onnx.ModelProto, at: dict, insert):
    """For each node named in ``at`` (name -> entries, each naming an input index first),
    ``insert(node, entry, taken)`` returns a node (or a list of nodes, the last one's output
    the result) computing a replacement for that input, placed just before the node, which
    then reads it instead. In place."""
    taken = tensor_names(model)
    # a body's nodes in their body, inner bodies first: rebuilding a graph's node list copies
    # its nodes, so a body read before its enclosing graph was rebuilt would be a stale copy
    for graph in reversed([model.graph, *body_graphs(model.graph)]):
        if not any(node.name in at for node in graph.node):
            continue
        new_nodes = []
        for node in graph.node:
            for entry in at.get(node.name, ()):
                made = insert(node, entry, taken)
                if made is not None:
                    made = made if isinstance(made, list) else [made]
                    new_nodes.extend(made)
                    node.input[entry[0]] = made[-1].output[0]
            new_nodes.append(node)
        del graph.node[:]
        graph.node.extend(new_nodes)


def _by_node(contractions) -> dict:
    at: dict = {}
    for node_name, *rest in contractions:
        at.setdefault(node_name, []).append(tuple(rest))
    return at


def mask_contractions(model: onnx.ModelProto, contractions, shapes, mask_of, as_inputs: bool = False,
                      in_place: bool = False):
    """A copy of ``model`` (``model`` itself with ``in_place``) with a mask multiplied in
    wherever an axis is contracted (``contractions``: (node name, input index, axis), as the
    rules record them) and
    ``mask_of((tensor, axis))`` gives one (a 1-D array; None leaves the axis alone). The masks
    are initializers, or graph inputs with ``as_inputs`` (fed at run time, the given array
    being their neutral value). Returns the model and, per masked space, its masks as
    ``(name, broadcast shape, dtype)``."""
    if in_place:
        masked = model
    else:
        masked = onnx.ModelProto()
        masked.CopyFrom(model)
    masks: dict = {}

    def insert(node, entry, taken):
        k, axis = entry
        tensor = node.input[k]
        if tensor not in shapes.shape:
            return None
        dtype = helper.tensor_dtype_to_np_dtype(shapes.dtype.get(tensor, onnx.TensorProto.FLOAT))
        values = mask_of((tensor, axis))
        if values is None:
            return None
        bshape = [1] * len(shapes.shape[tensor])
        bshape[axis] = shapes.shape[tensor][axis]
        name = unique_name(f"{node.name}__spa_mask{k}_{axis}", taken)
        if as_inputs:
            masked.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), bshape))
        else:
            masked.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype).reshape(bshape), name))
        masks.setdefault((tensor, axis), []).append((name, bshape, dtype))
        out = unique_name(name + "_out", taken)
        return helper.make_node("Mul", [tensor, name], [out], name=out)

    _insert_before(masked, _by_node(contractions), insert)
    return masked, masks


def masked_model(model: onnx.ModelProto, plan: Plan, shapes) -> onnx.ModelProto:
    """The interpreter of a plan for the oracle: the original with the plan's weight updates,
    and every channel the plan removes zeroed where it is contracted (set to the zero point
    where the summed input holds integers)."""
    def mask_of(space):
        kept = plan.kept_of(space)
        if kept is None:
            return None
        mask = np.zeros(plan.sizes[space])
        mask[kept] = 1
        return mask
    # a copy where the plan changes weights (masked in place, not copied again), its updated
    # weights in a scratch file where sessions are fed them (0.7B decoder: each of its parts' 57
    # sessions copied them twice, 4.5 s)
    updated = apply_updates(model, plan, spill=weight_bytes(model) > FED_ABOVE)
    masked = mask_contractions(updated, plan.contractions, shapes, mask_of, in_place=updated is not model)[0]

    def to_zero_point(node, entry, taken):   # Where(kept, x, zero point)
        k, axis, zp, zp_axes = entry
        tensor = node.input[k]
        keep = mask_of((tensor, axis)).astype(bool)
        rank = len(shapes.shape[tensor])
        shape = [1] * rank
        shape[axis] = len(keep)
        cond = unique_name(f"{node.name}__spa_keep{k}", taken)
        masked.graph.initializer.append(numpy_helper.from_array(keep.reshape(shape), cond))
        made = []
        if zp < len(node.input) and node.input[zp] and zp_axes is not None:
            # the zero point's axes lie along zp_axes of the input: reshape it to broadcast there
            zero = unique_name(f"{node.name}__spa_zero{k}", taken)
            target = [1] * rank
            for i, a in enumerate(zp_axes):
                target[a] = shapes.shape[node.input[zp]][i]
            shape_name = unique_name(f"{zero}_shape", taken)
            masked.graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), shape_name))
            made.append(helper.make_node("Reshape", [node.input[zp], shape_name], [zero], name=zero))
        elif zp < len(node.input) and node.input[zp]:
            zero = node.input[zp]
        else:   # no zero point input: it is 0
            dtype = helper.tensor_dtype_to_np_dtype(shapes.dtype.get(tensor, onnx.TensorProto.UINT8))
            zero = unique_name(f"{node.name}__spa_zero{k}", taken)
            masked.graph.initializer.append(numpy_helper.from_array(np.zeros((), dtype), zero))
        out = unique_name(f"{cond}_out", taken)
        return made + [helper.make_node("Where", [cond, tensor, zero], [out], name=out)]

    _insert_before(masked, _by_node(plan.integer_contractions), to_zero_point)
    return masked
