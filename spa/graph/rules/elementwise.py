"""Elementwise ops with numpy broadcasting: every input axis is the output axis it broadcasts to."""

from __future__ import annotations


from ..context import NodeContext
from .registry import rule


def broadcast(ctx: NodeContext, inputs=None, output: int = 0):
    """Tie each input axis to the output axis it broadcasts to (right-aligned, numpy rules)."""
    out_shape = ctx.out_shape(output)
    for k in inputs if inputs is not None else range(len(ctx.node.input)):
        if not ctx.has_input(k):
            continue
        shape = ctx.in_shape(k)
        for i in range(len(shape)):
            j = len(out_shape) - len(shape) + i
            if shape[i] == out_shape[j]:
                ctx.same(ctx.inp(k, i), ctx.outp(output, j))


UNARY = """Abs Acos Acosh Asin Asinh Atan Atanh BitwiseNot Cast CastLike Ceil Celu Cos Cosh Elu Erf
Exp Floor Gelu HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal
Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Swish Tan Tanh ThresholdedRelu
Clip Dropout""".split()
BINARY = """Add Sub Mul Div Pow Max Min Mean Sum Where PRelu And Or Xor Equal Greater GreaterOrEqual
Less LessOrEqual Mod BitShift BitwiseAnd BitwiseOr BitwiseXor""".split()


# BiasAdd (X + bias + skip) is elementwise too, but onnxruntime has no CPU kernel for it, so no
# oracle test can check it: left without a rule, it blocks.
MS_ELEMENTWISE = ["com.microsoft." + op for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")]


@rule(*UNARY, *BINARY, *MS_ELEMENTWISE)
def elementwise(ctx: NodeContext):
    if ctx.op == "Dropout" and len(ctx.node.output) > 1 and ctx.node.output[1]:
        ctx.fix_all(f"Dropout {ctx.name!r}: its mask output is used")
    # Clip's and Dropout's other inputs are scalars; CastLike reads only the type of its second
    # (the dynamo exporter casts a scalar like an activation: CastLike(0.0, x))
    inputs = [0] if ctx.op in ("Clip", "Dropout", "CastLike") else None
    broadcast(ctx, inputs)
    if ctx.op == "CastLike":
        for i in range(len(ctx.in_shape(1) or ())):
            ctx.free(ctx.inp(1, i))


