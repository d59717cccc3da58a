"""Recurrent layers: LSTM, GRU and RNN prune their hidden size and their input size, and so
does onnxruntime's DynamicQuantizeLSTM (what ``quantize_dynamic`` makes of an LSTM).

A hidden unit j owns row ``g*H + j`` of every gate g in W and R, the same rows of both
halves of B, the P (peephole) rows of LSTM, column j of R, and the last axis of Y, Y_h,
Y_c and the initial states; every direction shares hidden_size, so a unit goes from all
directions at once. The gate axis is a product gates x hidden where only hidden may shrink.
One rule serves every op; only where W and R keep their axes differs (``Layout``):
ONNX's ops store W [dirs, gates x hidden, input] and R [dirs, gates x hidden, hidden],
DynamicQuantizeLSTM the transposes, W [dirs, input, 4 x hidden] and R [dirs, hidden,
4 x hidden] in int8/uint8, with W_scale/W_zero_point/R_scale/R_zero_point (inputs 8-11) per
direction ([dirs], left as they are) or per gate row ([dirs, 4 x hidden], sliced with the units).

Why the oracle is exact for the float ops whatever the activations, clip or
linear_before_reset: unit j's state reaches the other units only through column j of R
(gates, cell and clipping are all per unit), so zeroing that column (a contraction of R over
its hidden axis) and every downstream consumer of Y/Y_h/Y_c leaves exactly the function of
the model without unit j. Nothing here needs blocking, then; a state that is a graph input
or output (a model carrying its state across calls) keeps the hidden size whole because the
engine fixes every axis of the graph's inputs and outputs, and the hidden class reaches it
through initial_h or Y_h.

DynamicQuantizeLSTM needs more: at every step onnxruntime quantizes the whole previous
hidden state [batch, hidden] to uint8 with one range (its min and max, widened to hold 0), so
a removed unit whose state is not 0 would still change every other unit through that range.
The oracle therefore silences the unit itself: its gate rows of W and R are set to their
zero point (dequantized exactly 0), its entries of B and of the initial states to 0. Its cell
candidate is then g(0) and its state h(0) of a cell that stays 0, both exactly 0 for the
activations that map 0 to 0 (the defaults); with another g or h activation the hidden size
stays whole. A state that is exactly 0 quantizes to the zero point, adds nothing to the
integer products and leaves the range as removing it would, so the result is bit for bit
the model without the unit, in exact integer arithmetic: onnxruntime's int8 weight kernel
saturates pairs of products on x86 without VNNI, and the pairs move with the units, so the
oracle reads both models' int8 weights as uint8 (``spa/verify/integer_kernels.py``). The input size is masked in X (float) as for LSTM: a zeroed
feature leaves the range of X alone just the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..context import NOT_CHANNEL, NodeContext, Reason
from .registry import rule


@dataclass(frozen=True)
class Layout:
    """Where a recurrent op keeps its axes."""

    gates: int          # gates per hidden unit
    rows: int           # the axis of W and R that holds gates x hidden
    cols: int           # the other one: W's input size, R's hidden size (summed over)
    quantized: bool = False   # int8/uint8 W and R with scales and zero points at inputs 8-11


LAYOUTS = {"LSTM": Layout(4, rows=1, cols=2), "GRU": Layout(3, rows=1, cols=2), "RNN": Layout(1, rows=1, cols=2),
           "DynamicQuantizeLSTM": Layout(4, rows=2, cols=1, quantized=True)}
_PEEPHOLES = 7  # LSTM only: P [num_directions, 3*H] (input, output, forget)
_QUANTIZATION = {1: (8, 9), 2: (10, 11)}   # DynamicQuantizeLSTM: W, R -> their scale, zero point inputs
# activations f(0) == 0: a silenced unit's cell candidate and state stay exactly 0
_ZERO_AT_ZERO = {"Tanh", "Relu", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "Softsign", "Elu"}


@rule("LSTM", "GRU", "RNN", "com.microsoft.DynamicQuantizeLSTM")
def recurrent(ctx: NodeContext):
    hidden_size = ctx.attr("hidden_size")
    if hidden_size is None:
        return f"{ctx.op} {ctx.name!r} has no hidden_size attribute"
    weights = LAYOUTS[ctx.op]
    n_gates, lstm = weights.gates, weights.gates == 4
    # layout 1 puts batch first: X [batch, seq, in], Y [batch, seq, dirs, H], states [batch, dirs, H]
    # (DynamicQuantizeLSTM has no layout attribute: sequence first)
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

    def gated(k: int, gates: int, label: str, axis: int = 1):
        """Input k is [dirs, ...] with ``axis`` gates x hidden: a unit's rows go with it, a gate never."""
        g = ctx.virtual(label, gates)
        ctx.fix(g, not_channel("its gates"))
        ctx.same(ctx.inp(k, 0), dirs)
        ctx.product(ctx.inp(k, axis), [g, hidden])

    # input size: X's features are summed into every gate through W
    ctx.same(ctx.inp(0, -1), ctx.inp(1, weights.cols))
    ctx.contract(0, -1)
    gated(1, n_gates, "gates", weights.rows)
    gated(2, n_gates, "gates", weights.rows)
    ctx.same(ctx.inp(2, weights.cols), hidden)
    if ctx.has_input(3):
        gated(3, 2 * n_gates, "bias_gates")   # Wb then Rb
    if ctx.has_input(4):
        ctx.same(ctx.inp(4, 0), batch)        # sequence_lens
    if lstm and ctx.has_input(_PEEPHOLES):
        gated(_PEEPHOLES, 3, "peepholes")
    initial = [k for k in ((5, 6) if lstm else (5,)) if ctx.has_input(k)]
    states = [("in", k) for k in initial]
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
    if weights.quantized:
        for k, (scale, zero_point) in _QUANTIZATION.items():
            for q in (scale, zero_point):   # [dirs] per tensor, [dirs, 4 x hidden] per gate row
                if len(ctx.in_shape(q)) == 2:
                    gated(q, n_gates, "gates")
                else:
                    ctx.same(ctx.inp(q, 0), dirs)
        reason = _silence(ctx, weights, initial)
        if reason:
            ctx.fix(hidden, reason)
    else:
        ctx.contract(2, weights.cols)   # the recurrence: where a removed unit's state would reach the others
    ctx.sizes(("attr", "hidden_size"), [hidden_size], {0: hidden}, scalar=True)
    return None


def _silence(ctx: NodeContext, weights: Layout, initial: list[int]) -> Reason | None:
    """DynamicQuantizeLSTM: where the oracle makes a removed unit's state exactly 0 (see the
    module's docstring), or why it cannot."""
    names = [a.decode() if isinstance(a, bytes) else a for a in (ctx.attr("activations") or [])]
    odd = sorted({name for i, name in enumerate(names) if i % 3 and name not in _ZERO_AT_ZERO})
    if odd:
        return Reason(f"{ctx.op} {ctx.name!r}: activation {', '.join(odd)} does not map 0 to 0, so a removed "
                      "unit's state would still move the dynamic quantization of the others", "rule", ctx.name, ctx.op)
    for k, (_, zero_point) in _QUANTIZATION.items():
        per_row = len(ctx.in_shape(zero_point)) == 2
        ctx.contract_integer(k, weights.rows, zero_point, zero_point_axes=(0, weights.rows) if per_row else (0,))
    if ctx.has_input(3):
        ctx.contract(3, 1)
    for k in initial:
        ctx.contract(k, 2)
    return None
