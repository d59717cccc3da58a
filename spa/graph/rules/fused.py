"""onnxruntime's fused transformer ops (``onnxruntime.transformers.optimizer``, the genai
model builder): skip-normalizations and fused attention.

Only ops with an onnxruntime CPU kernel get a rule here, since the oracle runs on the CPU:
``BiasAdd`` and ``BiasSplitGelu`` (CUDA only) stay without one and block. The fused
activations (``FastGelu``, ``BiasGelu``, ``QuickGelu``, ``Gelu``) are elementwise with a
broadcast bias: ``elementwise.py`` has them. ``GroupQueryAttention`` and ``RotaryEmbedding``
(and the standard ``Attention``/``RotaryEmbedding`` of opset 23) are in ``attention.py``.
"""

from __future__ import annotations

from ..context import NodeContext
from .elementwise import broadcast
from .registry import rule


# ---- skip-normalizations: LayerNorm/RMSNorm over the hidden axis ---------------------------

@rule("com.microsoft.SkipLayerNormalization", "com.microsoft.SkipSimplifiedLayerNormalization")
def skip_layer_norm(ctx: NodeContext):
    """``output = norm(input + skip + bias) * gamma (+ beta)`` over the last axis; optional
    outputs ``mean``/``inv_std_var`` ([..., 1], no hidden axis: they change with it, which
    ``mixing`` already says) and ``input_skip_bias_sum`` (the sum before the norm: elementwise,
    the same hidden channels as the output)."""
    x = ctx.in_shape(0)
    y = ctx.out_shape(0)
    if len(x) != len(y):
        return f"{ctx.op} {ctx.name!r}: input and output ranks differ"
    # input, skip (may broadcast: [S, H] or [1, S, H]); gamma, beta, bias: [H]
    broadcast(ctx, [k for k in range(len(ctx.node.input)) if ctx.has_input(k)])
    ctx.mixing(ctx.inp(0, len(x) - 1))
    if len(ctx.node.output) > 3 and ctx.node.output[3]:
        for i in range(len(y)):
            ctx.same(ctx.outp(3, i), ctx.outp(0, i))
    return None


# ---- fused attention: whole heads --------------------------------------------------------

def _heads(ctx: NodeContext, n: int, widths: dict[str, int]):
    """A virtual heads axis (marked as a MatMul batch axis, so a product factor tied to it is
    a head) and, per projection, its columns = heads x head size. The value head size is
    stated first, so that with ``attention="head-dims"`` it carries and the heads stay whole
    (the order in which the dependency stage meets products decides the carrier). Query and
    key head sizes stay fixed: the default scale is 1/sqrt(their head size)."""
    if n <= 0 or any(width % n for width in widths.values()):
        return None
    heads = ctx.virtual("heads", n)
    ctx.batch(heads)
    cols, per = {}, {}
    for label in ("v", "q", "k"):
        width = widths[label]
        cols[label] = ctx.virtual(f"{label}_hidden", width)
        per[label] = ctx.virtual(f"{label}_head_size", width // n)
        ctx.product(cols[label], [heads, per[label]])
    for label in ("q", "k"):
        ctx.fix(per[label], f"{ctx.op} {ctx.name!r} scales scores by its query/key head size")
    return heads, cols, per


def _cache(ctx: NodeContext, k: int, heads, per, heads_axis: int, size_axis: int, output: bool = False):
    """A past/present key-value cache ([2,] B, heads, T, head size): heads and head size are
    the node's."""
    present = (len(ctx.node.output) > k and ctx.node.output[k]) if output else ctx.has_input(k)
    if not present:
        return
    shape = ctx.out_shape(k) if output else ctx.in_shape(k)
    if len(shape) <= max(heads_axis, size_axis) or 0 in shape:
        return
    space = ctx.outp if output else ctx.inp
    ctx.same(space(k, heads_axis), heads)
    for label in ("k", "v"):
        ctx.same(space(k, size_axis), per[label])


@rule("com.microsoft.Attention")
def attention(ctx: NodeContext):
    """Packed projection: ``input [B, S, D] @ weights [D, q+k+v] + bias [q+k+v]``, then
    ``num_heads`` heads; the output is [B, S, v] = heads x v head size. The weight's column
    axis is three blocks (Q, K, V) of heads x head size. Fix-ups: ``num_heads`` and
    ``qkv_hidden_sizes`` (written when the value width changes)."""
    if ctx.attr("do_rotary", 0):
        return f"Attention {ctx.name!r} applies rotary embeddings inside (do_rotary)"
    if ctx.attr("past_present_share_buffer", 0):
        return f"Attention {ctx.name!r} shares its past/present buffer"
    x, w, y = ctx.in_shape(0), ctx.in_shape(1), ctx.out_shape(0)
    n = int(ctx.attr("num_heads"))
    sizes = ctx.attr("qkv_hidden_sizes")
    if len(x) != 3 or len(w) != 2 or len(y) != 3:
        return f"Attention {ctx.name!r}: unexpected ranks"
    qkv = [int(s) for s in sizes] if sizes else [w[1] // 3] * 3
    if sum(qkv) != w[1] or y[2] != qkv[2]:
        return f"Attention {ctx.name!r}: weight columns do not match qkv_hidden_sizes"
    found = _heads(ctx, n, dict(zip("qkv", qkv)))
    if found is None:
        return f"Attention {ctx.name!r}: hidden sizes are not a multiple of num_heads={n}"
    heads, cols, per = found
    start = 0
    for label, width in zip("qkv", qkv):
        ctx.offset(cols[label], ctx.inp(1, 1), start)
        start += width
    if ctx.has_input(2):
        ctx.same(ctx.inp(2, 0), ctx.inp(1, 1))
    ctx.same(ctx.inp(0, 2), ctx.inp(1, 0))
    ctx.contract(0, 2)
    ctx.same(ctx.inp(0, 0), ctx.outp(0, 0))
    ctx.same(ctx.inp(0, 1), ctx.outp(0, 1))
    ctx.same(ctx.outp(0, 2), cols["v"])
    _cache(ctx, 4, heads, per, 2, 4)                   # past [2, B, heads, T, head size]
    _cache(ctx, 1, heads, per, 2, 4, output=True)      # present
    if ctx.has_input(5) and len(ctx.in_shape(5)) == 4 and ctx.in_shape(5)[1] == n:
        ctx.same(ctx.inp(5, 1), heads)                 # attention_bias [B, heads, S, T]
    ctx.sizes(("attr", "num_heads"), [n], {0: heads}, scalar=True)
    ctx.sizes(("attr", "qkv_hidden_sizes"), qkv, {p: cols[label] for p, label in enumerate("qkv")})
    return None


@rule("com.microsoft.MultiHeadAttention")
def multi_head_attention(ctx: NodeContext):
    """Separate projections: query [B, S, q], key [B, L, k], value [B, L, v], optional bias
    [q+k+v]; output [B, S, v]. Only the 3-D form (not packed, not a cache given as
    [B, heads, L, head size] key/value) has a rule."""
    if len(ctx.node.input) < 3 or not ctx.has_input(1) or not ctx.has_input(2):
        return f"MultiHeadAttention {ctx.name!r}: packed query/key/value"
    shapes = [ctx.in_shape(k) for k in range(3)]
    if any(len(s) != 3 for s in shapes):
        return f"MultiHeadAttention {ctx.name!r}: key/value are not [batch, length, hidden]"
    n = int(ctx.attr("num_heads"))
    widths = {label: s[2] for label, s in zip("qkv", shapes)}
    found = _heads(ctx, n, widths)
    if found is None:
        return f"MultiHeadAttention {ctx.name!r}: hidden sizes are not a multiple of num_heads={n}"
    heads, cols, per = found
    for k, label in enumerate("qkv"):
        ctx.same(ctx.inp(k, 2), cols[label])
    ctx.same(ctx.inp(1, 0), ctx.inp(0, 0))
    ctx.same(ctx.inp(2, 0), ctx.inp(0, 0))
    ctx.same(ctx.inp(2, 1), ctx.inp(1, 1))
    ctx.same(ctx.inp(0, 0), ctx.outp(0, 0))
    ctx.same(ctx.inp(0, 1), ctx.outp(0, 1))
    ctx.same(ctx.outp(0, 2), cols["v"])
    if ctx.has_input(3):                                # bias [q + k + v]
        start = 0
        for label in "qkv":
            ctx.offset(cols[label], ctx.inp(3, 0), start)
            start += widths[label]
    if ctx.has_input(5) and len(ctx.in_shape(5)) == 4 and ctx.in_shape(5)[1] == n:
        ctx.same(ctx.inp(5, 1), heads)                 # attention_bias [B, heads, S, T]
    for k in (6, 7):                                    # past_key, past_value [B, heads, T, head size]
        _cache(ctx, k, heads, per, 1, 3)
    for k in (1, 2):                                    # present_key, present_value
        _cache(ctx, k, heads, per, 1, 3, output=True)
    ctx.sizes(("attr", "num_heads"), [n], {0: heads}, scalar=True)
    return None


# ---- embeddings ------------------------------------------------------------------------------

@rule("com.microsoft.EmbedLayerNormalization")
def embed_layer_norm(ctx: NodeContext):
    """``LayerNorm(word[ids] + position[pos] + segment[seg]) * gamma + beta``: the tables'
    columns, gamma, beta and the outputs' hidden axis are one mixed axis; ``embedding_sum``
    (output 2) is the sum before the norm. Table rows (vocabulary, positions) and the
    ``mask_index`` output are not channels."""
    y = ctx.out_shape(0)
    if len(y) != 3:
        return f"EmbedLayerNormalization {ctx.name!r}: output is not [batch, sequence, hidden]"
    hidden = ctx.outp(0, 2)
    for k in (2, 3, 4):                    # word, position, segment embedding tables [rows, H]
        if ctx.has_input(k):
            ctx.same(ctx.inp(k, 1), hidden)
    for k in (5, 6):                       # gamma, beta [H]
        if ctx.has_input(k):
            ctx.same(ctx.inp(k, 0), hidden)
    ctx.mixing(hidden)
    if len(ctx.node.output) > 2 and ctx.node.output[2]:
        ctx.same(ctx.outp(2, 2), hidden)
    return None
