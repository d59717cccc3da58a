"""Recurrent layers: LSTM, GRU and RNN prune their hidden size and their input size.

A hidden unit j owns row ``g*H + j`` of every gate g in W and R, the same rows of both
halves of B, the P (peephole) rows of LSTM, column j of R, and the last axis of Y, Y_h,
Y_c and the initial states; every direction shares hidden_size, so a unit goes from all
directions at once. The gate axis is a product gates x hidden where only hidden may shrink.

Why the oracle is exact whatever the activations, clip or linear_before_reset: unit j's
state reaches the other units only through column j of R (gates, cell and clipping are all
per unit), so zeroing that column (a contraction of R over its last axis) and every
downstream consumer of Y/Y_h/Y_c leaves exactly the function of the model without unit j.
Nothing here needs blocking, then; a state that is a graph input or output (a model carrying
its state across calls) keeps the hidden size whole because the engine fixes every axis of
the graph's inputs and outputs, and the hidden class reaches it through initial_h or Y_h.
"""

from __future__ import annotations

from ..context import NOT_CHANNEL, NodeContext, Reason
from .registry import rule

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}          # gates per hidden unit
_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # initial_h (, initial_c)
_PEEPHOLES = 7  # LSTM only: P [num_directions, 3*H] (input, output, forget)


@rule("LSTM", "GRU", "RNN")
def recurrent(ctx: NodeContext):
    hidden_size = ctx.attr("hidden_size")
    if hidden_size is None:
        return f"{ctx.op} {ctx.name!r} has no hidden_size attribute"
    n_gates = _GATES[ctx.op]
    # layout 1 puts batch first: X [batch, seq, in], Y [batch, seq, dirs, H], states [batch, dirs, H]
    layout = int(ctx.attr("layout", 0))
    x_seq, x_batch = (0, 1) if layout == 0 else (1, 0)
    y_dirs, y_batch = (1, 2) if layout == 0 else (2, 0)
    s_dirs, s_batch = (0, 1) if layout == 0 else (1, 0)

    def not_channel(what: str) -> Reason:
        return Reason(f"{NOT_CHANNEL}{ctx.op} {ctx.name!r} ({what})", "not-channel", ctx.name, ctx.op)

    # directions and batch are one class each across the node (so the report names them once);
    # neither is a channel, and a direction cannot go without rewriting ``direction``
    hidden = ctx.virtual("hidden", int(hidden_size))
    dirs, batch = ctx.inp(1, 0), ctx.inp(0, x_batch)
    ctx.fix(dirs, not_channel("its directions"))
    ctx.fix(batch, not_channel("its batch"))

    def gated(k: int, gates: int, label: str):
        """Input k is [dirs, gates x hidden]: a unit's rows go with it, a gate never."""
        g = ctx.virtual(label, gates)
        ctx.fix(g, not_channel("its gates"))
        ctx.same(ctx.inp(k, 0), dirs)
        ctx.product(ctx.inp(k, 1), [g, hidden])

    # input size: X's features are summed into every gate through W
    ctx.same(ctx.inp(0, -1), ctx.inp(1, 2))
    ctx.contract(0, -1)
    gated(1, n_gates, "gates")
    gated(2, n_gates, "gates")
    ctx.same(ctx.inp(2, 2), hidden)
    ctx.contract(2, 2)   # the recurrence: where a removed unit's state would reach the others
    if ctx.has_input(3):
        gated(3, 2 * n_gates, "bias_gates")   # Wb then Rb
    if ctx.has_input(4):
        ctx.same(ctx.inp(4, 0), batch)        # sequence_lens
    if ctx.op == "LSTM" and ctx.has_input(_PEEPHOLES):
        gated(_PEEPHOLES, 3, "peepholes")
    states = [("in", k) for k in _STATES[ctx.op] if ctx.has_input(k)]
    states += [("out", k) for k in range(1, len(ctx.node.output)) if ctx.node.output[k]]
    for side, k in states:   # initial_h/c, Y_h, Y_c
        axis = ctx.inp if side == "in" else ctx.outp
        ctx.same(axis(k, s_dirs), dirs)
        ctx.same(axis(k, s_batch), batch)
        ctx.same(axis(k, 2), hidden)
    if ctx.node.output and ctx.node.output[0]:   # Y
        ctx.same(ctx.outp(0, x_seq), ctx.inp(0, x_seq))
        ctx.same(ctx.outp(0, y_dirs), dirs)
        ctx.same(ctx.outp(0, y_batch), batch)
        ctx.same(ctx.outp(0, 3), hidden)
    ctx.sizes(("attr", "hidden_size"), [hidden_size], {0: hidden}, scalar=True)
    return None
