"""The plan file: what a pruning changed, in terms of the original model's tensors, as JSON.

A framework applies it to its own model (``spa.torch.apply_plan``) to train or fine-tune the
pruned network there. Every pass of a run (steps, head dims, hidden width) is composed into
one change per initializer of the original:

``tensors``   name -> ``shape`` (before), ``new_shape``, ``kept`` (axis -> sorted indices
              into the original axis), ``fingerprint`` (sum and L2 norm of the original
              values, for matching), ``copy_of`` (a copy spa made for a second reader of a
              tensor, changed unlike the tensor), and ``delta``: the key of an array in the side
              ``.npz`` holding ``new - original[kept]`` where OBSPA or bias correction changed
              values (absent when only sliced); integer size constants give their ``value``;
              ``readers``: the nodes of the original that read it (node, input index), so a
              framework can tell a folded layer's bias from its weight (``spa.torch_fold``).
``added``     tensors the pruned model has and the original had not (a bias OBSPA added to a
              bias-free layer, a size constant spa had to make): ``shape``, ``value`` (npz key),
              ``readers`` (node, input index).
``nodes``     node name -> ``op``, changed ``attributes`` (group counts, split sizes...) and
              ``weights`` (the initializers the node reads, to find it in a framework).
``groups``    per pass, what each group lost.
``ties``      lists of ``[tensor, axis]`` that keep the same indices (a conv's filters, its
              BatchNorm, the next layer's inputs): a reader refuses a plan where they differ.
              Every sliced axis is in exactly one tie (alone when no other keeps its indices),
              so a reader also refuses a plan whose ties were dropped or emptied while its
              kept lists were edited. Axes that agree by chance are tied too; that costs
              nothing, they agree.

Versioned by ``format``/``version``; ``source`` names the model file(s) and their sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import PlanFileError, SpaError
from ..loading.model import copied_from, tensor_array
from ..loading.scopes import all_nodes
from .plan_check import Limits, check_document, shown

__all__ = ["FORMAT", "VERSION", "fingerprint", "plan_document", "write_plan", "read_plan"]

FORMAT = "spa-plan"
VERSION = 1


def _digest(files: dict) -> dict:
    from ..loading.files import open_regular
    out = {}
    for what, path in sorted(files.items()):
        h = hashlib.sha256()
        with os.fdopen(open_regular(path, what, SpaError), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[what] = {"file": os.path.basename(str(path)), "sha256": h.hexdigest()}
    return out


def fingerprint(values: np.ndarray) -> list[float]:
    """Sum, L2 norm and the sum weighted by the index along the first axis of a tensor's
    original values: finds a framework's tensor whose name the exporter lost (the first two
    do not change when a matrix is stored transposed, the third tells which way it is), and
    tells a tensor the exporter changed (BatchNorm folded into it)."""
    v = np.asarray(values, dtype=np.float64)
    rows = v.reshape(len(v), -1).sum(axis=1) if v.ndim else v.reshape(1)
    return [float(v.sum()), float(np.sqrt((v * v).sum())), float(np.arange(len(rows)) @ rows)]


def _composed_kept(plans, names: set[str]) -> dict:
    """(initializer, axis) -> kept indices into the original axis, over every pass: a later
    pass's indices point into the earlier pass's kept ones."""
    total: dict = {}
    for plan in plans:
        for (name, axis), k in plan.kept.items():
            if name in names:
                prev = total.get((name, axis))
                total[(name, axis)] = k if prev is None else prev[k]
    return total


def _attrs(node) -> dict:
    """A node's attributes but its bodies (an If's branches: their nodes are listed on their own)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute
            if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)}


def _jsonable(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def _shape_only(model) -> set[str]:
    """Initializers every reader of which reads only the shape or type (Shape, Size, the
    second input of CastLike): nothing of their values reaches the outputs."""
    real = set()
    for n in all_nodes(model.graph):
        for k, i in enumerate(n.input):
            if not (n.op_type in ("Shape", "Size") or (n.op_type == "CastLike" and k == 1)):
                real.add(i)
    return {t.name for t in model.graph.initializer if t.name not in real}


def _fold_copies(tensors: dict, o_inits: dict, arrays: dict, shape_only: set[str]) -> dict[str, str]:
    """spa gives each further reader of an initializer its own copy (``w__use1``, see
    ``spa.loading.model.normalize``); the source has one tensor. A copy changed exactly as its
    original is dropped; a copy of a tensor otherwise read only for its shape takes its
    name; one changed otherwise stays, marked ``copy_of``. Returns copy -> source name."""
    def same(a, b):
        return a["kept"] == b["kept"] and a.get("value") == b.get("value") and (
            ("delta" in a) == ("delta" in b)) and (
            "delta" not in a or np.array_equal(arrays[a["delta"]], arrays[b["delta"]]))
    renamed = {}
    for name in [n for n in o_inits if copied_from(n)]:
        base = copied_from(name)
        if base not in o_inits or o_inits[base].data_type != o_inits[name].data_type or not np.array_equal(
                tensor_array(o_inits[base]), tensor_array(o_inits[name])):
            continue                       # a user's tensor that happens to be named so
        renamed[name] = base
        if name not in tensors:
            continue
        if base in tensors and same(tensors[name], tensors[base]):
            arrays.pop(tensors[name].get("delta"), None)
            del tensors[name]
        elif base not in tensors and base in shape_only:
            tensors[base] = tensors.pop(name)
        else:
            tensors[name]["copy_of"] = base
            del renamed[name]
    return renamed


def _readers(graph) -> list[tuple[str, list]]:
    """(tensor, [node, input index]) for every input of every node, seen through Identity nodes
    (the legacy exporter writes a tensor equal to another as an Identity of it): their readers
    read the tensor."""
    direct: dict = {}
    for n in graph.node:
        for k, i in enumerate(n.input):
            direct.setdefault(i, []).append((n, k))

    def through(name, seen):
        for n, k in direct.get(name, []):
            if n.op_type == "Identity" and n.output[0] not in seen:
                yield from through(n.output[0], seen | {n.output[0]})
            else:
                yield [n.name, k]
    return [(name, reader) for name in direct for reader in through(name, {name})]


def _ties(tensors: dict) -> list[list]:
    """Axes of the same width whose kept indices are the same, each tie as ``[tensor, axis]``s;
    an axis no other agrees with is a tie of its own, so every sliced axis is in one."""
    by_kept: dict = {}
    for name, entry in tensors.items():
        for axis, k in entry["kept"].items():
            by_kept.setdefault((entry["shape"][int(axis)], tuple(k)), []).append([name, int(axis)])
    return list(by_kept.values())


def plan_document(result) -> tuple[dict, dict[str, np.ndarray]]:
    """The plan file of a ``PruneResult`` (a dict ready for JSON) and its arrays."""
    from .. import __version__
    original, pruned = result.original, result.model
    o_inits = {t.name: t for t in original.graph.initializer}
    p_inits = {t.name: t for t in pruned.graph.initializer}
    kept = _composed_kept(result.plans, set(o_inits))
    arrays: dict[str, np.ndarray] = {}
    tensors = {}
    shape_only = _shape_only(original)
    for name, t in o_inits.items():
        p = p_inits.get(name)
        if p is None or name in shape_only:
            continue
        axes = {a: kept[(name, a)] for a in range(len(t.dims)) if (name, a) in kept}
        if not axes and tuple(t.dims) == tuple(p.dims) and t.SerializeToString() == p.SerializeToString():
            continue
        entry = {"shape": list(t.dims), "new_shape": list(p.dims),
                 "kept": {str(a): k.tolist() for a, k in axes.items()}}
        before, after = tensor_array(t), tensor_array(p)
        if before.dtype.kind == "f":
            entry["fingerprint"] = fingerprint(before)
        for a, k in axes.items():
            before = np.take(before, k, axis=a)
        if before.shape != after.shape:
            raise SpaError(f"plan file: {name!r} does not compose ({before.shape} vs {after.shape}); please report")
        if after.dtype.kind in "iub":
            if not np.array_equal(before, after):
                entry["value"] = after.tolist()
        elif not np.array_equal(before, after):
            key = f"delta/{name}"
            arrays[key] = (after.astype(np.float64) - before.astype(np.float64)).astype(after.dtype)
            entry["delta"] = key
        tensors[name] = entry
    source_name = _fold_copies(tensors, o_inits, arrays, shape_only)
    for name, reader in _readers(original.graph):
        entry = tensors.get(source_name.get(name, name))
        if entry is not None:
            entry.setdefault("readers", []).append(reader)
    readers: dict = {}
    for n in all_nodes(pruned.graph):
        for k, i in enumerate(n.input):
            readers.setdefault(i, []).append([n.name, k])
    added = {}
    for name, p in p_inits.items():
        if name not in o_inits:
            arrays[f"added/{name}"] = tensor_array(p)
            added[name] = {"shape": list(p.dims), "value": f"added/{name}", "readers": readers.get(name, [])}
    o_nodes = {n.name: n for n in all_nodes(original.graph)}
    nodes = {}
    for n in all_nodes(pruned.graph):
        o = o_nodes.get(n.name)
        if o is None:
            continue
        before, after = _attrs(o), _attrs(n)
        changed = {k: _jsonable(v) for k, v in after.items() if k not in before or before[k] != v}
        dropped = [k for k in before if k not in after]
        inputs = {str(k): i for k, (i, j) in enumerate(zip(n.input, list(o.input) + [""] * len(n.input))) if i != j}
        if changed or dropped or inputs:
            nodes[n.name] = {"op": n.op_type, "attributes": changed, "dropped_attributes": dropped,
                             "inputs": inputs,
                             "weights": [source_name.get(i, i) for i in o.input if i in o_inits]}
    doc = {
        "format": FORMAT, "version": VERSION, "spa_version": __version__,
        "source": _digest(result.files) if result.files else {"model": {"file": None, "sha256": hashlib.sha256(
            original.SerializeToString()).hexdigest()}},
        "arrays": None,
        "tensors": tensors, "added": added, "nodes": nodes, "ties": _ties(tensors),
        "groups": [[{"group": c.group, "kind": c.kind, "channels": c.size, "removed": c.removed.tolist()}
                    for c in plan.choices] for plan in result.plans],
    }
    return doc, arrays


def write_plan(result, path) -> list[Path]:
    """Write ``path`` (JSON) and, when values changed, ``path`` + ``.npz`` beside it, atomically."""
    return write_prepared(prepare_plan(result, path))


def prepare_plan(result, path) -> tuple:
    """The plan's document, arrays and files, checked (a foreign ``.npz`` beside ``path`` is
    refused) before anything of a run is written."""
    from ..loading.files import check_side_file
    doc, arrays = plan_document(result)
    path = Path(path)
    targets = [path]
    if arrays:
        doc["arrays"] = path.name + ".npz"
        targets.append(path.with_name(path.name + ".npz"))
        check_side_file(targets[1], lambda: _keeps_arrays_in(path, targets[1].name), "the plan's arrays", "--plan")
    return doc, arrays, targets


def _keeps_arrays_in(path: Path, name: str) -> bool:
    """Whether ``path`` is an spa plan whose arrays are ``name``."""
    from ..loading.files import read_small
    data = read_small(path, 64 << 20)
    try:
        doc = json.loads(data) if data else None
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("arrays") == name


def write_prepared(prepared: tuple) -> list[Path]:
    from ..loading.files import atomic_files
    doc, arrays, targets = prepared
    with atomic_files(*targets) as tmps:
        with open(tmps[0], "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        if arrays:
            with open(tmps[1], "wb") as f:
                np.savez(f, **arrays)
    return targets


def read_plan(plan, limits: Limits = Limits()) -> tuple[dict, dict[str, np.ndarray]]:
    """A plan file (path) or document (dict) and its arrays, checked for format and version and
    against itself (``spa.plan.plan_check``), reading no more than ``limits`` allow."""
    if isinstance(plan, (str, os.PathLike)):
        doc, base = _read_json(Path(plan), limits.json_bytes), Path(plan).parent
    elif isinstance(plan, dict):
        doc, base = plan, Path(".")
    else:
        raise PlanFileError(f"expected a plan file path or dict, got {type(plan).__name__}")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PlanFileError("not an spa plan file (format is not 'spa-plan')")
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        raise PlanFileError(f"plan file version {shown(version)} is not supported (this spa reads {VERSION})")
    arrays = {}
    name = doc.get("arrays")
    if name is not None:
        if not isinstance(name, str) or not name or os.path.basename(name) != name:
            raise PlanFileError("plan file names its arrays outside its folder (or not by a file name)")
        arrays = _read_arrays(base / name, limits.array_bytes)
    check_document(doc, arrays, limits)
    return doc, arrays


def _read_json(path: Path, max_bytes: int | None) -> dict:
    from ..loading.files import open_regular
    # a FIFO or device named plan.json would block a plain open(), or never end
    with os.fdopen(open_regular(path, "the plan file", PlanFileError), "rb") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise PlanFileError(f"{path}: larger than a plan for this model can be ({max_bytes} bytes)")
            # at most one byte past the limit: a file that grew since fstat is bounded too
            text = f.read(-1 if max_bytes is None else min(size, max_bytes) + 1)
        except OSError as e:
            raise PlanFileError(f"{path}: not a readable plan file ({e.strerror or e})") from None
    if max_bytes is not None and len(text) > max_bytes:
        raise PlanFileError(f"{path}: larger than a plan for this model can be ({max_bytes} bytes)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:     # RecursionError: nested deeper than the stack
        raise PlanFileError(f"{path}: not a readable plan file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'nested too deep'})") from None


def _read_arrays(path: Path, max_bytes: int | None) -> dict[str, np.ndarray]:
    """The .npz beside a plan, its arrays' sizes read from their headers before any is loaded,
    all through one descriptor of a regular file (a FIFO would block an open by path)."""
    from ..loading.files import open_regular
    fd = open_regular(path, "the plan's .npz", PlanFileError)
    try:
        with os.fdopen(fd, "rb") as f, zipfile.ZipFile(f) as z:
            # np.load's keys: a member's name without its .npy
            members = {(n[:-4] if n.endswith(".npy") else n): n for n in z.namelist()}
            total = sum(_npy_bytes(z, member, path) for member in members.values())
            if max_bytes is not None and total > max_bytes:
                raise PlanFileError(f"{path}: holds {total} bytes of arrays; a plan for this model holds at most "
                                    f"{max_bytes}")
            arrays = {}
            for key, member in members.items():
                with z.open(member) as m:
                    arrays[key] = np.lib.format.read_array(m, allow_pickle=False)
            return arrays
    except PlanFileError:
        raise
    except Exception as e:           # zipfile and numpy raise a dozen kinds on a damaged file
        raise PlanFileError(f"{path}: cannot read the plan's arrays ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _npy_bytes(z: zipfile.ZipFile, member: str, path: Path) -> int:
    from ..loading.data_files import npy_header
    with z.open(member) as f:
        shape, _, dtype = npy_header(f, f"{path}: array {shown(member)}", PlanFileError)
        return int(np.prod(shape, dtype=object)) * dtype.itemsize
