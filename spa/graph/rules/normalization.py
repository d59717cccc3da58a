"""Normalizations, softmax, pooling and reductions: per-channel ones pass channels through,
those over the channel axis mix it."""

from __future__ import annotations

import numpy as np

from ..context import NodeContext
from .registry import rule
from .elementwise import broadcast


@rule("BatchNormalization")
def batch_norm(ctx: NodeContext):
    if len([o for o in ctx.node.output if o]) > 1:
        return f"BatchNormalization {ctx.name!r} in training mode"
    broadcast(ctx, [0])
    for k in range(1, 5):
        if ctx.has_input(k):
            ctx.same(ctx.inp(k, 0), ctx.outp(0, 1))


@rule("InstanceNormalization")
def instance_norm(ctx: NodeContext):
    rank = len(ctx.in_shape(0))
    for axis in (0, 1):
        ctx.same(ctx.inp(0, axis), ctx.outp(0, axis))
    for k in (1, 2):
        ctx.same(ctx.inp(k, 0), ctx.outp(0, 1))
    for axis in range(2, rank):
        ctx.mixing(ctx.inp(0, axis))


@rule("GroupNormalization")
def group_norm(ctx: NodeContext):
    groups = int(ctx.attr("num_groups"))
    x = ctx.in_shape(0)
    ctx.same(ctx.inp(0, 0), ctx.outp(0, 0))
    ctx.same(ctx.inp(0, 1), ctx.outp(0, 1))
    g = ctx.virtual("groups", groups)
    per = ctx.virtual("per_group", x[1] // groups)
    ctx.product(ctx.inp(0, 1), [g, per])
    # Channels within a group are normalized together: only whole groups are exact.
    ctx.fix(per, f"GroupNormalization {ctx.name!r} normalizes channels of a group together")
    for k in (1, 2):
        n = ctx.in_shape(k)[0]
        ctx.same(ctx.inp(k, 0), ctx.outp(0, 1) if n == x[1] else g)

    ctx.sizes(("attr", "num_groups"), [groups], {0: g}, scalar=True)


@rule("LayerNormalization", "SimplifiedLayerNormalization")
def layer_norm(ctx: NodeContext):
    """The axes from ``axis`` on are mixed. SimplifiedLayerNormalization is RMSNorm, which
    onnxruntime registers in the default domain. The optional ``mean``/``inv_std_var`` outputs
    ([..., 1, ...] from ``axis`` on) keep the axes before it."""
    x = ctx.in_shape(0)
    axis = int(ctx.attr("axis", -1)) % len(x)
    for i in range(len(x)):
        ctx.same(ctx.inp(0, i), ctx.outp(0, i))
        if i >= axis:
            ctx.mixing(ctx.inp(0, i))
    broadcast(ctx, [k for k in (1, 2) if ctx.has_input(k)])
    for k in (1, 2):
        if len(ctx.node.output) > k and ctx.node.output[k]:
            for i in range(axis):
                ctx.same(ctx.outp(k, i), ctx.outp(0, i))


@rule("Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "LRN")
def softmax(ctx: NodeContext):
    x = ctx.in_shape(0)
    default = 1 if ctx.op == "LRN" else (-1 if ctx.opset >= 13 or ctx.op == "LpNormalization" else 1)
    axis = int(ctx.attr("axis", default)) % len(x)
    coerced_2d = ctx.op in ("Softmax", "LogSoftmax", "Hardmax") and ctx.opset < 13
    for i in range(len(x)):
        if i == axis or (coerced_2d and i > axis):
            ctx.mixing(ctx.inp(0, i))
        else:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))


# ---- pooling and reductions ---------------------------------------------------------------

@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
      "MaxRoiPool")
def pool(ctx: NodeContext):
    if len([o for o in ctx.node.output if o]) > 1:
        return f"{ctx.op} {ctx.name!r} outputs indices"
    ctx.same(ctx.inp(0, 0), ctx.outp(0, 0))
    ctx.same(ctx.inp(0, 1), ctx.outp(0, 1))


# Reductions where a zeroed channel contributes nothing: removing it is exact.
ADDITIVE_REDUCE = {"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"}


@rule("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceMean", "ReduceMax",
      "ReduceMin", "ReduceProd", "ReduceLogSum", "ReduceLogSumExp")
def reduce(ctx: NodeContext):
    x = ctx.in_shape(0)
    since = 13 if ctx.op == "ReduceSum" else 18
    axes = ctx.attr_or_input("axes", 1, since, default=None)
    if axes is None and ctx.has_input(1):
        return f"{ctx.op} {ctx.name!r} has computed axes"
    if axes is None or np.size(axes) == 0:
        if ctx.attr("noop_with_empty_axes", 0) and axes is not None:
            broadcast(ctx, [0])
            return None
        axes = range(len(x))
    axes = sorted({int(a) % len(x) for a in np.ravel(axes)})
    keep = int(ctx.attr("keepdims", 1))
    j = 0
    for i in range(len(x)):
        if i in axes:
            if ctx.op in ADDITIVE_REDUCE:
                ctx.free(ctx.inp(0, i))
                ctx.contract(0, i)
            else:
                ctx.mixing(ctx.inp(0, i))
            j += keep
        else:
            ctx.same(ctx.inp(0, i), ctx.outp(0, j))
            j += 1




@rule("ArgMax", "ArgMin")
def arg_reduce(ctx: NodeContext):
    x = ctx.in_shape(0)
    axis = int(ctx.attr("axis", 0)) % len(x)
    keep = int(ctx.attr("keepdims", 1))
    for i in range(len(x)):
        if i == axis:
            ctx.mixing(ctx.inp(0, i))
        else:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i if keep or i < axis else i - 1))


@rule("TopK")
def top_k(ctx: NodeContext):
    x = ctx.in_shape(0)
    axis = int(ctx.attr("axis", -1)) % len(x)
    for i in range(len(x)):
        if i == axis:
            ctx.mixing(ctx.inp(0, i))
        else:
            for k in range(len(ctx.node.output)):
                if ctx.node.output[k]:
                    ctx.same(ctx.inp(0, i), ctx.outp(k, i))
