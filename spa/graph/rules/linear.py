"""Contractions: Conv, ConvTranspose, Gemm, MatMul tie the contracted axis of both operands."""

from __future__ import annotations


from ..context import NodeContext
from .registry import RULES, rule
from .elementwise import broadcast


@rule("Conv", "ConvTranspose")
def conv(ctx: NodeContext):
    return conv_axes(ctx, bias=2, contract=True)


def conv_axes(ctx: NodeContext, bias: int | None, contract: bool, weight: int = 1):
    """A convolution's couplings; ``weight`` and ``bias`` are the indices of its weight and
    per-output-channel inputs, and ``contract`` says the oracle may zero removed input channels
    at input 0 (not when it holds integers, where zero is not the zero point)."""
    x = ctx.in_shape(0)
    groups = int(ctx.attr("group", 1))
    transpose = ctx.op == "ConvTranspose"
    c_in, c_out = x[1], ctx.out_shape(0)[1]
    if groups < 1 or any(isinstance(c, int) and c % groups for c in (c_in, c_out)):
        return f"{ctx.op} {ctx.name!r} has group={groups}, which does not divide its {c_in} -> {c_out} channels"
    ctx.same(ctx.inp(0, 0), ctx.outp(0, 0))
    # Channels = groups x per-group channels; the dependency stage picks which one to prune.
    g = ctx.virtual("groups", groups)
    k_in = ctx.inp(weight, 1) if not transpose else ctx.virtual("in_per_group", c_in // groups)
    k_out = ctx.inp(weight, 1) if transpose else ctx.virtual("out_per_group", c_out // groups)
    w_in = ctx.inp(weight, 0) if transpose else None
    w_out = None if transpose else ctx.inp(weight, 0)
    ctx.product(ctx.inp(0, 1), [g, k_in])
    ctx.product(ctx.outp(0, 1), [g, k_out])
    if groups > 1 and c_in // groups > 1 and c_out // groups > 1:
        # a grouped conv (not depthwise: there one factor is 1 and the groups are the channels)
        ctx.per_group(k_in)
        ctx.per_group(k_out)
    if w_out is not None:
        ctx.same(w_out, ctx.outp(0, 1))
    if w_in is not None:
        ctx.same(w_in, ctx.inp(0, 1))
    if bias is not None and ctx.has_input(bias):
        ctx.same(ctx.inp(bias, 0), ctx.outp(0, 1))
    if contract:
        ctx.contract(0, 1)
    if ctx.attr("output_shape") is not None:
        return f"ConvTranspose {ctx.name!r} has an explicit output_shape"

    ctx.sizes(("attr", "group"), [groups], {0: g}, scalar=True)


# onnxruntime's graph optimizer fuses an activation into the layer; the axes are the layer's.
RULES["com.microsoft.FusedConv"] = conv


@rule("Gemm", "com.microsoft.FusedGemm")
def gemm(ctx: NodeContext):
    gemm_axes(ctx, b=1, c=2, contract=True)


def gemm_axes(ctx: NodeContext, b: int, c: int, contract: bool):
    """Gemm's couplings, with B and C at inputs ``b`` and ``c``; returns A's summed axis."""
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    a_m, a_k = (1, 0) if ta else (0, 1)
    b_k, b_n = (1, 0) if tb else (0, 1)
    ctx.same(ctx.inp(0, a_k), ctx.inp(b, b_k))
    ctx.same(ctx.inp(0, a_m), ctx.outp(0, 0))
    ctx.same(ctx.inp(b, b_n), ctx.outp(0, 1))
    if ctx.has_input(c):
        broadcast(ctx, [c])
    if contract:
        ctx.contract(0, a_k)
    return a_k


@rule("MatMul")
def matmul(ctx: NodeContext):
    return matmul_axes(ctx, contract=True)


def matmul_axes(ctx: NodeContext, contract: bool, second: int = 1):
    """numpy matmul's couplings, the second operand at input ``second`` (``contract`` as for
    ``conv_axes``)."""
    a, b, y = ctx.in_shape(0), ctx.in_shape(second), ctx.out_shape(0)
    if len(a) < 1 or len(b) < 1:
        return f"{ctx.op} {ctx.name!r} on scalars"
    ctx.same(ctx.inp(0, len(a) - 1), ctx.inp(second, 0 if len(b) == 1 else len(b) - 2))
    if contract:
        ctx.contract(0, len(a) - 1)
    if len(a) >= 2:
        ctx.same(ctx.inp(0, len(a) - 2), ctx.outp(0, len(y) - (2 if len(b) >= 2 else 1)))
    if len(b) >= 2:
        ctx.same(ctx.inp(second, len(b) - 1), ctx.outp(0, len(y) - 1))
    batch_y = len(y) - (len(a) >= 2) - (len(b) >= 2)
    for k, shape, core in ((0, a, 2), (second, b, 2)):
        batch = shape[:-core] if len(shape) >= core else ()
        for i, n in enumerate(batch):
            j = batch_y - len(batch) + i
            if n == y[j]:
                ctx.same(ctx.inp(k, i), ctx.outp(0, j))
                ctx.batch(ctx.outp(0, j))


