"""Control flow: If, Loop and Scan tie the axes at their bodies' boundaries.

The nodes inside a body get their own rules like any other (``collect_couplings`` walks every
body), and a body's reads of outer-scope tensors are the same spaces as outside, so what is
left for these rules is the boundary:

- ``If``: each output is a *join* of the branch outputs at its position, as an elementwise Add
  joins its inputs: output axis i, then-branch axis i and else-branch axis i are one space, so
  a channel leaves both branches or neither. A branch whose output has another rank (Squeeze
  in one branch, Identity in the other, chosen by a size) is tied by its axes that are not 1,
  in order, where those agree; otherwise its axes are fixed.
- ``Loop``: carried state i is one space through the initial value, the body's input, the
  body's output and the Loop's final output; a scan output (stacked per iteration) is the
  body's output behind a new leading axis.
- ``Scan`` (opset 9+): state as for Loop; a scanned input is the body's input without the
  scan axis, a scan output the body's output with it.

Sizes that disagree (a carried tensor that grows) fix the axes involved. What a rule cannot
tie it fixes, body side included: a body output left free would shrink while the node's output
keeps its size. When the node is blocked (no shapes, excluded, an old Scan),
``NodeContext.fix_all`` fixes its bodies' inputs and outputs the same way.
"""

from __future__ import annotations

from ..context import NodeContext, Reason
from .registry import rule


def _attr_graph(ctx: NodeContext, name: str):
    for a in ctx.node.attribute:
        if a.name == name and a.HasField("g"):
            return a.g
    return None


def _aligned(outer: tuple, inner: tuple) -> list[tuple[int, int]] | None:
    """Pairs (outer axis, inner axis) to tie: every axis when the ranks agree, else the axes
    other than 1 in order when those sizes agree; None when nothing sensible pairs them."""
    if len(outer) == len(inner):
        return [(i, i) for i in range(len(outer))]
    a = [i for i, d in enumerate(outer) if d != 1]
    b = [j for j, d in enumerate(inner) if d != 1]
    if [outer[i] for i in a] != [inner[j] for j in b]:
        return None
    return list(zip(a, b))


def _tie(ctx: NodeContext, outer: str, inner: str, pairs=None, why: str = "") -> bool:
    """Tie axes of ``outer`` (a node input or output) and ``inner`` (a body input or output):
    ``pairs`` of axes, or aligned by ``_aligned``. Fixes both sides and returns False where
    they cannot be tied (a shape unknown, ranks that do not pair)."""
    so, si = ctx.shape(outer), ctx.shape(inner)
    if pairs is None and so is not None and si is not None:
        pairs = _aligned(so, si)
    if pairs is not None and so is not None and si is not None and \
            not all(0 <= i < len(so) and 0 <= j < len(si) for i, j in pairs):
        pairs = None
    if so is None or si is None or pairs is None:
        reason = Reason(f"{ctx.op} {ctx.name!r}: {why or 'body boundary'} {inner!r} "
                        f"{'has an unknown shape' if so is None or si is None else f'has shape {list(si)}'}"
                        f"{'' if so is None or si is None else f' where {outer!r} has {list(so)}'}",
                        "rule", ctx.name, ctx.op)
        for name in (outer, inner):
            for axis in range(len(ctx.shape(name) or ())):
                ctx.fix(ctx.space(name, axis), reason)
        return False
    for i, j in pairs:
        ctx.same(ctx.space(outer, i), ctx.space(inner, j))
    return True


def _fix_rest(ctx: NodeContext, names):
    """Body inputs and outputs no pairing reached (a Loop's iteration count and condition, the
    axes of 1 a branch squeezed): fixed, so that nothing inside shrinks them."""
    reason = Reason(f"{ctx.op} {ctx.name!r}: a body input or output axis it does not map", "rule", ctx.name, ctx.op)
    for name in names:
        for axis in range(len(ctx.shape(name) or ())):
            space = (name, axis)
            if space not in ctx.mentioned:
                ctx.fix(ctx.space(name, axis), reason)


@rule("If")
def if_(ctx: NodeContext):
    branches = [g for g in (_attr_graph(ctx, "then_branch"), _attr_graph(ctx, "else_branch")) if g is not None]
    for k, out in enumerate(ctx.node.output):
        for branch in branches:
            if k >= len(branch.output):
                return f"If {ctx.name!r}: a branch has fewer outputs than the node"
            inner = branch.output[k].name
            if out:
                _tie(ctx, out, inner, why="branch output")
    _fix_rest(ctx, [o.name for b in branches for o in b.output])
    return None


@rule("Loop")
def loop(ctx: NodeContext):
    body = _attr_graph(ctx, "body")
    if body is None or len(body.input) < 2 or len(body.output) < 1:
        return f"Loop {ctx.name!r}: body without its iteration count and condition"
    carried = len(body.input) - 2
    if len(body.output) < 1 + carried or len(ctx.node.input) < 2 + carried:
        return f"Loop {ctx.name!r}: body inputs and outputs do not match the node's"
    for i in range(carried):
        first, b_in, b_out = ctx.node.input[2 + i], body.input[2 + i].name, body.output[1 + i].name
        if not first:
            return f"Loop {ctx.name!r}: carried state {i} has no initial value"
        _tie(ctx, first, b_in, why="carried state")
        _tie(ctx, first, b_out, why="carried state")
        if i < len(ctx.node.output) and ctx.node.output[i]:
            _tie(ctx, first, ctx.node.output[i], why="carried state")
    for j in range(len(body.output) - 1 - carried):
        k = carried + j
        inner = body.output[1 + k].name
        if k < len(ctx.node.output) and ctx.node.output[k]:
            out = ctx.node.output[k]
            rank = len(ctx.shape(inner) or ())
            _tie(ctx, out, inner, [(a + 1, a) for a in range(rank)]
                 if len(ctx.shape(out) or ()) == rank + 1 else None, why="scan output")
    _fix_rest(ctx, [vi.name for vi in list(body.input) + list(body.output)])
    return None


@rule("Scan")
def scan(ctx: NodeContext):
    if ctx.opset < 9:
        return f"Scan {ctx.name!r}: opset {ctx.opset} (a batch axis and sequence lengths; opset 9+ is mapped)"
    body = _attr_graph(ctx, "body")
    m = ctx.attr("num_scan_inputs", 0)
    if body is None or len(body.input) != len(ctx.node.input) or len(body.input) < m:
        return f"Scan {ctx.name!r}: body inputs do not match the node's"
    n = len(body.input) - m
    k_out = len(body.output) - n
    if k_out < 0 or len(ctx.node.output) != len(body.output):
        return f"Scan {ctx.name!r}: body outputs do not match the node's"
    in_axes = list(ctx.attr("scan_input_axes", [0] * m))
    out_axes = list(ctx.attr("scan_output_axes", [0] * k_out))
    for i in range(n):
        first, b_in, b_out = ctx.node.input[i], body.input[i].name, body.output[i].name
        _tie(ctx, first, b_in, why="state")
        _tie(ctx, first, b_out, why="state")
        if ctx.node.output[i]:
            _tie(ctx, first, ctx.node.output[i], why="state")
    for j in range(m):
        outer, inner = ctx.node.input[n + j], body.input[n + j].name
        _tie(ctx, outer, inner, _skipping(ctx.shape(outer), in_axes[j]), why="scanned input")
    for j in range(k_out):
        outer, inner = ctx.node.output[n + j], body.output[n + j].name
        if outer:
            _tie(ctx, outer, inner, _skipping(ctx.shape(outer), out_axes[j]), why="scan output")
    _fix_rest(ctx, [vi.name for vi in list(body.input) + list(body.output)])
    return None


def _skipping(shape, axis: int):
    """(outer axis, inner axis) pairs of a tensor scanned along ``axis``: every other axis."""
    if shape is None:
        return None
    axis %= len(shape)
    return [(a, a - (a > axis)) for a in range(len(shape)) if a != axis]
