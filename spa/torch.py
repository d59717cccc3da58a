"""Apply an spa plan file to a PyTorch module: prune there, then train or fine-tune.

``apply_plan(module, "plan.json")`` slices the module's parameters and buffers as spa sliced
the ONNX model's initializers, adds OBSPA's value changes, and fixes the size attributes of
the modules it touched (``Conv*d``, ``Linear``, norms, ``Embedding``, the head counts of
Hugging Face attention), in place. Optional extra: needs torch, never imported by spa itself.

Tensors are found by name (the dynamo exporter keeps ``state_dict`` names), else by their
original values (the legacy exporter's ``onnx::Conv_12``). Where the exporter folded a
BatchNormalization into the convolution before it, the convolution keeps its name but not its
values, and the BatchNorm is not in the ONNX model at all: its channels follow the layer
before it, and value changes of the folded weight and bias are mapped back through it
exactly (``spa.torch_fold``; ``Applied.through_bn`` names the BatchNorm of each).

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
from .torch_sizes import check_chains, check_channels_agree, new_attributes

__all__ = ["apply_plan", "Applied"]

# relative agreement of a tensor's sum and norm with the plan's fingerprint
_MATCH_RTOL = 1e-5


@dataclass
class Applied:
    """What ``apply_plan`` did: plan tensor -> module tensor, how each was found."""

    by_name: dict = field(default_factory=dict)
    by_value: dict = field(default_factory=dict)
    # a node's bias -> the bias of the layer whose weight the node reads (the legacy exporter
    # merges equal tensors, such as the zero biases of several layers, into one)
    by_reader: dict = field(default_factory=dict)
    transposed: set = field(default_factory=set)     # plan tensors the exporter stored transposed
    folded: dict = field(default_factory=dict)       # name matched, values changed by the exporter
    # plan tensors with a BatchNorm folded in (weights, biases, added biases) -> that BatchNorm
    through_bn: dict = field(default_factory=dict)
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


def _match(module, doc, owned, updates: bool) -> tuple[dict, Applied, object]:
    """Plan tensor name -> module tensor name, and the plan's tensors with a BatchNorm folded in."""
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
    from .torch_fold import find_folded_biases, find_folded_weights
    folds = find_folded_weights(module, doc, applied, prints)
    _biases_by_reader(doc, owned, applied, prints)
    find_folded_biases(doc, applied, folds)
    if updates:
        lost = [n for n in applied.folded if doc["tensors"][n].get("delta") and n not in folds.weights]
        lost += [n for n in applied.exporter_only if doc["tensors"][n].get("delta")]
        if lost:
            from .loading.model import copied_from
            why = []
            if any(n in applied.folded for n in lost):
                why.append("BatchNorm folded into the convs by the exporter, whose BatchNorm spa did not find right "
                           "after the conv in the module with the values folded in: export with dynamo=True, "
                           "optimize=False")
            if not any("readers" in e for e in doc["tensors"].values()):
                why.append("a plan from an older spa, which does not say which node reads which tensor (how a "
                           "folded BatchNorm's bias is found): write it again")
            if any(copied_from(n) for n in lost):
                why.append("one module tensor read by several layers, which OBSPA changed differently for each "
                           "(no single value to write back)")
            if not why:
                why.append("constants the exporter made")
            raise SpaError(f"the plan changes values of {len(lost)} tensor(s) the module does not hold as "
                           f"exported ({', '.join(map(shown, lost[:3]))}{'...' if len(lost) > 3 else ''}): "
                           f"{'; '.join(why)}; "
                           f"or pass updates=False to apply the slicing alone")
    return {**applied.by_name, **applied.by_value, **applied.by_reader, **applied.folded}, applied, folds


def _readers(doc) -> dict:
    """Plan tensor -> [node, input index] of the nodes that read it in the pruned model: a node
    spa gave a bias of its own (an added tensor) reads its old one no more."""
    replaced = {node for e in doc["added"].values() for node, k in e["readers"] if k == 2}
    return {plan: [r for r in e.get("readers", []) if not (r[1] == 2 and r[0] in replaced)]
            for plan, e in doc["tensors"].items()}


def _biases_by_reader(doc, owned, applied, prints):
    """A plan tensor that nodes of the original read as their bias (input 2) belongs to the layers
    whose weights those nodes read (input 1). The legacy exporter merges equal tensors (the zero
    biases of fresh layers) under the name of one of them, so the readers tell: a tensor one
    node reads is that layer's bias where it holds its values (spa gave each reader its copy,
    OBSPA changed each for its layer); one found by name or value whose readers' layers are all
    known, and are several or do not hold it, is let go (each bias follows its own layer; a
    change of it has no one module tensor to go to and is refused)."""
    tensors = doc["tensors"]
    weight_of = {node: plan for plan, e in tensors.items() for node, k in e.get("readers", ()) if k == 1}
    found = {**applied.by_name, **applied.by_value}

    def layer_bias(node):
        weight = found.get(weight_of.get(node), "")
        return weight[:-len("weight")] + "bias" if weight.endswith("weight") else None
    moves, strays = {}, []
    for plan, entry in tensors.items():
        readers, fp = entry.get("readers", []), entry.get("fingerprint")
        if not readers or fp is None or any(k != 2 for _, k in readers):
            continue
        biases = {layer_bias(node) for node, _ in readers}
        if plan in found and None not in biases and (found[plan] not in biases or len(biases) > 1):
            strays.append(plan)
        bias = biases.pop() if len(readers) == 1 else None
        if bias in owned and found.get(plan) != bias and list(owned[bias][2].shape) == entry["shape"] and \
                _close(fp, prints[bias][0]):
            moves[plan] = bias
    held = {t for p, t in found.items() if p not in moves and p not in strays}
    targets = list(moves.values())
    for plan in strays:
        applied.by_name.pop(plan, None)
        applied.by_value.pop(plan, None)
        applied.exporter_only.append(plan)
    for plan, bias in moves.items():
        if bias not in held and targets.count(bias) == 1:      # else: left as it was found
            applied.by_name.pop(plan, None)
            applied.by_value.pop(plan, None)
            if plan in applied.exporter_only:
                applied.exporter_only.remove(plan)
            applied.by_reader[plan] = bias


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

    A BatchNorm the exporter folded into the conv before it (both exporters' defaults in eval
    mode) takes that conv's channels, and OBSPA's changes of the folded weight and bias are
    mapped back through it exactly (``spa.torch_fold``); ``Applied.through_bn`` names the
    BatchNorm of each such plan tensor. A change that cannot be (a filter whose BatchNorm
    scale γ is 0; a module whose BatchNorm is not the one folded in) is refused.

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
    mapping, applied, folds = _match(module, doc, owned, updates)
    out_kept = _slice(doc, arrays, mapping, owned, applied, updates, staged, folds)
    _follow_previous_layer(module, mapping.values(), out_kept, owned, applied, staged)
    if updates:
        _shift_folded_biases(doc, arrays, applied, folds, staged)
        _add_biases(doc, arrays, mapping, owned, applied, folds, staged)
    check_channels_agree(module, staged)
    new_attributes(module, doc, mapping, applied, staged)     # refuses modules that cannot be fixed
    check_chains(module, staged)
    unexplained = [n for n in applied.exporter_only if not _explained(doc["tensors"][n], out_kept, updates)
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


def _slice(doc, arrays, mapping, owned, applied, updates, staged, folds) -> dict:
    """Every matched tensor's new values: its kept slice, plus OBSPA's change (through the
    BatchNorm folded into it). Returns id(module) -> (its original out width, kept indices),
    for the layers that follow it."""
    out_kept: dict = {}
    for plan_name, torch_name in mapping.items():
        entry = doc["tensors"][plan_name]
        owner, attr, t = owned[torch_name]
        flip = plan_name in applied.transposed
        values = _numpy(t)
        values = values.T if flip else values
        for axis, kept in sorted(entry["kept"].items(), key=lambda kv: int(kv[0])):
            values = np.take(values, np.asarray(kept, dtype=np.int64), axis=int(axis))
        delta = arrays[entry["delta"]] if updates and entry.get("delta") else None
        if delta is not None and plan_name in folds.weights:
            from .torch_fold import plan_axis, weight_change
            fold = folds.weights[plan_name]
            delta = weight_change(fold, plan_name, entry, delta, plan_axis(fold, plan_name, applied))
        if delta is not None and (plan_name not in applied.folded or plan_name in folds.weights):
            values = _plus(values, delta, t, f"plan tensor {shown(plan_name)}")
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


def _explained(entry, out_kept, updates: bool) -> bool:
    """A 1-D tensor sliced like a layer's output (a BatchNorm folded into the bias), unchanged
    or with its change not applied."""
    kept = entry["kept"].get("0")
    return len(entry["shape"]) == 1 and kept is not None and not (updates and "delta" in entry) and any(
        n == entry["shape"][0] and np.array_equal(k, kept) for n, k in out_kept.values())


def _follow_previous_layer(module, matched, out_kept, owned, applied, staged):
    """Tensors the exporter dropped follow the layer they belong to: a bias it removed
    because it was zero follows its layer's weight; a BatchNorm it folded away keeps the
    channels of the layer registered before it (torchvision's conv, bn pairs), when its
    width is that layer's and no other layer is registered between them."""
    import torch.nn as nn
    from .torch_fold import norms_after_layers
    matched = set(matched)
    for mname, m in module.named_modules():
        if id(m) in out_kept:
            bias = f"{mname}.bias" if mname else "bias"
            width, kept = out_kept[id(m)]
            if bias in owned and bias not in matched and owned[bias][2].shape[0] == width:
                owner, attr, t = owned[bias]
                staged.put(owner, attr, np.take(_numpy(t), kept, axis=0), t, kept)
                applied.inferred[bias] = mname
    layers = (nn.modules.conv._ConvNd, nn.Linear)
    for mname, m, previous, layer in norms_after_layers(
            module, lambda m: id(m) in out_kept or isinstance(m, layers)):
        mine = [n for n in owned if n.rsplit(".", 1)[0] == mname and owned[n][0] is m]
        if id(layer) not in out_kept or any(n in matched for n in mine):
            continue
        width, kept = out_kept[id(layer)]
        if getattr(m, "num_features", None) != width:
            continue
        for n in mine:
            owner, attr, t = owned[n]
            if t.dim() >= 1 and t.shape[0] == width:
                staged.put(owner, attr, np.take(_numpy(t), kept, axis=0), t, kept)
                applied.inferred[n] = previous


def _shift_folded_biases(doc, arrays, applied, folds, staged):
    """The changes of folded biases go to their BatchNorms' shifts (sliced by now)."""
    from .torch_fold import plan_axis, shift_bias
    for bias, weight in folds.biases.items():
        entry = doc["tensors"][bias]
        if entry.get("delta"):
            fold = folds.weights[weight]
            shift_bias(fold, arrays[entry["delta"]], doc["tensors"][weight], plan_axis(fold, weight, applied),
                       staged, f"plan tensor {shown(bias)}")


def _add_biases(doc, arrays, mapping, owned, applied, folds, staged):
    """A bias OBSPA gave a node that had none as an initializer is the node's whole new bias. Its
    layer's bias becomes it (its width is checked with the layer's sizes, in _new_attributes):
    where the layer has none, has one the exporter dropped (zero), or has the one the node read
    otherwise (through an Identity); with a BatchNorm folded in, the BatchNorm's shift moves so
    that the folded bias is it."""
    from .torch_fold import plan_axis, set_bias
    node_weight = {name: (node.get("weights") or [None])[0] for name, node in doc["nodes"].items()}
    done = set()
    for name, entry in doc["added"].items():
        for node_name, k in entry["readers"]:
            w = node_weight.get(node_name)
            if k != 2 or w not in mapping:
                continue
            owner, attr, t = owned[mapping[w]]
            if attr != "weight" or not (getattr(owner, "bias", 0) is None or hasattr(owner.bias, "shape")):
                continue
            value, where = arrays[entry["value"]], f"added tensor {shown(name)}"
            was = [p for p, n in mapping.items() if n == mapping[w][:-len("weight")] + "bias"]
            if value.ndim != 1 or value.dtype.kind != "f" or id(owner) in done or any(
                    doc["tensors"][p].get("readers") != [[node_name, 2]] for p in was):
                raise PlanFileError(f"{where}: not one bias of node {shown(node_name)} "
                                    f"(shape {list(value.shape)}, {value.dtype})")
            done.add(id(owner))
            if w in folds.weights:
                fold = folds.weights[w]
                set_bias(fold, value, doc["tensors"][w], plan_axis(fold, w, applied), staged, where)
                applied.through_bn[name] = fold.bn
                continue
            _check_fits(value, t, where)
            staged.put(owner, "bias", value, t, staged.channels.get((id(owner), "bias")))
