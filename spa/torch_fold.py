"""BatchNorm that the exporter folded into the layer before it, undone for the plan's value changes.

Both PyTorch exporters fold an eval-mode BatchNorm into the Conv (ConvTranspose, Gemm) before
it (the dynamo exporter's default ``optimize=True``, the legacy one's constant folding). The
ONNX model spa pruned holds ``W_f = W·s`` per output channel and ``b_f = (b − μ)·s + β``, with
``s = γ/σ`` and ``σ = sqrt(var + eps)``; the module holds W, b and the BatchNorm. Slicing maps
back as it is (the BatchNorm keeps its layer's channels); the plan's value changes map back
exactly too:

- ``ΔW_f`` → ``ΔW = ΔW_f·σ/γ`` per output channel. Where γ = 0 the channel's output is the
  constant β whatever its filter, so a change of that filter is refused (OBSPA makes none past
  float rounding: the folded filter is zero there, and so is its change);
- ``Δb_f`` → ``β += Δb_f``, no division. A bias spa added to a folded layer (the exporter
  dropped ``b_f``, all zero; or the node read it through an Identity) is the layer's whole new
  folded bias: ``β += added − b_f``. A BatchNorm without β (``affine=False``) takes the change
  in the layer's bias instead: ``b += Δb_f·σ``.

Which BatchNorm: the one registered right after the layer with no layer between (torchvision's
conv, bn pairs), taken only where the plan's fingerprint of the layer's weight is that of the
folded values, and closer to them than to the module's own. Which plan tensor is the folded
bias: the one the folded weight's node reads as its bias (the plan's ``readers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import PlanFileError, SpaError
from .plan.plan_check import shown
from .plan.plan_file import fingerprint
from .torch import _MATCH_RTOL, _numpy, _plus, _readers

__all__ = ["Fold", "Folds", "NORMS", "norms_after_layers", "find_folded_weights", "find_folded_biases", "plan_axis",
           "weight_change", "shift_bias", "set_bias"]

NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
         "InstanceNorm3d")
_BATCH_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


@dataclass
class Fold:
    """A layer and the BatchNorm the exporter folded into it."""

    layer: str              # module names
    bn: str
    layer_module: object
    bn_module: object
    axis: int               # the output-channel axis of the layer's weight, as the module holds it
    gamma: np.ndarray       # γ per output channel (ones without affine parameters), float64
    sigma: np.ndarray       # sqrt(var + eps) per output channel, float64

    @staticmethod
    def of(layer_name, layer, bn_name, bn) -> Fold | None:
        """The fold of ``bn`` into ``layer``, if an exporter can make one: a BatchNorm with
        running statistics after a Conv, a ConvTranspose of one group or a Linear of its width."""
        import torch.nn as nn
        if type(bn).__name__ not in _BATCH_NORMS or bn.running_var is None or bn.running_mean is None:
            return None
        if isinstance(layer, nn.modules.conv._ConvNd):
            if layer.transposed and layer.groups != 1:
                return None
            axis = 1 if layer.transposed else 0
        elif isinstance(layer, nn.Linear):
            axis = 0
        else:
            return None
        if layer.weight.shape[axis] != bn.num_features:
            return None
        var = _numpy(bn.running_var).astype(np.float64)
        gamma = _numpy(bn.weight).astype(np.float64) if bn.weight is not None else np.ones_like(var)
        return Fold(layer_name, bn_name, layer, bn, axis, gamma, np.sqrt(var + bn.eps))

    def _along(self, v, ndim: int, axis: int) -> np.ndarray:
        shape = [1] * ndim
        shape[axis] = -1
        return v.reshape(shape)

    def folded_weight(self) -> np.ndarray:
        """As the exporters compute it: in the weight's dtype (float32), whose rounding the sum
        of a depthwise filter bank, near zero against its norm, would not match from float64."""
        bn, w = self.bn_module, _numpy(self.layer_module.weight)
        var = _numpy(bn.running_var).astype(w.dtype)
        gamma = _numpy(bn.weight).astype(w.dtype) if bn.weight is not None else np.ones_like(var)
        return w * self._along(gamma / np.sqrt(var + w.dtype.type(bn.eps)), w.ndim, self.axis)

    def folded_bias(self) -> np.ndarray:
        bn, layer = self.bn_module, self.layer_module
        b = _numpy(layer.bias).astype(np.float64) if layer.bias is not None else 0.0
        beta = _numpy(bn.bias).astype(np.float64) if bn.bias is not None else 0.0
        return (b - _numpy(bn.running_mean).astype(np.float64)) * self.gamma / self.sigma + beta


@dataclass
class Folds:
    """The folded tensors of a plan: weight -> its Fold, bias -> the plan name of its weight."""

    weights: dict = field(default_factory=dict)
    biases: dict = field(default_factory=dict)


def norms_after_layers(module, is_layer) -> list[tuple]:
    """(norm name, norm, layer name, layer): each normalization module with the layer
    registered last before it (``is_layer``), no other layer between: torchvision's conv, bn."""
    out, previous = [], None
    for mname, m in module.named_modules():
        if is_layer(m):
            previous = (mname, m)
        elif type(m).__name__ in NORMS and previous is not None:
            out.append((mname, m, *previous))
    return out


def _distance(fp, got, size: int) -> float:
    """How far a tensor's sum and norm are from a fingerprint's, relative (as ``_close``), for
    values an exporter computed in float32 its own way: one rounding apart per element (the
    legacy exporter's torch arithmetic and ours differ so in a sixth of a depthwise bank's
    values), the sum of ``size`` of them moves by at most norm·sqrt(size)·2⁻²³."""
    floor = fp[1] * np.sqrt(size) * 2.0 ** -22 / _MATCH_RTOL
    return max(abs(a - b) / max(abs(b), fp[1] * 1e-3, floor, 1e-12) for a, b in zip(got[:2], fp[:2]))


def _weight_name(layer_name: str) -> str:
    return f"{layer_name}.weight" if layer_name else "weight"


def find_folded_weights(module, doc, applied, prints) -> Folds:
    """The plan's tensors that are a layer's weight with its BatchNorm folded in: matched to the
    layer's weight (found by name, or by their folded values, in ``applied.by_value``) and in
    ``applied.through_bn``. Their biases: :func:`find_folded_biases`."""
    import torch.nn as nn
    tensors = doc["tensors"]
    matched = {**applied.by_name, **applied.by_value, **applied.by_reader, **applied.folded}
    held = set(matched.values())
    candidates: dict = {}     # module weight name -> Fold
    for bn_name, bn, layer_name, layer in norms_after_layers(
            module, lambda m: isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))):
        own = {f"{bn_name}.{a}" for a in ("weight", "bias", "running_mean", "running_var")}
        fold = None if own & held else Fold.of(layer_name, layer, bn_name, bn)     # in the ONNX model: not folded
        if fold is not None:
            candidates.setdefault(_weight_name(layer_name), fold)
    if not candidates:
        return Folds()
    folded_prints: dict = {}

    def folded_print(name):
        if name not in folded_prints:
            folded_prints[name] = fingerprint(candidates[name].folded_weight())
        return folded_prints[name]
    folds = Folds()
    for plan, torch_name in matched.items():
        fp = tensors[plan].get("fingerprint")
        if torch_name in candidates and fp is not None:
            # a BatchNorm of γ ≈ σ folds into values within the match's tolerance of the layer's
            # own: the closer of the two tells
            size = int(np.prod(tensors[plan]["shape"]))
            near = _distance(fp, folded_print(torch_name), size)
            if near <= _MATCH_RTOL and near < _distance(fp, prints[torch_name][0], size):
                folds.weights[plan] = candidates[torch_name]
    for plan in list(applied.exporter_only):        # the legacy exporter names them onnx::Conv_12
        fp, shape = tensors[plan].get("fingerprint"), tensors[plan]["shape"]
        if fp is None or fp[1] == 0:
            continue
        hits = [w for w, f in candidates.items() if w not in held and list(f.layer_module.weight.shape) == shape
                and _distance(fp, folded_print(w), int(np.prod(shape))) <= _MATCH_RTOL]
        if len(hits) == 1:
            applied.exporter_only.remove(plan)
            applied.by_value[plan] = hits[0]
            held.add(hits[0])
            folds.weights[plan] = candidates[hits[0]]
    for plan, fold in folds.weights.items():
        applied.through_bn[plan] = fold.bn
    return folds


def plan_axis(fold: Fold, plan: str, applied) -> int:
    """The output-channel axis of a folded weight as the plan holds it."""
    return 1 - fold.axis if plan in applied.transposed else fold.axis


def find_folded_biases(doc, applied, folds: Folds):
    """A folded weight's bias: the plan tensor its one reader reads as input 2 (and no other
    node: the legacy exporter's Identity of an equal tensor). It leaves the matches (no module
    tensor holds it) for ``folds.biases`` and ``applied.through_bn``."""
    tensors, readers_of = doc["tensors"], _readers(doc)
    by_reader = {(node, k): plan for plan, readers in readers_of.items() for node, k in readers}
    for plan, fold in folds.weights.items():
        readers = readers_of[plan]
        if len(readers) != 1 or readers[0][1] != 1:
            continue
        bias = by_reader.get((readers[0][0], 2))
        if bias is None or len(readers_of[bias]) != 1:
            continue
        width, entry = tensors[plan]["shape"][plan_axis(fold, plan, applied)], tensors[bias]
        # a zero tensor that several layers read (spa merged their unchanged copies back) keeps
        # the channels of one of them: zeros, whichever
        if entry["shape"] != [width] or entry["kept"].get("0") != tensors[plan]["kept"].get(
                str(plan_axis(fold, plan, applied))) and ("delta" in entry or entry.get("fingerprint", [1])[1] != 0):
            raise PlanFileError(f"plan tensor {shown(bias)}: the bias of {shown(plan)}, which spa found folded with "
                                f"BatchNorm {fold.bn}, but not of its shape or kept channels")
        for found in (applied.by_name, applied.by_value, applied.by_reader, applied.folded):
            found.pop(bias, None)
        if bias in applied.exporter_only:
            applied.exporter_only.remove(bias)
        applied.transposed.discard(bias)
        folds.biases[bias] = plan
        applied.through_bn[bias] = fold.bn


def _kept(fold: Fold, entry: dict, axis: int):
    kept = entry["kept"].get(str(axis))
    return slice(None) if kept is None else np.asarray(kept, dtype=np.int64)


def weight_change(fold: Fold, plan: str, entry: dict, delta: np.ndarray, axis: int) -> np.ndarray:
    """The change of the layer's own weight that makes its folded weight change by ``delta``
    (the kept slice's, output channels on ``axis``): ``delta·σ/γ`` per output channel."""
    kept = _kept(fold, entry, axis)
    gamma, sigma = fold.gamma[kept], fold.sigma[kept]
    dead = gamma == 0
    if dead.any():
        # below the rounding of the layer's weights is no change (OBSPA's arithmetic leaves ~1e-16)
        rounding = np.abs(fold.folded_weight()).max() * np.finfo(np.float32).eps
        changed = (np.abs(np.moveaxis(delta, axis, 0)).reshape(len(gamma), -1) > rounding).any(axis=1)
        if (dead & changed).any():
            channels = np.arange(len(fold.gamma))[kept][dead & changed]
            raise SpaError(f"plan tensor {shown(plan)}: changes the filters of output channel(s) "
                           f"{channels[:5].tolist()}{'...' if len(channels) > 5 else ''} of {fold.layer}, whose "
                           f"BatchNorm {fold.bn} has weight 0 there (the exporter folded it in): their output is "
                           "its constant shift, no change of the filter can reach it; set that weight non-zero "
                           "or pass updates=False to apply the slicing alone")
    factor = np.where(dead, 0.0, sigma / np.where(dead, 1.0, gamma))
    return delta.astype(np.float64) * fold._along(factor, delta.ndim, axis)


def shift_bias(fold: Fold, change: np.ndarray, entry: dict, axis: int, staged, where: str):
    """Add ``change`` of the folded bias (at the kept output channels) to β, or for a BatchNorm
    without affine parameters to the layer's bias, times σ. Onto what ``staged`` holds already
    (the BatchNorm sliced like its layer)."""
    if fold.bn_module.bias is not None:
        owner, attr = fold.bn_module, "bias"
    else:
        owner, attr = fold.layer_module, "bias"
        change = change.astype(np.float64) * fold.sigma[_kept(fold, entry, axis)]
    key = (id(owner), attr)
    if key in staged.tensors:
        like = staged.tensors[key][2]
    else:
        like = getattr(owner, attr)
    if like is None:          # a layer without a bias gets one
        like = fold.layer_module.weight
        current = np.zeros(change.shape, dtype=_numpy(like).dtype)
    else:
        current = _numpy(like)
    if current.shape != change.shape:
        raise PlanFileError(f"{where}: changes {len(change)} channels of {fold.bn}, which will have {len(current)}")
    staged.put(owner, attr, _plus(current, change, like, where), like, staged.channels.get(key))


def set_bias(fold: Fold, value: np.ndarray, entry: dict, axis: int, staged, where: str):
    """Make the folded bias ``value`` at the kept output channels (a bias spa added to the
    node: its whole new bias), by moving β."""
    shift_bias(fold, value - fold.folded_bias()[_kept(fold, entry, axis)], entry, axis, staged, where)
