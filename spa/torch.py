"""Apply an spa plan file to a PyTorch module: prune there, then train or fine-tune.

``apply_plan(module, "plan.json")`` slices the module's parameters and buffers as spa sliced
the ONNX model's initializers, adds OBSPA's value changes, and fixes the size attributes of
the modules it touched (``Conv*d``, ``Linear``, norms, ``Embedding``, the head counts of
Hugging Face attention), in place. Optional extra: needs torch, never imported by spa itself.

Tensors are found by name (the dynamo exporter keeps ``state_dict`` names), else by their
original values (the legacy exporter's ``onnx::Conv_12``). Where the exporter folded a
BatchNormalization into the convolution before it, the convolution keeps its name but not its
values, and the BatchNorm is not in the ONNX model at all: its channels follow the layer
before it (slicing is exact), but value changes cannot be mapped back; export with
``torch.onnx.export(..., dynamo=True, optimize=False)`` to keep every tensor as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import SpaError
from .plan_file import fingerprint, read_plan

__all__ = ["apply_plan", "Applied"]

# relative agreement of a tensor's sum and norm with the plan's fingerprint
_MATCH_RTOL = 1e-5


@dataclass
class Applied:
    """What ``apply_plan`` did: plan tensor -> module tensor, how each was found."""

    by_name: dict = field(default_factory=dict)
    by_value: dict = field(default_factory=dict)
    transposed: set = field(default_factory=set)     # plan tensors the exporter stored transposed
    folded: dict = field(default_factory=dict)       # name matched, values changed by the exporter
    inferred: dict = field(default_factory=dict)     # module tensor -> the layer its channels follow
    exporter_only: list = field(default_factory=list)  # plan tensors the module has no counterpart of
    modules: list = field(default_factory=list)      # modules whose attributes were fixed


class _Prints:
    """Fingerprints of the module's tensors, each computed once: (fingerprint, index-weighted
    sum of its transpose for a matrix, else None)."""

    def __init__(self, owned):
        self._owned, self._cache = owned, {}

    def __getitem__(self, name):
        if name not in self._cache:
            values = self._owned[name][2].detach().cpu().numpy()
            self._cache[name] = (fingerprint(values), fingerprint(values.T)[2] if values.ndim == 2 else None)
        return self._cache[name]


def _close(fp, got) -> bool:
    """Sum and norm agree (orientation aside)."""
    return all(abs(a - b) <= _MATCH_RTOL * max(abs(b), fp[1] * 1e-3, 1e-12) for a, b in zip(got[:2], fp[:2]))


def _stored_transposed(fp, prints) -> bool:
    """A matrix the exporter stored transposed: the index-weighted sum fits the transpose."""
    got, transposed = prints
    return transposed is not None and abs(transposed - fp[2]) < abs(got[2] - fp[2])


def _tensors(module):
    """Every parameter and buffer: qualified name -> (owner module, attribute, tensor)."""
    out = {}
    for mname, m in module.named_modules():
        for attr, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None:
                out.setdefault(f"{mname}.{attr}" if mname else attr, (m, attr, t))
    return out


def _match(doc, owned, updates: bool) -> tuple[dict, Applied]:
    """Plan tensor name -> module tensor name."""
    applied = Applied()
    prints = _Prints(owned)
    taken: set[str] = set()
    pending = []
    for name, entry in doc["tensors"].items():
        if "value" in entry:            # an integer size constant: the module computes its own
            continue
        t = owned.get(name)
        if t is not None and list(t[2].shape) == entry["shape"]:
            if "fingerprint" not in entry or _close(entry["fingerprint"], prints[name][0]):
                applied.by_name[name] = name
            else:
                applied.folded[name] = name
            taken.add(name)
        else:
            pending.append(name)
    for name in pending:
        entry = doc["tensors"][name]
        fp = entry.get("fingerprint")
        # all-zero tensors (a fresh bias) are alike: their values identify nothing. A matrix
        # may be stored transposed (a Linear's weight before MatMul): sum and norm do not care
        hits = [] if fp is None or fp[1] == 0 else [
            n for n, (_, _, t) in owned.items()
            if n not in taken and (list(t.shape) == entry["shape"] or t.dim() == 2 and list(t.shape)[::-1] == entry[
                "shape"]) and _close(fp, prints[n][0])]
        if len(hits) == 1:
            applied.by_value[name] = hits[0]
            if _stored_transposed(fp, prints[hits[0]]):
                applied.transposed.add(name)
            taken.add(hits[0])
        else:
            applied.exporter_only.append(name)
    if updates:
        lost = [n for n in applied.folded if doc["tensors"][n].get("delta")]
        lost += [n for n in applied.exporter_only if doc["tensors"][n].get("delta")]
        if lost:
            from .model import copied_from
            why = []
            if any(n in applied.folded for n in lost):
                why.append("BatchNorm folded into the convs by the exporter: export with dynamo=True, optimize=False")
            if any(copied_from(n) for n in lost):
                why.append("one module tensor read by several layers, which OBSPA changed differently for each "
                           "(no single value to write back)")
            if not why:
                why.append("constants the exporter made")
            raise SpaError(f"the plan changes values of {len(lost)} tensor(s) the module does not hold as "
                           f"exported ({', '.join(lost[:3])}{'...' if len(lost) > 3 else ''}): {'; '.join(why)}; "
                           f"or pass updates=False to apply the slicing alone")
    return {**applied.by_name, **applied.by_value, **applied.folded}, applied


def _set(owner, attr, array, like):
    import torch
    new = torch.as_tensor(np.ascontiguousarray(array), dtype=like.dtype, device=like.device)
    if isinstance(like, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(new, requires_grad=like.requires_grad))
    else:
        owner._buffers[attr] = new


def apply_plan(module, plan, *, updates: bool = True, strict: bool = True) -> Applied:
    """Prune ``module`` in place as ``plan`` (an spa plan file or its dict) says.

    ``updates=False`` applies the slicing only (not OBSPA's compensation). With ``strict``,
    a plan tensor the module has no counterpart of (other than one the exporter made by
    folding a BatchNorm, whose channels are then followed) is an error naming it. On any
    error the module is left as it was."""
    doc, arrays = read_plan(plan)
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    try:
        return _apply(module, doc, arrays, updates, strict)
    except BaseException:
        for m, attrs, params, buffers in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._parameters, m._buffers = params, buffers
        raise


def _apply(module, doc, arrays, updates, strict) -> Applied:
    owned = _tensors(module)
    mapping, applied = _match(doc, owned, updates)
    out_kept: dict = {}                    # module -> (its original out width, kept indices)
    for plan_name, torch_name in mapping.items():
        entry = doc["tensors"][plan_name]
        owner, attr, t = owned[torch_name]
        flip = plan_name in applied.transposed
        values = t.detach().cpu().numpy()
        values = values.T if flip else values
        for axis, kept in sorted(entry["kept"].items(), key=lambda kv: int(kv[0])):
            values = np.take(values, np.asarray(kept, dtype=np.int64), axis=int(axis))
        if updates and entry.get("delta") and plan_name not in applied.folded:
            values = values + arrays[entry["delta"]].astype(values.dtype)
        _set(owner, attr, values.T if flip else values, t)
        kept_axes = {str(1 - int(a)) if flip else a: k for a, k in entry["kept"].items()}
        shape = entry["shape"][::-1] if flip else entry["shape"]
        out_axis = "1" if type(owner).__name__.startswith("ConvTranspose") and attr == "weight" else "0"
        if attr == "weight" and out_axis in kept_axes:
            out_kept[id(owner)] = (shape[int(out_axis)], np.asarray(kept_axes[out_axis]))
    _follow_previous_layer(module, mapping.values(), out_kept, owned, applied)
    if updates:
        _add_biases(module, doc, arrays, mapping, owned)
    _fix_attributes(module, doc, mapping, applied)     # refuses modules that cannot be fixed
    unexplained = [n for n in applied.exporter_only if not _explained(doc["tensors"][n], applied, out_kept)
                   and not _inert(doc["tensors"][n], updates)]
    if strict and unexplained:
        raise SpaError(f"{len(unexplained)} tensor(s) of the plan have no counterpart in the module: "
                       f"{', '.join(unexplained[:5])}{'...' if len(unexplained) > 5 else ''}")
    return applied


def _inert(entry, updates: bool) -> bool:
    """A plan tensor that slices nothing and, without updates, changes nothing either (a
    reader's copy of a LayerNorm bias whose only change is OBSPA's): it needs no counterpart."""
    return not entry["kept"] and not (updates and entry.get("delta"))


def _explained(entry, applied, out_kept) -> bool:
    """A 1-D tensor sliced like a layer's output (a BatchNorm folded into the bias)."""
    kept = entry["kept"].get("0")
    return len(entry["shape"]) == 1 and kept is not None and "delta" not in entry and any(
        n == entry["shape"][0] and np.array_equal(k, kept) for n, k in out_kept.values())


_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
          "InstanceNorm3d")


def _follow_previous_layer(module, matched, out_kept, owned, applied):
    """Tensors the exporter dropped follow the layer they belong to: a bias it removed
    because it was zero follows its layer's weight; a BatchNorm it folded away keeps the
    channels of the layer registered before it (torchvision's conv, bn pairs), when its
    width is that layer's."""
    matched = set(matched)
    previous = None
    for mname, m in module.named_modules():
        if id(m) in out_kept:
            previous = (mname, m)
            bias = f"{mname}.bias" if mname else "bias"
            width, kept = out_kept[id(m)]
            if bias in owned and bias not in matched and owned[bias][2].shape[0] == width:
                owner, attr, t = owned[bias]
                _set(owner, attr, np.take(t.detach().cpu().numpy(), kept, axis=0), t)
                applied.inferred[bias] = mname
            continue
        if type(m).__name__ not in _NORMS or previous is None:
            continue
        mine = [n for n in owned if n.rsplit(".", 1)[0] == mname and owned[n][0] is m]
        if any(n in matched for n in mine):
            continue
        width, kept = out_kept[id(previous[1])]
        if getattr(m, "num_features", None) != width:
            continue
        for n in mine:
            owner, attr, t = owned[n]
            if t.dim() >= 1 and t.shape[0] == width:
                _set(owner, attr, np.take(t.detach().cpu().numpy(), kept, axis=0), t)
                applied.inferred[n] = previous[0]


def _add_biases(module, doc, arrays, mapping, owned):
    """A bias OBSPA added to a bias-free layer becomes that layer's bias."""
    import torch
    node_weight = {name: (node.get("weights") or [None])[0] for name, node in doc["nodes"].items()}
    for name, entry in doc["added"].items():
        for node_name, k in entry["readers"]:
            w = node_weight.get(node_name)
            if k != 2 or w not in mapping:
                continue
            owner, attr, t = owned[mapping[w]]
            if attr == "weight" and getattr(owner, "bias", 0) is None:
                owner.bias = torch.nn.Parameter(torch.as_tensor(arrays[entry["value"]], dtype=t.dtype,
                                                                device=t.device))


def _fix_attributes(module, doc, mapping, applied):
    import torch.nn as nn
    groups_of = {}
    for node in doc["nodes"].values():
        for key in ("group", "num_groups"):
            if key in node.get("attributes", {}) and node.get("weights"):
                groups_of[node["weights"][0]] = node["attributes"][key]
    torch_groups = {mapping[w]: g for w, g in groups_of.items() if w in mapping}
    head_dims = any(c["kind"] == "head-dims" and c["removed"] for p in doc.get("groups", []) for c in p)
    for mname, m in module.named_modules():
        before = _sizes(m)
        if isinstance(m, nn.modules.conv._ConvNd):
            key = f"{mname}.weight" if mname else "weight"
            m.groups = int(torch_groups.get(key, m.groups))
            if m.transposed:
                m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
            else:
                m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            key = f"{mname}.weight" if mname else "weight"
            m.num_channels, m.num_groups = m.weight.shape[0], int(torch_groups.get(key, m.num_groups))
        elif isinstance(m, nn.MultiheadAttention):
            if m.in_proj_weight is not None and m.in_proj_weight.shape != (3 * m.embed_dim, m.embed_dim) or \
                    m.out_proj.weight.shape != (m.embed_dim, m.embed_dim):
                raise SpaError(f"{mname or 'the module'}: torch.nn.MultiheadAttention ties its heads to the "
                               "model width, so heads cannot be removed from it; prune with --heads 0")
        else:
            _fix_attention(mname, m, head_dims)
        if _sizes(m) != before:
            applied.modules.append(mname)


def _sizes(m):
    return tuple(getattr(m, a, None) for a in ("in_channels", "out_channels", "groups", "in_features",
                                               "out_features", "num_features", "normalized_shape",
                                               "embedding_dim", "num_heads", "num_attention_heads",
                                               "num_key_value_heads", "head_dim", "attention_head_size"))


def _fix_attention(name, m, head_dims: bool):
    """Hugging Face attention: head counts from the projections' widths (BERT's query/key/
    value, LLaMA's q/k/v_proj). Their forward infers the heads (view(..., -1, head_dim)),
    so the counts they keep are bookkeeping, except the query/key-value head ratio."""
    q = getattr(m, "q_proj", None) or getattr(m, "query", None)
    k = getattr(m, "k_proj", None) or getattr(m, "key", None)
    head_attr = "head_dim" if hasattr(m, "head_dim") else "attention_head_size" if hasattr(
        m, "attention_head_size") else None
    if q is None or head_attr is None or not hasattr(q, "weight"):
        return
    d = getattr(m, head_attr)
    heads_attr = "num_attention_heads" if hasattr(m, "num_attention_heads") else "num_heads"
    heads = getattr(m, heads_attr, None) or (m.config.num_attention_heads if hasattr(m, "config") else None)
    q_out = q.weight.shape[0]
    if head_dims and heads:
        # fewer dims per head; the attention scale stays the original's, as in the ONNX model
        d = q_out // heads
        setattr(m, head_attr, d)
    heads = q_out // d
    if q_out % d:
        raise SpaError(f"{name}: {q_out} query features are not whole heads of {d}")
    if hasattr(m, heads_attr):
        setattr(m, heads_attr, heads)
    if hasattr(m, "all_head_size"):
        m.all_head_size = q_out
    if k is not None and hasattr(m, "num_key_value_groups"):
        kv = k.weight.shape[0] // d
        if kv == 0 or heads % kv:
            raise SpaError(f"{name}: {heads} query heads do not share {kv} key/value heads evenly")
        m.num_key_value_groups = heads // kv
        if hasattr(m, "num_key_value_heads"):
            m.num_key_value_heads = kv
