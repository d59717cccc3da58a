"""Repetition, indexing, quantization and shape reads."""

from __future__ import annotations

import numpy as np

from ..context import NodeContext
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

    def set_target(node, plan):
        new = target.copy()
        offset = len(y) - len(new)
        for p in range(len(new)):
            j = p + offset
            if new[p] == y[j] and new[p] != 1:
                new[p] = plan.new_size((node.output[0], j))
        plan.set_size_vector(node, 1, target, new)
    ctx.rewrite(set_target)


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
        if len(shape) == 1 and shape[0] == x[axis] and shape[0] > 1:
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


@rule("Shape", "Size")
def shape(ctx: NodeContext):
    # Reads sizes only; downstream arithmetic sees the pruned sizes at run time.
    for i in range(len(ctx.in_shape(0))):
        ctx.free(ctx.inp(0, i))


@rule("ConstantOfShape", "Range", "EyeLike", "RandomNormalLike", "RandomUniformLike")
def generator(ctx: NodeContext):
    return None  # outputs are fixed (unmentioned); inputs are sizes
