"""Quantized layers as onnxruntime's quantizers write them. Dynamic (``quantize_dynamic``):
x -> DynamicQuantizeLinear -> ConvInteger / MatMulInteger (int8 weights) -> Cast -> Mul(scales).
Static QOperator (``quantize_static(quant_format=QOperator)``): QLinearConv, QLinearMatMul,
QGemm, QLinearAdd, QLinearGlobalAveragePool on uint8 activations, whose summed inputs the
oracle sets to their zero point (``ctx.contract_integer``). MatMulNBits: block-quantized weights.

The oracle zeroes a removed channel where it is summed away; in an integer input, zero is not
the zero point, so the layers declare no contraction themselves. DynamicQuantizeLinear does,
at its float input, when every reader of its output sums over that axis: a zeroed channel
quantizes to the zero point exactly (its range always holds zero), contributes nothing, and
leaves the range of the others (hence every kept value) as removing it would.
"""

from __future__ import annotations

import numpy as np

from ..context import NodeContext
from .elementwise import broadcast
from .linear import conv_axes, gemm_axes, matmul_axes
from .registry import rule
from .normalization import pool

# (op, input) -> the axis of that input the op sums over, by its rank
_INTEGER_CONTRACTIONS = {("ConvInteger", 0): lambda rank: 1, ("MatMulInteger", 0): lambda rank: rank - 1}


def _summed_axis(ctx: NodeContext, quantized: str, rank: int) -> int | None:
    """The axis every reader of a DynamicQuantizeLinear output sums over, if they agree."""
    summed = {_INTEGER_CONTRACTIONS[(n.op_type, k)](rank) if (n.op_type, k) in _INTEGER_CONTRACTIONS else None
              for n, k in ctx.consumers.get(quantized, [])}
    return summed.pop() if len(summed) == 1 and None not in summed else None


@rule("DynamicQuantizeLinear")
def dynamic_quantize(ctx: NodeContext):
    broadcast(ctx, [0])
    axis = _summed_axis(ctx, ctx.node.output[0], len(ctx.in_shape(0)))
    if axis is not None:
        ctx.contract(0, axis)


def _integer_input(ctx: NodeContext, axis: int):
    """The summed axis of an integer input can lose channels only where the DynamicQuantizeLinear
    that made it zeroes them for the oracle (every reader of its output sums over that axis)."""
    producer = ctx._producers.get(ctx.node.input[0])
    if producer is None or producer.op_type != "DynamicQuantizeLinear" or _summed_axis(
            ctx, ctx.node.input[0], len(ctx.in_shape(0))) != axis:
        ctx.fix(ctx.inp(0, axis), f"{ctx.op} {ctx.name!r} sums over integers whose removed channels nothing "
                                  "can zero (not quantized by a DynamicQuantizeLinear that only it reads)")


def _per_channel(ctx: NodeContext, k: int, space):
    """A zero point per output channel (a scalar one needs nothing)."""
    if ctx.has_input(k) and len(ctx.in_shape(k)) == 1 and ctx.in_shape(k)[0] > 1:
        ctx.same(ctx.inp(k, 0), space)


@rule("ConvInteger")
def conv_integer(ctx: NodeContext):
    reason = conv_axes(ctx, bias=None, contract=False)
    _per_channel(ctx, 3, ctx.outp(0, 1))
    _integer_input(ctx, 1)
    return reason


@rule("MatMulInteger")
def matmul_integer(ctx: NodeContext):
    reason = matmul_axes(ctx, contract=False)
    b = ctx.in_shape(1)
    if len(b) >= 2:
        _per_channel(ctx, 3, ctx.inp(1, len(b) - 1))
    _integer_input(ctx, len(ctx.in_shape(0)) - 1)
    return reason


@rule("com.microsoft.MatMulNBits")
def matmul_nbits(ctx: NodeContext):
    """Block-quantized weights (onnxruntime's model builder and MatMulNBitsQuantizer): B is
    [N, K / block_size, packed bytes], scales and zero points per (n, block). Output columns
    prune freely; input rows only in whole blocks (one channel is a block of rows), and not
    where two blocks share a byte of packed zero points, nor with a g_idx reordering."""
    a = ctx.in_shape(0)
    n, k = int(ctx.attr("N")), int(ctx.attr("K"))
    bits, block = int(ctx.attr("bits", 4)), int(ctx.attr("block_size"))
    b = ctx.in_shape(1)
    if a[-1] != k or len(b) != 3 or b[0] != n:
        return f"MatMulNBits {ctx.name!r}: weights not laid out as [N, K / block_size, bytes]"
    for i in range(len(a) - 1):
        ctx.same(ctx.inp(0, i), ctx.outp(0, i))
    out = ctx.outp(0, len(a) - 1)
    blocks = ctx.inp(1, 1)
    per_block = ctx.virtual("rows_per_block", k // b[1]) if k % b[1] == 0 else None
    if per_block is None or k // b[1] != block:
        return f"MatMulNBits {ctx.name!r}: K {k} is not whole blocks of {block}"
    ctx.product(ctx.inp(0, len(a) - 1), [blocks, per_block])
    ctx.fix(per_block, f"MatMulNBits {ctx.name!r} quantizes its input rows in blocks of {block}: whole blocks only")
    ctx.same(ctx.inp(1, 0), out)
    scales = ctx.in_shape(2)
    if len(scales) == 2:
        ctx.same(ctx.inp(2, 0), out)
        ctx.same(ctx.inp(2, 1), blocks)
    elif len(scales) == 1:
        ctx.product(ctx.inp(2, 0), [out, blocks])
    if ctx.has_input(3):
        zp = ctx.in_shape(3)
        if len(zp) == 2:
            ctx.same(ctx.inp(3, 0), out)
            if zp[1] != b[1]:       # fewer bytes than blocks: packed
                ctx.fix(blocks, f"MatMulNBits {ctx.name!r} packs the {bits}-bit zero points of two blocks per byte")
            else:
                ctx.same(ctx.inp(3, 1), blocks)
        else:
            return f"MatMulNBits {ctx.name!r}: zero points as a flat vector are not supported"
    if ctx.has_input(4):
        ctx.fix(blocks, f"MatMulNBits {ctx.name!r} reorders its input rows (g_idx)")
    if ctx.has_input(5):
        ctx.same(ctx.inp(5, 0), out)
    ctx.contract(0, len(a) - 1)
    ctx.sizes(("attr", "N"), [n], {0: out}, scalar=True)
    ctx.sizes(("attr", "K"), [k], {0: ctx.inp(0, len(a) - 1)}, scalar=True)


def _scalar(ctx: NodeContext, k: int) -> bool:
    return not ctx.has_input(k) or int(np.prod(ctx.in_shape(k))) == 1


def _contract_integer(ctx: NodeContext, axis: int, zero_point: int):
    """Summed integer input 0 with a zero point per tensor: the oracle can set removed channels
    to it. A zero point per channel there is not supported: the axis stays whole."""
    if _scalar(ctx, zero_point):
        ctx.contract_integer(0, axis, zero_point)
    else:
        ctx.fix(ctx.inp(0, axis), f"{ctx.op} {ctx.name!r}: a zero point per channel of its summed input")


@rule("QLinearConv")
def qlinear_conv(ctx: NodeContext):
    """x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias."""
    reason = conv_axes(ctx, bias=8, contract=False, weight=3)
    for k in (4, 5):
        _per_channel(ctx, k, ctx.outp(0, 1))
    _contract_integer(ctx, 1, 2)
    return reason


@rule("QLinearMatMul")
def qlinear_matmul(ctx: NodeContext):
    """a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point."""
    reason = matmul_axes(ctx, contract=False, second=3)
    b = ctx.in_shape(3)
    if len(b) >= 2:
        for k in (4, 5):
            _per_channel(ctx, k, ctx.inp(3, len(b) - 1))
    _contract_integer(ctx, len(ctx.in_shape(0)) - 1, 2)
    return reason


@rule("com.microsoft.QGemm")
def qgemm(ctx: NodeContext):
    """A, a_scale, a_zero_point, B, b_scale, b_zero_point, C, y_scale, y_zero_point."""
    a_k = gemm_axes(ctx, b=3, c=6, contract=False)
    n = ctx.outp(0, 1)
    for k in (4, 5):
        _per_channel(ctx, k, n)
    _contract_integer(ctx, a_k, 2)


@rule("com.microsoft.QLinearAdd", "com.microsoft.QLinearMul")
def qlinear_binary(ctx: NodeContext):
    """A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point: elementwise,
    scales and zero points per tensor."""
    if not all(_scalar(ctx, k) for k in (1, 2, 4, 5, 6, 7)):
        return f"{ctx.op} {ctx.name!r}: scales or zero points per channel"
    broadcast(ctx, [0, 3])


@rule("com.microsoft.QLinearGlobalAveragePool")
def qlinear_global_average_pool(ctx: NodeContext):
    """X, x_scale, x_zero_point, y_scale, y_zero_point: a pool, channels first (or last)."""
    if int(ctx.attr("channels_last", 0)):
        return f"QLinearGlobalAveragePool {ctx.name!r}: channels last"
    if not all(_scalar(ctx, k) for k in (1, 2, 3, 4)):
        return f"{ctx.op} {ctx.name!r}: scales or zero points per channel"
    return pool(ctx)
