"""Grouped-query attention and rotary embeddings as single ops: onnxruntime's
``GroupQueryAttention`` and ``RotaryEmbedding`` (com.microsoft), and the standard
``Attention`` and ``RotaryEmbedding`` of opset 23. All four have onnxruntime CPU kernels for
float32, so the oracle checks them.

Grouped-query attention lets ``group = q_heads / kv_heads`` consecutive query heads share one
key/value head. The unit that can go is a key/value head *with its group of query heads*: the
query width is q_heads x head_size with q_heads = kv_heads x group (row-major), the key/value
widths kv_heads x head_size. The group factor stays fixed, so the key/value heads carry (the
grouping the Unsqueeze/Expand/Reshape of an unfused export gives, whose repeat axis is fixed
too), and the head attributes (``num_heads``/``kv_num_heads``, ``q_num_heads``/``kv_num_heads``)
are rewritten as data. A past/present cache ([B, kv_heads, T, head_size]) shares the key/value
heads, so a cache that is a graph input or output pins them (the report says "graph input
..."), as every graph input and output keeps its shape.
"""

from __future__ import annotations

from ..context import NodeContext, Space
from .registry import rule


def _grouped_heads(ctx: NodeContext, n_q: int, n_kv: int) -> tuple[Space, Space]:
    """Virtual query heads = key/value heads x group (row-major) and key/value heads (the
    carrier: the group factor is fixed), both marked as MatMul batch axes, so that the
    dependency stage reads them as heads."""
    kv = ctx.virtual("kv_heads", n_kv)
    q = ctx.virtual("q_heads", n_q)
    group = ctx.virtual("group", n_q // n_kv)
    ctx.batch(kv)
    ctx.batch(q)
    ctx.fix(group, f"{ctx.op} {ctx.name!r}: the {n_q // n_kv} query heads that share one key/value head "
                   "go with it (grouped-query attention)")
    ctx.product(q, [kv, group])
    return q, kv


def _tie_cache(ctx: NodeContext, k: int, kv: Space, head: Space, output: bool = False):
    """A past/present cache [B, kv heads, T, head size] (input or output k)."""
    name = (ctx.node.output[k] if len(ctx.node.output) > k else "") if output else \
        (ctx.node.input[k] if ctx.has_input(k) else "")
    shape = ctx.shape(name) if name else None
    if not shape or len(shape) != 4:
        return
    ctx.same(ctx.space(name, 1), kv)
    ctx.same(ctx.space(name, 3), head)


def _tie_per_head(ctx: NodeContext, k: int, axis_from_end: int, q: Space, n_q: int, output: bool = False):
    """An attention bias/mask or scores tensor broadcast to [B, q heads, S, T]: its heads axis
    (``axis_from_end`` from the right) is the query heads when it is not broadcast."""
    name = (ctx.node.output[k] if len(ctx.node.output) > k else "") if output else \
        (ctx.node.input[k] if ctx.has_input(k) else "")
    shape = ctx.shape(name) if name else None
    if not shape or len(shape) < axis_from_end or n_q == 1:
        return
    axis = len(shape) - axis_from_end
    if shape[axis] == n_q:
        ctx.same(ctx.space(name, axis), q)


def _tie_batch_sequence(ctx: NodeContext, src: int, out: int = 0):
    for axis in (0, 1):
        ctx.same(ctx.inp(src, axis), ctx.outp(out, axis))


# ---- onnxruntime's GroupQueryAttention -------------------------------------------------------

# inputs: query 0, key 1, value 2, past_key 3, past_value 4, seqlens_k 5, total_sequence_length 6,
# cos_cache 7, sin_cache 8, position_ids 9, attention_bias 10, head_sink 11, k_scale 12,
# v_scale 13, q_norm_weight 14, k_norm_weight 15, query_seqlens 16;
# outputs: output 0, present_key 1, present_value 2, output_qk 3

@rule("com.microsoft.GroupQueryAttention")
def group_query_attention(ctx: NodeContext):
    """query [B, S, q_heads x head] (or packed [q | k | v] with key/value empty), key/value
    [B, L, kv_heads x head]; output [B, S, q_heads x head]. Whole key/value heads go with
    their group of query heads. The head size is one for query, key and value and sets the
    score scale; with ``do_rotary`` its dims also rotate in pairs: it never shrinks."""
    if ctx.has_input(12) or ctx.has_input(13) or ctx.attr("kv_cache_bit_width"):
        return f"GroupQueryAttention {ctx.name!r}: quantized key/value cache (k_scale/v_scale)"
    n, n_kv = int(ctx.attr("num_heads", 0)), int(ctx.attr("kv_num_heads", 0))
    x = ctx.in_shape(0)
    if n <= 0 or n_kv <= 0 or n % n_kv:
        return f"GroupQueryAttention {ctx.name!r}: num_heads={n} is not a multiple of kv_num_heads={n_kv}"
    if len(x) != 3 or len(ctx.out_shape(0)) != 3:
        return f"GroupQueryAttention {ctx.name!r}: query/output are not [batch, sequence, hidden]"
    packed = not ctx.has_input(1)
    if packed != (not ctx.has_input(2)):
        return f"GroupQueryAttention {ctx.name!r}: key given without value (or value without key)"
    per_token = n + 2 * n_kv if packed else n
    head = x[2] // per_token
    widths = {"q": n * head, "k": n_kv * head, "v": n_kv * head}
    if x[2] != per_token * head or (not packed and any(
            len(ctx.in_shape(k)) != 3 or ctx.in_shape(k)[2] != widths["k"] for k in (1, 2))):
        return (f"GroupQueryAttention {ctx.name!r}: widths are not num_heads={n} / kv_num_heads={n_kv} "
                "heads of one head size")
    q, kv = _grouped_heads(ctx, n, n_kv)
    size = ctx.virtual("head_size", head)
    rotary = " and rotates pairs of its dims (do_rotary)" if ctx.attr("do_rotary", 0) else ""
    ctx.fix(size, f"GroupQueryAttention {ctx.name!r}: query, key and value share one head size, which sets "
                  f"the score scale{rotary}")
    if packed:
        cols = {label: ctx.virtual(f"{label}_hidden", w) for label, w in widths.items()}
        start = 0
        for label in "qkv":
            ctx.offset(cols[label], ctx.inp(0, 2), start)
            start += widths[label]
    else:
        cols = {label: ctx.inp(k, 2) for k, label in enumerate("qkv")}
        for k in (1, 2):
            ctx.same(ctx.inp(k, 0), ctx.inp(0, 0))
        ctx.same(ctx.inp(2, 1), ctx.inp(1, 1))
    ctx.product(cols["v"], [kv, size])
    ctx.product(cols["k"], [kv, size])
    ctx.product(cols["q"], [q, size])
    ctx.same(ctx.outp(0, 2), cols["q"])
    _tie_batch_sequence(ctx, 0)
    for k in (3, 4):                                   # past_key, past_value [B, kv, P, head]
        _tie_cache(ctx, k, kv, size)
    for k in (1, 2):                                   # present_key, present_value
        _tie_cache(ctx, k, kv, size, output=True)
    _tie_per_head(ctx, 10, 3, q, n)                    # attention_bias [B|1, heads|1, S, T]
    _tie_per_head(ctx, 3, 3, q, n, output=True)        # output_qk [B, heads, S, T]
    if ctx.has_input(11):                              # head_sink [heads]
        ctx.same(ctx.inp(11, 0), q)
    for k in (14, 15):                                 # q_norm_weight, k_norm_weight [head]
        if ctx.has_input(k):
            ctx.same(ctx.inp(k, 0), size)
    ctx.sizes(("attr", "num_heads"), [n], {0: q}, scalar=True)
    ctx.sizes(("attr", "kv_num_heads"), [n_kv], {0: kv}, scalar=True)
    return None


# ---- the standard Attention (opset 23) -------------------------------------------------------

@rule("Attention")
def attention(ctx: NodeContext):
    """Q [B, q_heads, S, head], K [B, kv_heads, L, head], V [B, kv_heads, L, v_head] (4-D), or
    3-D [B, S, heads x size] with ``q_num_heads``/``kv_num_heads``; output Y like Q with the
    value head size. Query heads come in groups of q_heads / kv_heads per key/value head. The
    query/key head size sets the default scale and stays; the value head size may shrink
    (``head_dims``), the same dims in every head."""
    q, k, v, y = ctx.in_shape(0), ctx.in_shape(1), ctx.in_shape(2), ctx.out_shape(0)
    if not len(q) == len(k) == len(v) == len(y) or len(q) not in (3, 4):
        return f"Attention {ctx.name!r}: Q, K, V and Y are not all 3-D or all 4-D"
    if len(q) == 4:
        n, n_kv, head, v_head = q[1], k[1], q[3], v[3]
        if v[1] != n_kv or k[3] != head:
            return f"Attention {ctx.name!r}: K and V disagree on heads or Q and K on head size"
    else:
        n, n_kv = int(ctx.attr("q_num_heads", 0)), int(ctx.attr("kv_num_heads", 0))
        if n <= 0 or n_kv <= 0 or q[2] % n or k[2] % n_kv or v[2] % n_kv:
            return f"Attention {ctx.name!r}: 3-D widths are not q_num_heads={n} / kv_num_heads={n_kv} heads"
        head, v_head = q[2] // n, v[2] // n_kv
        if k[2] != n_kv * head:
            return f"Attention {ctx.name!r}: Q and K disagree on the head size"
    if n % n_kv:
        return f"Attention {ctx.name!r}: {n} query heads do not share {n_kv} key/value heads evenly"
    qh, kv = _grouped_heads(ctx, n, n_kv)
    # the value head size first: with attention="head-dims" it carries and the heads stay whole
    vsize = ctx.virtual("v_head_size", v_head)
    size = ctx.virtual("head_size", head)
    ctx.fix(size, f"Attention {ctx.name!r} scales scores by its query/key head size")
    if len(q) == 4:
        ctx.same(ctx.inp(0, 1), qh)
        ctx.same(ctx.outp(0, 1), qh)
        for i in (1, 2):
            ctx.same(ctx.inp(i, 1), kv)
        ctx.same(ctx.inp(2, 3), vsize)
        ctx.same(ctx.outp(0, 3), vsize)
        ctx.same(ctx.inp(0, 3), size)
        ctx.same(ctx.inp(1, 3), size)
        for axis in (0, 2):
            ctx.same(ctx.inp(0, axis), ctx.outp(0, axis))
    else:
        ctx.product(ctx.inp(2, 2), [kv, vsize])
        ctx.product(ctx.outp(0, 2), [qh, vsize])
        ctx.product(ctx.inp(1, 2), [kv, size])
        ctx.product(ctx.inp(0, 2), [qh, size])
        _tie_batch_sequence(ctx, 0)
        ctx.sizes(("attr", "q_num_heads"), [n], {0: qh}, scalar=True)
        ctx.sizes(("attr", "kv_num_heads"), [n_kv], {0: kv}, scalar=True)
    _tie_cache(ctx, 4, kv, size)                       # past_key [B, kv, P, head]
    _tie_cache(ctx, 5, kv, vsize)                      # past_value [B, kv, P, v_head]
    _tie_cache(ctx, 1, kv, size, output=True)          # present_key
    _tie_cache(ctx, 2, kv, vsize, output=True)         # present_value
    _tie_per_head(ctx, 3, 3, qh, n)                    # attn_mask, broadcast to [B, heads, S, T]
    _tie_per_head(ctx, 3, 3, qh, n, output=True)       # qk_matmul_output [B, heads, S, T]
    return None


# ---- rotary embeddings -------------------------------------------------------------------------

def _rotary(ctx: NodeContext, cos_input: int):
    """X [B, S, heads x head] (with ``num_heads``) or [B, heads, S, head]: heads pass through;
    the head dims rotate in pairs tied to the cos/sin cache's rotary dims and never shrink."""
    x, cos = ctx.in_shape(0), ctx.in_shape(cos_input)
    reason = (f"{ctx.op} {ctx.name!r} rotates pairs of head dims (tied to its cos/sin cache of "
              f"{cos[-1] if cos else '?'} entries per position)")
    if len(x) == 4:
        for axis in range(4):
            ctx.same(ctx.inp(0, axis), ctx.outp(0, axis))
        ctx.fix(ctx.inp(0, 3), reason)
        return None
    if len(x) != 3 or not cos:
        return f"{ctx.op} {ctx.name!r}: input is neither [batch, sequence, hidden] nor 4-D"
    n, rotary_dim = int(ctx.attr("num_heads", 0)), int(ctx.attr("rotary_embedding_dim", 0))
    if n <= 0:
        if rotary_dim:
            return f"{ctx.op} {ctx.name!r}: rotary_embedding_dim without num_heads"
        n = x[2] // (2 * cos[-1]) if cos[-1] else 0    # onnxruntime: head size = 2 x cache width
    if n <= 0 or x[2] % n:
        return f"{ctx.op} {ctx.name!r}: hidden width {x[2]} is not num_heads={n} heads"
    heads = ctx.virtual("heads", n)
    ctx.batch(heads)
    size = ctx.virtual("head_size", x[2] // n)
    ctx.fix(size, reason)
    ctx.product(ctx.inp(0, 2), [heads, size])
    for axis in range(3):
        ctx.same(ctx.inp(0, axis), ctx.outp(0, axis))
    if ctx.attr("num_heads", 0):
        ctx.sizes(("attr", "num_heads"), [n], {0: heads}, scalar=True)
    return None


@rule("com.microsoft.RotaryEmbedding")
def ms_rotary_embedding(ctx: NodeContext):
    """input, position_ids, cos_cache, sin_cache."""
    if ctx.attr("is_packed_batching", 0):
        return f"RotaryEmbedding {ctx.name!r}: packed (ragged) batching"
    return _rotary(ctx, 2)


@rule("RotaryEmbedding")
def rotary_embedding(ctx: NodeContext):
    """Opset 23: X, cos_cache, sin_cache, position_ids."""
    return _rotary(ctx, 1)
