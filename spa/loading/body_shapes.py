"""Static shapes of the tensors inside If/Loop/Scan bodies.

ONNX shape inference leaves most of a body's dims symbolic (it propagates no data into
bodies), and onnxruntime cannot fetch a tensor that lives inside one. So each body is made a
model of its own (``standalone``): its formal inputs (a Loop's iteration count, condition and
carried state; a Scan's state and one slice of each scanned input) and the outer-scope tensors
it reads become graph inputs at the shapes the enclosing graph gave them, the small integer
values known there (size vectors, axes) become initializers, and the weights it reads are the
main graph's. That model goes through the same inference and onnxruntime run as the main graph
(``spa.loading.shapes``), at any depth. A body that does not run alone at those shapes (a
branch only some inputs reach) keeps what inference found: its nodes with unknown shapes block.

Every branch runs alone, whichever the condition would choose: both branches of an If get
shapes, as the analysis must tie both.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .scopes import bodies, outer_reads

__all__ = ["fill_body_shapes", "standalone", "formal_input_shapes", "MAX_DEPTH"]

log = logging.getLogger(__name__)

MAX_DEPTH = 16   # bodies nested deeper than this keep inference's shapes


def formal_input_shapes(node: onnx.NodeProto, body: onnx.GraphProto, shapes, opset: int) -> list | None:
    """The shapes of ``body``'s own inputs when ``node`` runs it, from the shapes of the node's
    inputs; None where one is unknown (or the node is not a Loop, Scan or If)."""
    def shape(name):
        return shapes.shape.get(name) if name else None

    def declared_scalar(vi):
        dims = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else []
        return tuple(d.dim_value for d in dims) if all(d.HasField("dim_value") for d in dims) else ()

    if node.op_type == "If":
        return [] if not len(body.input) else None
    if node.op_type == "Loop":
        n = len(body.input) - 2
        if n < 0:
            return None
        carried = [shape(node.input[2 + i]) if 2 + i < len(node.input) else None for i in range(n)]
        if any(s is None for s in carried):
            return None
        return [declared_scalar(body.input[0]), declared_scalar(body.input[1]), *carried]
    if node.op_type == "Scan" and opset >= 9:
        m = _attr(node, "num_scan_inputs", 0)
        n = len(body.input) - m
        if n < 0 or len(node.input) != len(body.input):
            return None
        axes = list(_attr(node, "scan_input_axes", [0] * m))
        out = [shape(node.input[i]) for i in range(n)]
        for j in range(m):
            s = shape(node.input[n + j])
            if s is None:
                return None
            a = axes[j] % len(s) if s else 0
            out.append(s[:a] + s[a + 1:])
        return None if any(s is None for s in out) else out
    return None


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def standalone(model: onnx.ModelProto, node: onnx.NodeProto, body: onnx.GraphProto, shapes,
               opset: int) -> tuple[onnx.ModelProto, dict] | None:
    """``body`` as a model of its own, and the shapes of its inputs: None where the shape
    of a formal input or of an outer-scope tensor it reads is unknown."""
    formal = formal_input_shapes(node, body, shapes, opset)
    if formal is None:
        return None
    inits = {t.name: t for t in model.graph.initializer}
    graph = onnx.GraphProto(name=body.name or node.name)
    input_shapes = {}
    for vi, s in zip(body.input, formal):
        typed = graph.input.add()
        typed.CopyFrom(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, list(s)))
        input_shapes[vi.name] = tuple(s)
    for name in sorted(outer_reads(body)):
        if name in inits:
            graph.initializer.append(inits[name])
        elif name in shapes.value:
            graph.initializer.append(numpy_helper.from_array(np.asarray(shapes.value[name]), name))
        elif name in shapes.shape and name in shapes.dtype:
            graph.input.append(helper.make_tensor_value_info(name, shapes.dtype[name], list(shapes.shape[name])))
            input_shapes[name] = tuple(shapes.shape[name])
        else:
            return None
    graph.node.extend(body.node)
    for o in body.output:
        graph.output.add().name = o.name
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    sub.functions.extend(model.functions)
    return sub, input_shapes


def fill_body_shapes(model: onnx.ModelProto, shapes, infer, opset: int, depth: int = 0):
    """Add to ``shapes`` the shapes (and small integer values) of every tensor inside the
    bodies of ``model``'s main graph and, recursively, of theirs. ``infer(model, input_shapes)``
    is the main graph's shape stage (``spa.loading.shapes._infer_at``). In place."""
    if depth >= MAX_DEPTH:
        return
    for node in model.graph.node:
        for _, body in bodies(node):
            made = standalone(model, node, body, shapes, opset)
            if made is None:
                log.debug("body of %s %r: shapes of its inputs unknown", node.op_type, node.name)
                continue
            sub, input_shapes = made
            try:
                got = infer(sub, input_shapes)
            except Exception as e:   # inference or onnxruntime giving up: its nodes block
                log.debug("body of %s %r: %s", node.op_type, node.name, str(e).splitlines()[0][:200])
                continue
            fill_body_shapes(sub, got, infer, opset, depth + 1)
            outer = {t.name for t in sub.graph.initializer} | (set(input_shapes) - {i.name for i in body.input})
            for name, s in got.shape.items():
                if name not in outer and name not in shapes.shape:
                    shapes.shape[name] = s
                    if name in got.dtype:
                        shapes.dtype[name] = got.dtype[name]
            for name, v in got.value.items():
                if name not in outer:
                    shapes.value.setdefault(name, v)

