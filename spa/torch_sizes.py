"""The size attributes of the layers ``apply_plan`` pruned, from their new tensors' shapes, and
the checks that the new tensors of a layer, and the widths of consecutive layers, fit together.
Optional extra: needs torch, never imported by spa itself."""

from __future__ import annotations

import numpy as np

from .errors import PlanFileError, SpaError

__all__ = ["check_channels_agree", "check_chains", "new_attributes", "qualified"]


# tensors of one layer along its output channels: a conv's filters and bias, a norm's scale,
# shift and statistics
_CHANNEL_TENSORS = ("weight", "bias", "running_mean", "running_var")


def check_channels_agree(module, staged):
    """The tensors of one layer that share its output channels keep the same ones."""
    import torch.nn as nn
    layers = (nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.modules.conv._ConvNd)
    for mname, m in module.named_modules():
        if not isinstance(m, layers) or getattr(m, "transposed", False):    # a ConvTranspose's axis 0 is its input
            continue
        first = None
        for attr in _CHANNEL_TENSORS:
            kept = staged.channels.get((id(m), attr))
            if kept is None:
                continue
            if first is None:
                first = (attr, kept)
            elif not np.array_equal(first[1], kept):
                raise PlanFileError(f"{mname or 'the module'}: the plan keeps other output channels of its "
                                    f"{first[0]} than of its {attr}")


# the axis a layer reads and gives its width on: channels (axis 1, convs and their norms) or
# features (the last, Linear and LayerNorm); None: either (BatchNorm1d after a Linear reads
# its (N, C) output), it gives what it read
_CHANNELS, _FEATURES = "channels", "features"


def _ends(m, size):
    """(axis read, width read, axis given, width given) of a layer of a chain, its sizes read
    by ``size(m, attribute)``; "pass" for a module that keeps every width (activations,
    dropout), "pool" for one that keeps the channels only, None for one after which no width
    is known (anything else: a reshape, a block with its own forward)."""
    import torch.nn as nn
    if isinstance(m, nn.modules.conv._ConvNd):
        return _CHANNELS, size(m, "in_channels"), _CHANNELS, size(m, "out_channels")
    if isinstance(m, nn.Linear):
        return _FEATURES, size(m, "in_features"), _FEATURES, size(m, "out_features")
    if isinstance(m, nn.modules.batchnorm._NormBase):
        n = size(m, "num_features")
        return (None, n, None, n) if isinstance(m, nn.BatchNorm1d) else (_CHANNELS, n, _CHANNELS, n)
    if isinstance(m, nn.GroupNorm):
        return _CHANNELS, size(m, "num_channels"), _CHANNELS, size(m, "num_channels")
    if isinstance(m, nn.LayerNorm) and len(size(m, "normalized_shape")):
        return _FEATURES, size(m, "normalized_shape")[-1], _FEATURES, size(m, "normalized_shape")[-1]
    if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
        return None
    if isinstance(m, nn.Identity) or type(m).__module__ in ("torch.nn.modules.activation",
                                                            "torch.nn.modules.dropout"):
        return "pass"
    return "pool" if type(m).__module__ == "torch.nn.modules.pooling" else None


def check_chains(module, staged):
    """In an nn.Sequential each child reads what the one before it gives: there the module
    tells which widths must agree, and a layer left reading its old width after the layers
    before it lost channels (a plan lacking its entry) is refused before anything changes.
    Only widths that agreed before the plan are compared: two that are equal by chance on
    different axes (a Conv1d's channels, a Linear over its length) are not judged."""
    import torch.nn as nn
    new = {(id(m), a): v for m, a, v in staged.attributes}

    def after(m, attr):
        return new.get((id(m), attr), getattr(m, attr))
    for name, seq in module.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        last = None       # (axis, width before, width after, child name) the children so far give
        for child_name, child in seq.named_children():
            before = _ends(child, getattr)
            if before == "pass" or before == "pool" and last is not None and last[0] == _CHANNELS:
                continue
            if not isinstance(before, tuple):
                last = None
                continue
            now = _ends(child, after)
            if last is not None and before[0] in (None, last[0]) and before[1] == last[1] and now[1] != last[2]:
                raise PlanFileError(f"{qualified(name, child_name)}: it would read {now[1]} {last[0] or 'channels'}"
                                    f", but {qualified(name, last[3])} before it would give {last[2]}: the plan "
                                    "does not cut the layers of this nn.Sequential together (an entry missing?)")
            last = (before[2] or (last[0] if last else None), before[3], now[3], child_name)


def qualified(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def new_attributes(module, doc, mapping, applied, staged):
    """The size attributes of every module from its new tensors' shapes, into ``staged``;
    refuses a module whose new tensors do not fit together."""
    groups_of = {}
    for node in doc["nodes"].values():
        for key in ("group", "num_groups"):
            if key in node.get("attributes", {}) and node.get("weights"):
                groups_of[node["weights"][0]] = node["attributes"][key]
    torch_groups = {mapping[w]: int(g) for w, g in groups_of.items() if w in mapping}
    head_dims = any(c["kind"] == "head-dims" and c["removed"] for p in doc.get("groups", []) for c in p)
    for mname, m in module.named_modules():
        groups = torch_groups.get(f"{mname}.weight" if mname else "weight")
        sizes = _sizes_of(mname or "the module", m, groups, staged.shape, head_dims)
        changed = [(m, a, v) for a, v in sizes.items() if getattr(m, a, None) != v]
        staged.attributes += changed
        if any(a in _SIZES for _, a, _ in changed):
            applied.modules.append(mname)


_SIZES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
          "normalized_shape", "embedding_dim", "num_heads", "num_attention_heads", "num_key_value_heads",
          "head_dim", "attention_head_size")


def _sizes_of(name, m, groups, shape, head_dims: bool) -> dict:
    """The size attributes ``m`` will have; ``shape(m, attr)`` gives a tensor's new shape."""
    import torch.nn as nn
    if isinstance(m, nn.modules.conv._ConvNd):
        return _conv_sizes(name, m, m.groups if groups is None else groups, shape)
    if isinstance(m, nn.Linear):
        out, inp = shape(m, "weight")
        _fits(name, m, "bias", (out,), shape)
        return {"out_features": out, "in_features": inp}
    if isinstance(m, nn.Embedding):
        n, dim = shape(m, "weight")
        return {"num_embeddings": n, "embedding_dim": dim}
    if isinstance(m, nn.modules.batchnorm._NormBase):
        ref = shape(m, "weight") or shape(m, "running_mean")
        for attr in _CHANNEL_TENSORS:
            _fits(name, m, attr, ref, shape)
        return {"num_features": ref[0]} if ref else {}
    if isinstance(m, nn.LayerNorm) and shape(m, "weight") is not None:
        _fits(name, m, "bias", shape(m, "weight"), shape)
        return {"normalized_shape": shape(m, "weight")}
    if isinstance(m, nn.GroupNorm) and shape(m, "weight") is not None:
        channels, groups = shape(m, "weight")[0], m.num_groups if groups is None else groups
        _fits(name, m, "bias", (channels,), shape)
        if channels % groups:
            raise PlanFileError(f"{name}: {channels} channels do not split into {groups} groups")
        _groups_shrink(name, "", m.num_channels, m.num_groups, channels, groups)
        return {"num_channels": channels, "num_groups": groups}
    if isinstance(m, nn.MultiheadAttention):
        if m.in_proj_weight is not None and shape(m, "in_proj_weight") != (3 * m.embed_dim, m.embed_dim) or \
                shape(m.out_proj, "weight") != (m.embed_dim, m.embed_dim):
            raise SpaError(f"{name}: torch.nn.MultiheadAttention ties its heads to the "
                           "model width, so heads cannot be removed from it; prune with --heads 0")
        return {}
    return _attention_sizes(name, m, head_dims, shape)


def _fits(name, m, attr, want, shape):
    got = shape(m, attr)
    if got is not None and got != tuple(want):
        raise PlanFileError(f"{name}: its {attr} would have shape {list(got)}, its layer needs {list(want)}")


def _groups_shrink(name, what: str, width: int, groups: int, new_width: int, new_groups: int):
    """Pruning removes whole groups or channels from each, never adds either: a plan that
    raises a group count (group=2 on a conv of one group) would make the layer read another
    width than the layer before it gives, though every count divides."""
    if new_groups > groups or new_width * groups > width * new_groups:
        raise PlanFileError(f"{name}: the plan gives it {new_groups} group(s) of {new_width // new_groups} "
                            f"{what + ' ' if what else ''}channels; it has {groups} of {width // groups}, and "
                            "pruning never adds groups or channels to a group")


def _conv_sizes(name, m, groups: int, shape) -> dict:
    w = shape(m, "weight")
    # ConvTranspose's weight is (in, out / groups, ...), Conv's (out, in / groups, ...)
    sizes = {"in_channels": w[0], "out_channels": w[1] * groups} if m.transposed else \
        {"out_channels": w[0], "in_channels": w[1] * groups}
    if w[0] % groups:
        raise PlanFileError(f"{name}: {w[0]} {'input' if m.transposed else 'output'} channels do not split "
                            f"into {groups} groups")
    _groups_shrink(name, "input" if m.transposed else "output", m.weight.shape[0], m.groups, w[0], groups)
    _fits(name, m, "bias", (sizes["out_channels"],), shape)
    return {**sizes, "groups": groups}


def _attention_sizes(name, m, head_dims: bool, shape) -> dict:
    """Hugging Face attention: head counts from the projections' widths (BERT's query/key/
    value, LLaMA's q/k/v_proj). Their forward infers the heads (view(..., -1, head_dim)),
    so the counts they keep are bookkeeping, except the query/key-value head ratio."""
    q = getattr(m, "q_proj", None) or getattr(m, "query", None)
    k = getattr(m, "k_proj", None) or getattr(m, "key", None)
    head_attr = "head_dim" if hasattr(m, "head_dim") else "attention_head_size" if hasattr(
        m, "attention_head_size") else None
    if q is None or head_attr is None or not hasattr(q, "weight"):
        return {}
    out = {}
    d = getattr(m, head_attr)
    heads_attr = "num_attention_heads" if hasattr(m, "num_attention_heads") else "num_heads"
    heads = getattr(m, heads_attr, None) or (m.config.num_attention_heads if hasattr(m, "config") else None)
    q_out = shape(q, "weight")[0]
    if head_dims and heads:
        # fewer dims per head; the attention scale stays the original's, as in the ONNX model
        d = out[head_attr] = q_out // heads
    if not d or q_out % d:
        raise PlanFileError(f"{name}: {q_out} query features are not whole heads of {d}")
    heads = q_out // d
    if hasattr(m, heads_attr):
        out[heads_attr] = heads
    if hasattr(m, "all_head_size"):
        out["all_head_size"] = q_out
    if k is not None and hasattr(m, "num_key_value_groups"):
        kv = shape(k, "weight")[0] // d
        if kv == 0 or heads % kv:
            raise PlanFileError(f"{name}: {heads} query heads do not share {kv} key/value heads evenly")
        out["num_key_value_groups"] = heads // kv
        if hasattr(m, "num_key_value_heads"):
            out["num_key_value_heads"] = kv
    return out
