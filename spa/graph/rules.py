"""One axis rule per ONNX operator family.

A rule receives a :class:`NodeContext` and states how the axes of the node's inputs and
outputs are tied (``same``, ``offset``, ``product``), which it cannot allow to shrink
(``fix``/``mixing``), where channels are summed away (``contract``: the oracle zeroes them
there), and how to fix the node's size constants after pruning (``rewrite``). Any axis a
rule does not mention is fixed, so an incomplete rule is conservative, never wrong.
Operators without a rule fix every axis they touch, and the report names them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .context import NodeContext

__all__ = ["RULES", "rule", "apply_rule"]

RULES: dict[str, Callable[[NodeContext], None]] = {}


def rule(*op_types: str):
    def register(fn):
        for op in op_types:
            if op in RULES:
                raise ValueError(f"rule for {op} registered twice")
            RULES[op] = fn
        return fn
    return register


def apply_rule(ctx: NodeContext) -> str | None:
    """Run the node's rule; return why the node is blocked, or None."""
    node = ctx.node
    shapes_known = all(ctx.shape(n) is not None for n in list(node.input) + list(node.output) if n)
    key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    fn = RULES.get(key)
    if fn is None:
        reason = f"no rule for {(node.domain + '.') if node.domain else ''}{node.op_type} (node {ctx.name!r})"
    elif not shapes_known:
        reason = f"{node.op_type} {ctx.name!r}: tensor shapes unknown"
    else:
        reason = fn(ctx)
    if reason:
        ctx.fix_all(reason)
        return reason
    ctx.fix_unmentioned()
    return None


# ---- elementwise ---------------------------------------------------------------------------

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


MS_ELEMENTWISE = ["com.microsoft." + op for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd")]


@rule(*UNARY, *BINARY, *MS_ELEMENTWISE)
def elementwise(ctx: NodeContext):
    if ctx.op == "Dropout" and len(ctx.node.output) > 1 and ctx.node.output[1]:
        ctx.fix_all(f"Dropout {ctx.name!r}: its mask output is used")
    inputs = [0] if ctx.op in ("Clip", "Dropout") else None  # their other inputs are scalars
    broadcast(ctx, inputs)


# ---- contractions: Conv, Gemm, MatMul ------------------------------------------------------

@rule("Conv", "ConvTranspose")
def conv(ctx: NodeContext):
    x, w = ctx.in_shape(0), ctx.in_shape(1)
    groups = int(ctx.attr("group", 1))
    transpose = ctx.op == "ConvTranspose"
    c_in, c_out = x[1], ctx.out_shape(0)[1]
    ctx.same(ctx.inp(0, 0), ctx.outp(0, 0))
    # Channels = groups x per-group channels; the dependency stage picks which one to prune.
    g = ctx.virtual("groups", groups)
    k_in = ctx.inp(1, 1) if not transpose else ctx.virtual("in_per_group", c_in // groups)
    k_out = ctx.inp(1, 1) if transpose else ctx.virtual("out_per_group", c_out // groups)
    w_in = ctx.inp(1, 0) if transpose else None
    w_out = None if transpose else ctx.inp(1, 0)
    ctx.product(ctx.inp(0, 1), [g, k_in])
    ctx.product(ctx.outp(0, 1), [g, k_out])
    if w_out is not None:
        ctx.same(w_out, ctx.outp(0, 1))
    if w_in is not None:
        ctx.same(w_in, ctx.inp(0, 1))
    if ctx.has_input(2):
        ctx.same(ctx.inp(2, 0), ctx.outp(0, 1))
    ctx.contract(0, 1)
    if ctx.attr("output_shape") is not None:
        return f"ConvTranspose {ctx.name!r} has an explicit output_shape"

    def set_groups(node, plan):
        new = plan.new_size(g)
        if new != groups:
            plan.set_attr(node, "group", new)
    ctx.rewrite(set_groups)


# onnxruntime's graph optimizer fuses an activation into the layer; the axes are the layer's.
RULES["com.microsoft.FusedConv"] = conv


@rule("Gemm", "com.microsoft.FusedGemm")
def gemm(ctx: NodeContext):
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    a_m, a_k = (1, 0) if ta else (0, 1)
    b_k, b_n = (1, 0) if tb else (0, 1)
    ctx.same(ctx.inp(0, a_k), ctx.inp(1, b_k))
    ctx.same(ctx.inp(0, a_m), ctx.outp(0, 0))
    ctx.same(ctx.inp(1, b_n), ctx.outp(0, 1))
    if ctx.has_input(2):
        broadcast(ctx, [2])
    ctx.contract(0, a_k)


@rule("MatMul")
def matmul(ctx: NodeContext):
    a, b, y = ctx.in_shape(0), ctx.in_shape(1), ctx.out_shape(0)
    if len(a) < 1 or len(b) < 1:
        return f"MatMul {ctx.name!r} on scalars"
    ctx.same(ctx.inp(0, len(a) - 1), ctx.inp(1, 0 if len(b) == 1 else len(b) - 2))
    ctx.contract(0, len(a) - 1)
    if len(a) >= 2:
        ctx.same(ctx.inp(0, len(a) - 2), ctx.outp(0, len(y) - (2 if len(b) >= 2 else 1)))
    if len(b) >= 2:
        ctx.same(ctx.inp(1, len(b) - 1), ctx.outp(0, len(y) - 1))
    batch_y = len(y) - (len(a) >= 2) - (len(b) >= 2)
    for k, shape, core in ((0, a, 2), (1, b, 2)):
        batch = shape[:-core] if len(shape) >= core else ()
        for i, n in enumerate(batch):
            j = batch_y - len(batch) + i
            if n == y[j]:
                ctx.same(ctx.inp(k, i), ctx.outp(0, j))
                ctx.batch(ctx.outp(0, j))


# ---- normalizations ------------------------------------------------------------------------

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

    def set_groups(node, plan):
        new = plan.new_size(g)
        if new != groups:
            plan.set_attr(node, "num_groups", new)
    ctx.rewrite(set_groups)


@rule("LayerNormalization")
def layer_norm(ctx: NodeContext):
    x = ctx.in_shape(0)
    axis = int(ctx.attr("axis", -1)) % len(x)
    for i in range(len(x)):
        ctx.same(ctx.inp(0, i), ctx.outp(0, i))
        if i >= axis:
            ctx.mixing(ctx.inp(0, i))
    broadcast(ctx, [k for k in (1, 2) if ctx.has_input(k)])


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


# ---- layout: reshape family, transpose ------------------------------------------------------

def align_axes(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Match the axes of two shapes with the same element count into blocks of equal
    product, ignoring size-1 axes: ``(2,3,4) -> (6,4)`` gives ``[([0,1],[0]), ([2],[1])]``."""
    ia = [i for i, n in enumerate(a) if n != 1]
    ib = [i for i, n in enumerate(b) if n != 1]
    blocks, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        block_a, block_b = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(ia):
                    return None
                block_a.append(ia[i])
                pa *= a[ia[i]]
            else:
                j += 1
                if j >= len(ib):
                    return None
                block_b.append(ib[j])
                pb *= b[ib[j]]
        blocks.append((block_a, block_b))
        i += 1
        j += 1
    return blocks if i == len(ia) and j == len(ib) else None


def tie_read_sizes(ctx: NodeContext, k: int, offset: int = 0):
    """An output size read from another tensor's shape must stay equal to it: tie the two
    axes, so both keep the same count (or neither is pruned)."""
    for j, src in enumerate(ctx.size_sources(k) or []):
        if src and src[0] == "dim" and ctx.shape(src[1]) is not None:
            out_axis = j + offset
            if 0 <= out_axis < len(ctx.out_shape(0)) and (src[1], src[2]) != (ctx.node.output[0], out_axis):
                ctx.same(ctx.outp(0, out_axis), ctx.space(src[1], src[2]))


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx: NodeContext):
    blocks = align_axes(ctx.in_shape(0), ctx.out_shape(0))
    if blocks is None:
        return f"{ctx.op} {ctx.name!r}: cannot match input and output axes"
    for ins, outs in blocks:
        if len(ins) == 1 and len(outs) == 1:
            ctx.same(ctx.inp(0, ins[0]), ctx.outp(0, outs[0]))
        elif len(ins) == 1:
            ctx.product(ctx.inp(0, ins[0]), [ctx.outp(0, j) for j in outs])
        elif len(outs) == 1:
            ctx.product(ctx.outp(0, outs[0]), [ctx.inp(0, i) for i in ins])
        else:
            for i in ins:
                ctx.fix(ctx.inp(0, i), f"{ctx.op} {ctx.name!r} regroups axes {ins} into {outs}")
    if ctx.op != "Reshape":
        return None
    if not ctx.is_initializer(1) and ctx.const(1) is None:
        return f"Reshape {ctx.name!r}: target shape unknown"
    tie_read_sizes(ctx, 1)
    out_shape = ctx.out_shape(0)
    allowzero = int(ctx.attr("allowzero", 0))

    def set_target(node, plan):
        target = ctx.const(1)
        new = target.copy()
        for j in range(len(out_shape)):
            if target[j] == -1 or (target[j] == 0 and not allowzero):
                continue  # inferred or copied: follows the pruned input by itself
            new[j] = plan.new_size((node.output[0], j))
        plan.set_size_vector(node, 1, target, new)
    ctx.rewrite(set_target)
    return None


@rule("Transpose")
def transpose(ctx: NodeContext):
    rank = len(ctx.in_shape(0))
    perm = ctx.attr("perm") or list(reversed(range(rank)))
    for j, i in enumerate(perm):
        ctx.same(ctx.inp(0, i), ctx.outp(0, j))


@rule("DepthToSpace", "SpaceToDepth")
def depth_to_space(ctx: NodeContext):
    ctx.same(ctx.inp(0, 0), ctx.outp(0, 0))
    return None  # channel axis is factored with the block: left fixed


# ---- offsets: Concat, Split, Slice ---------------------------------------------------------

@rule("Concat")
def concat(ctx: NodeContext):
    out = ctx.out_shape(0)
    axis = int(ctx.attr("axis")) % len(out)
    start = 0
    for k in range(len(ctx.node.input)):
        shape = ctx.in_shape(k)
        for i in range(len(out)):
            if i == axis:
                if shape[i]:
                    ctx.offset(ctx.inp(k, i), ctx.outp(0, i), start)
            else:
                ctx.same(ctx.inp(k, i), ctx.outp(0, i))
        start += shape[axis]


@rule("Split")
def split(ctx: NodeContext):
    x = ctx.in_shape(0)
    axis = int(ctx.attr("axis", 0)) % len(x)
    start = 0
    for k, name in enumerate(ctx.node.output):
        shape = ctx.out_shape(k)
        for i in range(len(x)):
            if i == axis:
                ctx.offset(ctx.outp(k, i), ctx.inp(0, i), start)
            else:
                ctx.same(ctx.inp(0, i), ctx.outp(k, i))
        start += shape[axis]

    def set_sizes(node, plan):
        old = [ctx.out_shape(k)[axis] for k in range(len(node.output))]
        new = [plan.new_size((o, axis)) for o in node.output]
        if new == old:
            return
        if ctx.opset >= 13:
            plan.set_input(node, 1, np.array(new, dtype=np.int64))
            plan.remove_attr(node, "num_outputs")
        else:
            plan.set_attr(node, "split", new)
    ctx.rewrite(set_sizes)


@rule("Slice")
def slice_(ctx: NodeContext):
    x = ctx.in_shape(0)
    y = ctx.out_shape(0)
    if ctx.opset >= 10:
        starts, ends, axes, steps = (ctx.const(k) for k in (1, 2, 3, 4))
        if starts is None or ends is None or (ctx.has_input(3) and axes is None) or (
                ctx.has_input(4) and steps is None):
            return f"Slice {ctx.name!r}: bounds are computed"
    else:
        starts, ends, axes, steps = (np.asarray(ctx.attr(n)) if ctx.attr(n) is not None else None
                                     for n in ("starts", "ends", "axes", "steps"))
    starts, ends = np.ravel(starts).astype(np.int64), np.ravel(ends).astype(np.int64)
    axes = np.arange(len(starts)) if axes is None else np.ravel(axes).astype(np.int64) % len(x)
    steps = np.ones(len(starts), np.int64) if steps is None else np.ravel(steps).astype(np.int64)
    sliced = {}
    for a, s, e, st in zip(axes, starts, ends, steps):
        n = x[a]
        if st > 0:
            s = min(max(s + n if s < 0 else s, 0), n)
        else:
            s = min(max(s + n if s < 0 else s, -1), n - 1)
        sliced[int(a)] = (int(s), int(st))
    for i in range(len(x)):
        if i not in sliced:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))
        elif sliced[i][1] == 1 and y[i] > 0:
            ctx.offset(ctx.outp(0, i), ctx.inp(0, i), sliced[i][0])
        # other steps: left unmentioned, so fixed

    def set_bounds(node, plan):
        new_starts, new_ends = starts.copy(), ends.copy()
        changed = False
        for p, a in enumerate(axes):
            s, st = sliced[int(a)]
            kept = plan.kept((node.input[0], int(a)))
            if kept is None:
                continue
            new_s = int(np.searchsorted(kept, s))
            new_starts[p] = new_s
            new_ends[p] = new_s + plan.new_size((node.output[0], int(a)))
            changed = True
        if not changed:
            return
        if ctx.opset >= 10:
            plan.set_input(node, 1, new_starts)
            plan.set_input(node, 2, new_ends)
        else:
            plan.set_attr(node, "starts", [int(v) for v in new_starts])
            plan.set_attr(node, "ends", [int(v) for v in new_ends])
    ctx.rewrite(set_bounds)


@rule("Pad")
def pad(ctx: NodeContext):
    x = ctx.in_shape(0)
    pads = ctx.attr_or_input("pads" if ctx.opset >= 2 else "paddings", 1, 11)
    if pads is None:
        return f"Pad {ctx.name!r}: pads are computed"
    pads = np.ravel(pads)
    axes = ctx.const(3) if ctx.has_input(3) else np.arange(len(x))
    padded = {int(a) % len(x) for p, a in enumerate(np.ravel(axes))
              if pads[p] != 0 or pads[p + len(np.ravel(axes))] != 0}
    for i in range(len(x)):
        if i not in padded:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))


@rule("Resize", "Upsample")
def resize(ctx: NodeContext):
    x, y = ctx.in_shape(0), ctx.out_shape(0)
    if ctx.op == "Resize" and ctx.has_input(3) and ctx.attr("axes") is None:
        sizes = ctx.const(3)
        if sizes is None:
            return f"Resize {ctx.name!r}: output sizes are computed"
    for i in range(len(x)):
        if x[i] == y[i]:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))

    def set_sizes(node, plan):
        if node.op_type != "Resize" or not ctx.has_input(3):
            return
        sizes = ctx.const(3).copy()
        new = np.array([plan.new_size((node.output[0], i)) for i in range(len(y))], dtype=sizes.dtype)
        if not np.array_equal(new, sizes):
            plan.set_input(node, 3, new)
    ctx.rewrite(set_sizes)


# ---- repetition and indexing --------------------------------------------------------------

@rule("Expand")
def expand(ctx: NodeContext):
    x, y = ctx.in_shape(0), ctx.out_shape(0)
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
