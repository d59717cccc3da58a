"""Layout: the reshape family (axes merged or split), Transpose, Concat/Split/Slice offsets,
Pad and Resize."""

from __future__ import annotations

import numpy as np

from ..context import NodeContext
from .registry import rule


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


def common_pieces(a: list[int], b: list[int]) -> list[int] | None:
    """The sizes of the finest axes that both ``a`` and ``b`` (same product) are row-major
    merges of: ``(8, 10, 10)`` and ``(4, 200)`` give ``[4, 2, 10, 10]``; None when no such
    axes exist (``(6, 4)`` and ``(4, 6)``: a boundary of one falls inside a piece of the other)."""
    cuts = sorted(set(np.cumprod(a).tolist()) | set(np.cumprod(b).tolist()))
    pieces, prev = [], 1
    for c in cuts:
        if c % prev:
            return None
        pieces.append(c // prev)
        prev = c
    return pieces


def regroup(ctx: NodeContext, ins: list[int], outs: list[int]):
    """Several axes into several others (``[N, C, H, W] -> [N, G, C/G*H*W]``, the exporters'
    GroupNorm): both sides are products of their common pieces, so each piece can carry
    channels (the groups G of C = G x C/G). Without common pieces the axes stay whole."""
    x, y = ctx.in_shape(0), ctx.out_shape(0)
    pieces = common_pieces([x[i] for i in ins], [y[j] for j in outs])
    if pieces is None:
        for i in ins:
            ctx.fix(ctx.inp(0, i), f"{ctx.op} {ctx.name!r} regroups axes {ins} into {outs}")
        for j in outs:
            ctx.fix(ctx.outp(0, j), f"{ctx.op} {ctx.name!r} regroups axes {ins} into {outs}")
        return

    def spans(axes, shape):   # axis -> the pieces it merges, [first, last)
        out, p = {}, 0
        for i in axes:
            start, size = p, 1
            while size < shape[i]:
                size *= pieces[p]
                p += 1
            out[i] = (start, p)
        return out

    in_spans, out_spans = spans(ins, x), spans(outs, y)
    space = {}
    for i, (s, e) in in_spans.items():
        if e - s == 1:
            space[s] = ctx.inp(0, i)
    for j, (s, e) in out_spans.items():
        if e - s == 1:
            if s in space:
                ctx.same(space[s], ctx.outp(0, j))
            else:
                space[s] = ctx.outp(0, j)
    for p, n in enumerate(pieces):
        if p not in space:
            space[p] = ctx.virtual(f"piece{ins[0]}.{p}", n)
    for k, axes_spans in ((0, in_spans), (None, out_spans)):
        for axis, (s, e) in axes_spans.items():
            if e - s > 1:
                whole = ctx.inp(0, axis) if k == 0 else ctx.outp(0, axis)
                ctx.product(whole, [space[p] for p in range(s, e)])


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
            regroup(ctx, ins, outs)
    if ctx.op != "Reshape":
        return None
    if not ctx.is_initializer(1) and ctx.const(1) is None:
        return f"Reshape {ctx.name!r}: target shape unknown"
    target = ctx.const(1)
    allowzero = int(ctx.attr("allowzero", 0))
    # -1 (inferred) and 0 (copied) follow the pruned input by themselves
    entries = {j: ctx.outp(0, j) for j, v in enumerate(np.ravel(target)) if v != -1 and (v != 0 or allowzero)}
    ctx.sizes(("vector", 1), target, entries, frozen=computed_sizes(ctx, 1, entries))
    return None


def computed_sizes(ctx: NodeContext, k: int, entries: dict) -> dict:
    """Entries of size vector k computed from other sizes: ``x.view(b, n, other.shape[-1])``,
    ``qkv.reshape(b, n, 3, heads, C // heads)`` as the legacy exporter writes them (Shape ->
    Gather -> Div -> Cast -> Unsqueeze -> Concat). Such an entry, a Concat piece of its own,
    becomes a constant once its own size or a size it reads changes (``fixups.Sizes``), so the
    output axis and the axes read need not keep equal widths: attention heads need not follow
    the residual width their output size is read from. An entry read from a shape that shares
    its Concat piece with others (``x.shape[:2]``) ties the axis to the one it is read from;
    one computed from several sizes is left to compute itself.
    Returns {position: spaces read}."""
    pieces = ctx.concat_pieces(k)
    frozen, out = {}, ctx.node.output[0]
    for j, src in enumerate(ctx.size_sources(k) or []):
        if src == ("const",) or j not in entries:
            continue
        reads = [src[1:]] if src and src[0] == "dim" else list(src[1]) if src and src[0] == "expr" else []
        if reads == [(out, j)]:
            continue
        if src and src[0] == "expr" and len(reads) > 1:
            # S * hidden: at run time it reads the pruned width itself, and a constant would
            # hold for the probe's S only (a model pruned before this rule ran at any S)
            continue
        if pieces is not None and pieces[j] == 1 and all(ctx.shape(t) is not None for t, _ in reads):
            frozen[j] = [ctx.space(t, a) for t, a in reads]
        elif src and src[0] == "dim" and ctx.shape(src[1]) is not None:
            ctx.same(ctx.outp(0, j), ctx.space(src[1], src[2]))
    return frozen


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

    old = [ctx.out_shape(k)[axis] for k in range(len(ctx.node.output))]
    entries = {k: ctx.outp(k, axis) for k in range(len(ctx.node.output))}
    if ctx.opset >= 13:
        ctx.sizes(("input", 1), old, entries, drop=("num_outputs",))
    else:
        ctx.sizes(("attr", "split"), old, entries)


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
    # A constant table cut by bounds computed at run time (BERT's position ids up to the
    # sequence length): how much of it is read depends on the input, so none of it may go
    window = ctx.is_initializer(0) and ctx.opset >= 10 and not all(
        ctx.is_initializer(k) for k in (1, 2) if ctx.has_input(k))
    for i in range(len(x)):
        if i not in sliced:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))
        elif window:
            ctx.fix(ctx.inp(0, i), f"Slice {ctx.name!r} reads a window of this constant whose bounds are "
                                   "computed at run time")
        elif sliced[i][1] == 1 and y[i] > 0:
            ctx.offset(ctx.outp(0, i), ctx.inp(0, i), sliced[i][0])
        # other steps: left unmentioned, so fixed

    entries = [(p, ctx.inp(0, int(a)), ctx.outp(0, int(a)), sliced[int(a)][0])
               for p, a in enumerate(axes) if sliced[int(a)][1] == 1 and y[int(a)] > 0]
    ctx.slice_bounds(starts, ends, entries, as_attrs=ctx.opset < 10)


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
    sizes = ctx.const(3) if ctx.op == "Resize" and ctx.has_input(3) else None
    if ctx.op == "Resize" and ctx.has_input(3) and sizes is None:
        return f"Resize {ctx.name!r}: output sizes are computed"
    for i in range(len(x)):
        if x[i] == y[i]:
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))
    if sizes is not None:
        axes = ctx.attr("axes")
        axes = range(len(y)) if axes is None else [int(a) % len(y) for a in axes]
        # only the pruned axes' entries change: a size read from another tensor's shape
        # (upsampling to a skip connection's size) must stay computed, or the model only runs
        # at one shape
        ctx.sizes(("vector", 3), sizes, {p: ctx.outp(0, a) for p, a in enumerate(axes)})


