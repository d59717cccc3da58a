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

Nothing is assigned before the whole plan has been checked (``spa.plan.plan_check``: types,
indices, value changes, ties) and every new tensor and size computed and checked against the
module (values finite in its dtype, group counts, the widths of an ``nn.Sequential``'s
consecutive layers): a plan that does not fit raises :class:`~spa.errors.PlanFileError` and
leaves the module as it was. The plan's size is bounded by the module's (see :func:`_limits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import PlanFileError, SpaError
from .plan.plan_check import Limits, shown
from .plan.plan_file import fingerprint, read_plan

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
    # Hugging Face configs: module name -> {field: new value} written into its config
    config: dict = field(default_factory=dict)
    # why a Hugging Face config was left as it was (pruning it cannot express); also warned
    config_notes: list = field(default_factory=list)


class _Prints:
    """Fingerprints of the module's tensors, each computed once: (fingerprint, index-weighted
    sum of its transpose for a matrix, else None)."""

    def __init__(self, owned):
        self._owned, self._cache = owned, {}

    def __getitem__(self, name):
        if name not in self._cache:
            values = _numpy(self._owned[name][2])
            self._cache[name] = (fingerprint(values), fingerprint(values.T)[2] if values.ndim == 2 else None)
        return self._cache[name]


def _close(fp, got) -> bool:
    """Sum and norm agree (orientation aside)."""
    return all(abs(a - b) <= _MATCH_RTOL * max(abs(b), fp[1] * 1e-3, 1e-12) for a, b in zip(got[:2], fp[:2]))


def _stored_transposed(fp, prints) -> bool:
    """A matrix the exporter stored transposed: the index-weighted sum fits the transpose."""
    got, transposed = prints
    return transposed is not None and abs(transposed - fp[2]) < abs(got[2] - fp[2])


def _numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()      # numpy has no bfloat16


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
            # a reversed shape is a transposed matrix whatever the sums say
            if list(owned[hits[0]][2].shape) != entry["shape"] or _stored_transposed(fp, prints[hits[0]]):
                applied.transposed.add(name)
            taken.add(hits[0])
        else:
            applied.exporter_only.append(name)
    if updates:
        lost = [n for n in applied.folded if doc["tensors"][n].get("delta")]
        lost += [n for n in applied.exporter_only if doc["tensors"][n].get("delta")]
        if lost:
            from .loading.model import copied_from
            why = []
            if any(n in applied.folded for n in lost):
                why.append("BatchNorm folded into the convs by the exporter: export with dynamo=True, optimize=False")
            if any(copied_from(n) for n in lost):
                why.append("one module tensor read by several layers, which OBSPA changed differently for each "
                           "(no single value to write back)")
            if not why:
                why.append("constants the exporter made")
            raise SpaError(f"the plan changes values of {len(lost)} tensor(s) the module does not hold as "
                           f"exported ({', '.join(map(shown, lost[:3]))}{'...' if len(lost) > 3 else ''}): "
                           f"{'; '.join(why)}; "
                           f"or pass updates=False to apply the slicing alone")
    return {**applied.by_name, **applied.by_value, **applied.folded}, applied


class _Staged:
    """The new tensors and sizes of the module, computed in full before the first is assigned."""

    def __init__(self):
        self.tensors: dict = {}       # (id(owner), attribute) -> (owner, attribute, new tensor)
        self.channels: dict = {}      # (id(owner), attribute) -> kept indices of its axis 0
        self.attributes: list = []    # (module, attribute, new value)

    def put(self, owner, attr, array, like, channels=None):
        import torch
        new = torch.as_tensor(np.ascontiguousarray(array), dtype=like.dtype, device=like.device)
        if isinstance(like, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=like.requires_grad)
        self.tensors[(id(owner), attr)] = (owner, attr, new)
        if channels is not None:
            self.channels[(id(owner), attr)] = np.asarray(channels)

    def shape(self, owner, attr) -> tuple | None:
        """The shape ``owner.attr`` will have (None: it has no such tensor)."""
        if (id(owner), attr) in self.tensors:
            return tuple(self.tensors[(id(owner), attr)][2].shape)
        t = getattr(owner, attr, None)
        return tuple(t.shape) if hasattr(t, "shape") else None

    def commit(self, module):
        """Assign everything. Nothing here checks or raises by design; the snapshot only covers
        an interrupt (or a module's own __setattr__) between two assignments."""
        import torch
        saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in module.modules()]
        try:
            for owner, attr, new in self.tensors.values():
                if isinstance(new, torch.nn.Parameter):
                    setattr(owner, attr, new)
                else:
                    owner._buffers[attr] = new
            for m, attr, value in self.attributes:
                setattr(m, attr, value)
        except BaseException:
            for m, attrs, params, buffers in saved:
                m.__dict__.clear()
                m.__dict__.update(attrs)
                m._parameters, m._buffers = params, buffers
            raise


def _limits(owned) -> Limits:
    """What a plan for this module can hold: indices (a kept list per axis of each tensor, a
    removed list per group) in proportion to the module's axis widths, arrays (value changes
    of kept slices, in the ONNX model's dtype: up to twice the module's bytes) to its bytes.
    The floors leave room for what the exporter adds, and keep a refusal cheap."""
    widths = sum(sum(t.shape) + 1 for _, _, t in owned.values())
    nbytes = sum(t.numel() * t.element_size() for _, _, t in owned.values())
    return Limits(json_bytes=(8 << 20) + 128 * widths, array_bytes=(1 << 20) + 4 * nbytes,
                  indices=(1 << 16) + 8 * widths)


def apply_plan(module, plan, *, updates: bool = True, strict: bool = True) -> Applied:
    """Prune ``module`` in place as ``plan`` (an spa plan file or its dict) says.

    ``updates=False`` applies the slicing only (not OBSPA's compensation). With ``strict``,
    a plan tensor the module has no counterpart of (other than one the exporter made by
    folding a BatchNorm, whose channels are then followed) is an error naming it. A plan that
    is malformed or does not fit the module raises :class:`~spa.errors.PlanFileError` (other
    refusals :class:`~spa.errors.SpaError`) before anything of the module changes.

    A Hugging Face model's ``config`` gets the new sizes (``intermediate_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) where every layer has the
    same, so ``save_pretrained`` / ``from_pretrained`` round-trip; where layers differ, or the
    model class cannot build the pruned shapes from its config, the config stays as it was
    and a warning (also ``Applied.config_notes``) says which fields differ."""
    owned = _tensors(module)
    doc, arrays = read_plan(plan, _limits(owned))
    staged = _Staged()
    applied = _stage(module, doc, arrays, owned, updates, strict, staged)
    from .hf_config import config_proposals, write_configs
    proposals = config_proposals(module, staged)
    staged.commit(module)
    write_configs(proposals, applied)
    return applied


def _stage(module, doc, arrays, owned, updates, strict, staged) -> Applied:
    mapping, applied = _match(doc, owned, updates)
    out_kept = _slice(doc, arrays, mapping, owned, applied, updates, staged)
    _follow_previous_layer(module, mapping.values(), out_kept, owned, applied, staged)
    if updates:
        _add_biases(doc, arrays, mapping, owned, staged)
    _check_channels_agree(module, staged)
    _new_attributes(module, doc, mapping, applied, staged)     # refuses modules that cannot be fixed
    _check_chains(module, staged)
    unexplained = [n for n in applied.exporter_only if not _explained(doc["tensors"][n], applied, out_kept)
                   and not _inert(doc["tensors"][n], updates)]
    if strict and unexplained:
        raise PlanFileError(f"{len(unexplained)} tensor(s) of the plan have no counterpart in the module: "
                            f"{', '.join(_unmatched(n, doc, owned) for n in unexplained[:5])}"
                            f"{'...' if len(unexplained) > 5 else ''}")
    return applied


def _unmatched(name, doc, owned) -> str:
    """A plan tensor without counterpart, with both shapes where the module has its name."""
    if name not in owned:
        return shown(name)
    return f"{shown(name)} (the plan's is {doc['tensors'][name]['shape']}, the module's {list(owned[name][2].shape)})"


def _slice(doc, arrays, mapping, owned, applied, updates, staged) -> dict:
    """Every matched tensor's new values: its kept slice, plus OBSPA's change. Returns
    id(module) -> (its original out width, kept indices), for the layers that follow it."""
    out_kept: dict = {}
    for plan_name, torch_name in mapping.items():
        entry = doc["tensors"][plan_name]
        owner, attr, t = owned[torch_name]
        flip = plan_name in applied.transposed
        values = _numpy(t)
        values = values.T if flip else values
        for axis, kept in sorted(entry["kept"].items(), key=lambda kv: int(kv[0])):
            values = np.take(values, np.asarray(kept, dtype=np.int64), axis=int(axis))
        if updates and entry.get("delta") and plan_name not in applied.folded:
            values = _plus(values, arrays[entry["delta"]], t, f"plan tensor {shown(plan_name)}")
        kept_axes = {str(1 - int(a)) if flip else a: k for a, k in entry["kept"].items()}
        staged.put(owner, attr, values.T if flip else values, t, kept_axes.get("0"))
        shape = entry["shape"][::-1] if flip else entry["shape"]
        out_axis = "1" if type(owner).__name__.startswith("ConvTranspose") and attr == "weight" else "0"
        if attr == "weight" and out_axis in kept_axes:
            out_kept[id(owner)] = (shape[int(out_axis)], np.asarray(kept_axes[out_axis]))
    return out_kept


def _plus(values, delta, like, where: str) -> np.ndarray:
    """``values + delta`` as the module will hold them. The plan's check finds a change finite
    in the change's own dtype: 1e300 is finite as float64 and infinite as the module's
    float32, so the sum is checked in the dtype it is applied in (no float64 copy of a
    large tensor: an overflow there is an infinity or past the module's largest value)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = values + delta.astype(values.dtype)
    _check_fits(out, like, where, np.isfinite(values), delta)     # a -inf mask value stays what it was
    return out


def _check_fits(values, like, where: str, judged=None, change=None):
    """``values`` stay finite as ``like``'s dtype (where ``judged``): a change past its range
    would make the module compute with infinities. ``change``: what to name as too large."""
    import torch
    if not like.is_floating_point():
        raise PlanFileError(f"{where}: the plan changes the values of a {like.dtype} tensor of the module; "
                            "spa changes floating-point values only")
    top = torch.finfo(like.dtype).max
    past = ~(np.abs(values) <= top)         # NaN and infinities too
    if judged is not None:
        past &= judged
    if past.any():
        size = float(np.abs(change if change is not None else values[past]).max())
        raise PlanFileError(f"{where}: the plan's values (up to {size:.3g}) take it past what the module's "
                            f"{like.dtype} holds ({top:.3g}): it would hold infinities")


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


def _follow_previous_layer(module, matched, out_kept, owned, applied, staged):
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
                staged.put(owner, attr, np.take(_numpy(t), kept, axis=0), t, kept)
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
                staged.put(owner, attr, np.take(_numpy(t), kept, axis=0), t, kept)
                applied.inferred[n] = previous[0]


def _add_biases(doc, arrays, mapping, owned, staged):
    """A bias OBSPA added to a bias-free layer becomes that layer's bias (its width is
    checked with the layer's sizes, in _new_attributes)."""
    node_weight = {name: (node.get("weights") or [None])[0] for name, node in doc["nodes"].items()}
    for name, entry in doc["added"].items():
        for node_name, k in entry["readers"]:
            w = node_weight.get(node_name)
            if k != 2 or w not in mapping:
                continue
            owner, attr, t = owned[mapping[w]]
            if attr == "weight" and getattr(owner, "bias", 0) is None:
                value = arrays[entry["value"]]
                if value.ndim != 1 or value.dtype.kind != "f" or (id(owner), "bias") in staged.tensors:
                    raise PlanFileError(f"added tensor {shown(name)}: not one bias of node {shown(node_name)} "
                                        f"(shape {list(value.shape)}, {value.dtype})")
                _check_fits(value, t, f"added tensor {shown(name)}")
                staged.put(owner, "bias", value, t)


# tensors of one layer along its output channels: a conv's filters and bias, a norm's scale,
# shift and statistics
_CHANNEL_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _check_channels_agree(module, staged):
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


def _check_chains(module, staged):
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
                raise PlanFileError(f"{_qualified(name, child_name)}: it would read {now[1]} {last[0] or 'channels'}"
                                    f", but {_qualified(name, last[3])} before it would give {last[2]}: the plan "
                                    "does not cut the layers of this nn.Sequential together (an entry missing?)")
            last = (before[2] or (last[0] if last else None), before[3], now[3], child_name)


def _qualified(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _new_attributes(module, doc, mapping, applied, staged):
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
