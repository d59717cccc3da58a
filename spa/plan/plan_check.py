"""A plan document checked against itself before anything reads its values.

``spa.plan.plan_file.read_plan`` calls :func:`check_document`: every field that
``spa.torch.apply_plan`` reads has its JSON type; every kept list indexes its own tensor's
axis (integers, none negative, in range, strictly increasing, not empty); a value change
has the shape of the kept slice and is finite; a group count is a positive integer; every
sliced axis is in exactly one of the plan's ``ties`` (required: without them an edited kept
list could no longer be told from a real one), and the axes of a tie keep the same indices.
Fields nothing reads are not looked at, so a later version may add some.

The work is bounded by :class:`Limits`, which the caller derives from the model the plan is
for: lists are counted before any of their elements is read, and a list longer than its axis
is refused by its length. Every error is a one-line :class:`~spa.errors.PlanFileError` naming
the tensor, node or field and what is wrong with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import PlanFileError

__all__ = ["Limits", "check_document", "shown"]

MAX_NDIM = 64          # torch's own limit on a tensor's dimensions


@dataclass(frozen=True)
class Limits:
    """The most a plan may hold: bytes of JSON, bytes of arrays, and indices (kept and removed
    lists together). ``None``: unbounded."""

    json_bytes: int | None = None
    array_bytes: int | None = None
    indices: int | None = None


def shown(value, limit: int = 60) -> str:
    """A value for a one-line message: containers by their length (their repr could be huge,
    or nested past the recursion limit), anything else by its repr, cut short."""
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, int) and value.bit_length() > 64:     # repr refuses past 4300 digits
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:              # an integer past float's range
        return False


def _typed(value, kind, where: str):
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise PlanFileError(f"{where}: expected a {want}, got {shown(value)}")
    return value


def check_document(doc, arrays: dict, limits: Limits = Limits()) -> None:
    """Refuse ``doc`` (a parsed plan) with a :class:`PlanFileError` unless it is well formed."""
    _typed(doc, dict, "the plan")
    tensors = _typed(doc.get("tensors"), dict, "the plan's tensors")
    added = _typed(doc.get("added"), dict, "the plan's added tensors")
    nodes = _typed(doc.get("nodes"), dict, "the plan's nodes")
    groups = _typed(doc.get("groups", []), list, "the plan's groups")
    _count_indices(tensors, groups, limits)
    for name, entry in tensors.items():
        _check_tensor(name, entry, arrays)
    for name, entry in added.items():
        _check_added(name, entry, arrays)
    for name, node in nodes.items():
        _check_node(name, node)
    _check_groups(groups)
    if "ties" not in doc:
        raise PlanFileError("the plan has no ties (the axes it cuts together), which this spa needs to check "
                            "it: write the plan again with this spa")
    _check_ties(doc["ties"], tensors)


def _count_indices(tensors: dict, groups: list, limits: Limits):
    """Before reading any element: the lists together hold no more indices than the model's
    axes can (a list of ten million indices costs its length, not ten million checks)."""
    if limits.indices is None:
        return
    total = 0
    for entry in tensors.values():
        kept = entry.get("kept") if isinstance(entry, dict) else None
        if isinstance(kept, dict):
            total += sum(len(k) for k in kept.values() if isinstance(k, list))
    for passed in groups:
        for c in passed if isinstance(passed, list) else ():
            removed = c.get("removed") if isinstance(c, dict) else None
            total += len(removed) if isinstance(removed, list) else 0
    if total > limits.indices:
        raise PlanFileError(f"the plan lists {total} indices; a plan for this model holds at most {limits.indices}")


def check_indices(kept, size: int, where: str) -> None:
    """A kept list: integers into an axis of ``size``, strictly increasing, not empty."""
    _typed(kept, list, where)
    if not kept:
        raise PlanFileError(f"{where}: keeps no index (that would remove the whole axis)")
    if len(kept) > size:
        raise PlanFileError(f"{where}: lists {len(kept)} indices into an axis of {size}")
    previous = -1
    for i in kept:
        if not _is_int(i):
            raise PlanFileError(f"{where}: index {shown(i)} is not an integer")
        if i < 0:
            raise PlanFileError(f"{where}: index {i} is negative")
        if i >= size:
            raise PlanFileError(f"{where}: index {i} is out of range for an axis of {size}")
        if i <= previous:
            raise PlanFileError(f"{where}: index {i} is {'duplicated' if i == previous else 'out of order'} "
                                "(kept indices are strictly increasing)")
        previous = i


def _shape(value, where: str) -> list[int]:
    _typed(value, list, where)
    if len(value) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in value):
        raise PlanFileError(f"{where}: expected at most {MAX_NDIM} sizes, each a non-negative integer")
    return [int(d) for d in value]


def _axis(key, ndim: int, where: str) -> int:
    if not (isinstance(key, str) and key.isascii() and key.isdigit() and key == str(int(key)) and int(key) < ndim):
        raise PlanFileError(f"{where}: kept axis {shown(key)} is not an axis of a {ndim}-D tensor")
    return int(key)


def _check_tensor(name, entry, arrays: dict):
    where = f"plan tensor {shown(name)}"
    _typed(name, str, f"{where}: name")
    _typed(entry, dict, where)
    shape = _shape(entry.get("shape"), f"{where}, shape")
    sliced = list(shape)
    for key, kept in _typed(entry.get("kept"), dict, f"{where}, kept").items():
        axis = _axis(key, len(shape), where)
        check_indices(kept, shape[axis], f"{where}, kept axis {axis}")
        sliced[axis] = len(kept)
    if "new_shape" in entry and _shape(entry["new_shape"], f"{where}, new_shape") != sliced:
        raise PlanFileError(f"{where}: new_shape {entry['new_shape']} is not the shape of its kept slice {sliced}")
    # an infinite fingerprint would match any tensor of its shape
    fp = entry.get("fingerprint", [0, 0, 0])
    if not (isinstance(fp, list) and len(fp) == 3 and all(_is_finite(v) for v in fp)):
        raise PlanFileError(f"{where}: fingerprint is not three finite numbers ({shown(fp)})")
    if "delta" in entry:
        _array(arrays, entry["delta"], sliced, f"{where}, delta", "f")
    if "copy_of" in entry:
        _typed(entry["copy_of"], str, f"{where}, copy_of")
    if "readers" in entry:
        _check_readers(entry["readers"], where)


def _array(arrays: dict, key, shape: list[int], where: str, kinds: str, expected: str = "the kept slice has"):
    """The array ``key`` of the plan's .npz: numbers of ``shape``, finite."""
    if not isinstance(key, str) or key not in arrays:
        raise PlanFileError(f"{where}: names array {shown(key)}, which the plan's .npz does not hold")
    a = arrays[key]
    if not isinstance(a, np.ndarray) or a.dtype.kind not in kinds:
        raise PlanFileError(f"{where}: array {shown(key)} holds {getattr(a, 'dtype', type(a).__name__)}, not numbers")
    if list(a.shape) != shape:
        raise PlanFileError(f"{where}: array {shown(key)} has shape {list(a.shape)}, {expected} {shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise PlanFileError(f"{where}: array {shown(key)} holds NaN or infinite values")


def _check_added(name, entry, arrays: dict):
    where = f"added tensor {shown(name)}"
    _typed(name, str, f"{where}: name")
    _typed(entry, dict, where)
    _array(arrays, entry.get("value"), _shape(entry.get("shape"), f"{where}, shape"), f"{where}, value", "fiu",
           "its declared shape is")
    _check_readers(entry.get("readers"), where)


def _check_readers(readers, where: str):
    for reader in _typed(readers, list, f"{where}, readers"):
        if not (isinstance(reader, list) and len(reader) == 2 and isinstance(reader[0], str) and _is_int(reader[1])
                and reader[1] >= 0):
            raise PlanFileError(f"{where}: reader {shown(reader)} is not a [node, input index] pair")


def _check_node(name, node):
    where = f"plan node {shown(name)}"
    _typed(name, str, f"{where}: name")
    _typed(node, dict, where)
    _typed(node.get("op"), str, f"{where}, op")
    for key, value in _typed(node.get("attributes", {}), dict, f"{where}, attributes").items():
        # group counts size the layers they are applied to: a 0 would divide by zero there
        if key in ("group", "num_groups") and not (_is_int(value) and value >= 1):
            raise PlanFileError(f"{where}: {key} {shown(value)} is not a positive integer")
    weights = _typed(node.get("weights", []), list, f"{where}, weights")
    if not all(isinstance(w, str) for w in weights):
        raise PlanFileError(f"{where}: weights are not all tensor names")


def _check_groups(groups: list):
    for step, passed in enumerate(groups):
        for c in _typed(passed, list, f"the plan's groups of pass {step}"):
            where = f"the plan's groups of pass {step}"
            _typed(c, dict, where)
            if not (isinstance(c.get("kind"), str) and _is_int(c.get("channels")) and c["channels"] >= 0):
                raise PlanFileError(f"{where}: group {shown(c.get('group'))} lacks its kind or channel count")
            removed = _typed(c.get("removed"), list, f"{where}, group {shown(c.get('group'))}, removed")
            if not all(_is_int(r) and 0 <= r < c["channels"] for r in removed):
                raise PlanFileError(f"{where}: group {shown(c.get('group'))} removes channels outside its "
                                    f"{c['channels']}")


def _check_ties(ties, tensors: dict):
    """Axes cut together (a conv's filters, its BatchNorm, the next layer's inputs) keep the
    same indices: one of them edited alone makes a module whose layers no longer line up.
    Every sliced axis is in a tie (spa writes one alone where nothing agrees with it), so
    dropping an axis from its tie, or emptying the ties, does not let an edit through."""
    seen: set = set()
    for tie in _typed(ties, list, "the plan's ties"):
        first = None
        for member in _typed(tie, list, "a tie of the plan"):
            if not (isinstance(member, list) and len(member) == 2 and isinstance(member[0], str)
                    and _is_int(member[1])):
                raise PlanFileError(f"a tie of the plan: {shown(member)} is not a [tensor, axis] pair")
            name, axis = member[0], int(member[1])
            kept = tensors[name]["kept"].get(str(axis)) if name in tensors else None
            if kept is None or (name, axis) in seen:
                raise PlanFileError(f"a tie of the plan names {shown(name)} axis {axis}, which the plan does "
                                    "not slice or ties twice")
            seen.add((name, axis))
            if first is None:
                first = (name, axis, kept)
            elif kept != first[2]:
                raise PlanFileError(f"plan tensors {shown(first[0])} axis {first[1]} and {shown(name)} axis "
                                    f"{axis} are cut together but keep different indices")
    for name, entry in tensors.items():
        for key in entry["kept"]:
            if (name, int(key)) not in seen:
                raise PlanFileError(f"plan tensor {shown(name)} axis {key} is sliced but in none of the plan's "
                                    "ties: the plan was edited (or written by an older spa: write it again)")
