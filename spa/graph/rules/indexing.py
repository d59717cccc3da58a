"""Repetition, indexing, quantization and shape reads."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..context import NodeContext, Reason
from .registry import rule
from .elementwise import broadcast
from .layout import tie_read_sizes


@rule("Expand")
def expand(ctx: NodeContext):
    y = ctx.out_shape(0)
    target = ctx.const(1)
    if target is None:
        return f"Expand {ctx.name!r}: target shape unknown"
    broadcast(ctx, [0])
    tie_read_sizes(ctx, 1, offset=len(y) - np.size(target))

    offset = len(y) - np.size(target)
    ctx.sizes(("vector", 1), target, {p: ctx.outp(0, p + offset) for p, v in enumerate(np.ravel(target))
                                      if v == y[p + offset] and v != 1})


@rule("Tile")
def tile(ctx: NodeContext):
    repeats = ctx.const(1)
    if repeats is None:
        return f"Tile {ctx.name!r}: repeats are computed"
    for i, r in enumerate(np.ravel(repeats)):
        if r == 1:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))


@rule("Gather")
def gather(ctx: NodeContext):
    x, idx = ctx.in_shape(0), ctx.in_shape(1)
    axis = int(ctx.attr("axis", 0)) % len(x)
    for i in range(len(x)):
        if i < axis:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))
        elif i > axis:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i + len(idx) - 1))
    for i in range(len(idx)):
        ctx.same(ctx.inp(1, i), ctx.outp(0, axis + i))


@rule("QuantizeLinear", "DequantizeLinear")
def quantize(ctx: NodeContext):
    """Elementwise, with a scale and zero point per tensor, per channel (``axis``) or per block."""
    x = ctx.in_shape(0)
    broadcast(ctx, [0])
    axis = int(ctx.attr("axis", 1)) % len(x) if x else 0
    for k in (1, 2):
        if not ctx.has_input(k):
            continue
        shape = ctx.in_shape(k)
        if int(np.prod(shape)) == 1:
            continue      # per tensor, as a scalar or a 1-element vector (onnxruntime's bias scales)
        if len(shape) == 1 and shape[0] == x[axis]:
            ctx.same(ctx.inp(k, 0), ctx.outp(0, axis))
        elif len(shape) == len(x) and shape != x:
            return f"{ctx.op} {ctx.name!r}: blocked quantization is not supported"
        elif len(shape) == len(x):
            broadcast(ctx, [k])


@rule("GatherElements", "ScatterElements")
def gather_elements(ctx: NodeContext):
    """Output has the indices' shape; off the gather axis, data, indices and output align."""
    x, idx, y = ctx.in_shape(0), ctx.in_shape(1), ctx.out_shape(0)
    axis = int(ctx.attr("axis", 0)) % len(x)
    for i in range(len(x)):
        if i != axis and x[i] == idx[i] == y[i]:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))
            ctx.same(ctx.inp(1, i), ctx.outp(0, i))
            if ctx.op == "ScatterElements":
                ctx.same(ctx.inp(2, i), ctx.outp(0, i))


@rule("CumSum")
def cumsum(ctx: NodeContext):
    axis = ctx.const(1)
    if axis is None:
        return f"CumSum {ctx.name!r}: axis is computed"
    axis = int(np.ravel(axis)[0]) % len(ctx.in_shape(0))
    for i in range(len(ctx.in_shape(0))):
        ctx.same(ctx.inp(0, i), ctx.outp(0, i))
        if i == axis:
            ctx.mixing(ctx.inp(0, i))


@rule("GatherND")
def gather_nd(ctx: NodeContext):
    data, idx = ctx.in_shape(0), ctx.in_shape(1)
    b = int(ctx.attr("batch_dims", 0))
    k = idx[-1]
    for i in range(b):
        ctx.same(ctx.inp(0, i), ctx.outp(0, i))
        ctx.same(ctx.inp(1, i), ctx.outp(0, i))
    for i in range(b, len(idx) - 1):
        ctx.same(ctx.inp(1, i), ctx.outp(0, i))
    for i in range(b + k, len(data)):
        ctx.same(ctx.inp(0, i), ctx.outp(0, len(idx) - 1 + i - b - k))


@rule("ScatterND")
def scatter_nd(ctx: NodeContext):
    """Updates land on the indexed leading axes; the trailing axes pass through."""
    data, idx, upd = ctx.in_shape(0), ctx.in_shape(1), ctx.in_shape(2)
    k = idx[-1]
    for i in range(k, len(data)):
        ctx.same(ctx.inp(0, i), ctx.outp(0, i))
        j = len(idx) - 1 + i - k
        if j < len(upd) and upd[j] == data[i]:
            ctx.same(ctx.inp(2, j), ctx.outp(0, i))


# Inputs that take sizes: a Shape value ending here follows the pruned sizes at run time.
# Not ConstantOfShape's or Range's: their outputs are fixed, so a pruned size read there would
# change an output length nothing rewrites (arange(x.numel()) went wrong): a number, blocked.
SIZE_SLOTS = {("Reshape", 1), ("Expand", 1), ("Tile", 1), ("Split", 1),
              ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4), ("Squeeze", 1), ("Unsqueeze", 1),
              ("Resize", 1), ("Resize", 2), ("Resize", 3), ("Upsample", 1), ("Pad", 1), ("TopK", 1),
              ("OneHot", 1), ("ReduceSum", 1), ("ReduceMean", 1), ("ReduceMax", 1), ("ReduceMin", 1),
              ("Gather", 1), ("GatherElements", 1)}
# Integer arithmetic on sizes (x.size(1) // groups): still a size as long as it ends in a slot.
SIZE_ARITHMETIC = {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Identity", "Mul", "Div", "Add",
                   "Sub", "Mod", "Max", "Min", "Equal", "Where", "Neg", "Abs", "ReduceProd", "Not"}


def numeric_reads(ctx: NodeContext) -> dict[int, onnx.NodeProto]:
    """Axes of the Shape/Size input whose size is used as a number (scaled attention's
    1/sqrt(head_dim) computed from q.shape[-1], say): pruning them would change the value,
    so they must not be pruned. Returns {axis: node that uses it}."""
    rank = len(ctx.in_shape(0))
    found: dict[int, onnx.NodeProto] = {}
    seen = set()

    def walk(name: str, axes: list[int]):
        if name in seen or not axes:
            return
        seen.add(name)
        for node, k in ctx.consumers.get(name, []):
            if (node.op_type, k) in SIZE_SLOTS or node.op_type in ("Shape", "Size"):
                continue        # a Shape of a size vector reads its length, never its entries
            if node.op_type == "Gather" and k == 0 and ctx.const_of(node.input[1]) is not None:
                idx = np.ravel(ctx.const_of(node.input[1]))
                walk(node.output[0], [axes[int(i) % len(axes)] for i in idx if len(axes)])
            elif node.op_type == "Slice" and k == 0 and ctx.const_of(node.input[1]) is not None \
                    and ctx.const_of(node.input[2]) is not None:
                s0, e0 = int(np.ravel(ctx.const_of(node.input[1]))[0]), int(np.ravel(ctx.const_of(node.input[2]))[0])
                walk(node.output[0], axes[s0:e0])
            elif node.op_type == "Cast" and helper.tensor_dtype_to_np_dtype(
                    next(a.i for a in node.attribute if a.name == "to")).kind in "iub":
                walk(node.output[0], axes)
            elif node.op_type in SIZE_ARITHMETIC:
                for out in node.output:
                    walk(out, axes)
            elif node.op_type == "Reshape" and k == 0 and len(ctx.shape(node.output[0]) or (0, 0)) == 1:
                # a size vector flattened, entries in order (the legacy exporter's expand():
                # Reshape(Concat(sizes), [-1]) before Where(Equal(v, -1), 1, v))
                walk(node.output[0], axes)
            else:
                for a in axes:
                    found.setdefault(a, node)

    if ctx.op == "Shape":
        walk(ctx.node.output[0], list(range(rank))[slice(ctx.attr("start", 0), ctx.attr("end", None))])
    else:
        walk(ctx.node.output[0], [-1])
    if -1 in found:  # Size: the product of every axis
        return {a: found[-1] for a in range(rank)}
    return found


@rule("Shape", "Size")
def shape(ctx: NodeContext):
    numeric = numeric_reads(ctx)
    for i in range(len(ctx.in_shape(0))):
        used_by = numeric.get(i)
        if used_by is not None:   # the node that uses the number is the cause, not this Shape
            ctx.fix(ctx.inp(0, i), Reason(f"its size is used as a number by node {used_by.name!r}", "numeric",
                                          used_by.name, used_by.op_type))
        else:
            ctx.free(ctx.inp(0, i))


@rule("Range", "EyeLike", "RandomNormalLike", "RandomUniformLike")
def generator(ctx: NodeContext):
    return None  # outputs are fixed (unmentioned); inputs are sizes


@rule("ConstantOfShape")
def constant_of_shape(ctx: NodeContext):
    """One value everywhere: an axis whose size is a literal of the shape vector (the hidden
    size in an exporter's zero initial state, Concat(batch read from a shape, 512)) may
    shrink, the literal rewritten; sizes read from shapes stay fixed (see SIZE_SLOTS)."""
    shape, sources = ctx.const(0), ctx.size_sources(0)
    if shape is None or sources is None:
        return None
    ctx.sizes(("vector", 0), shape, {p: ctx.outp(0, p) for p, (v, src) in enumerate(zip(np.ravel(shape), sources))
                                     if src == ("const",) and v > 1})
