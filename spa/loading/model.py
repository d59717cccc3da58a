"""Load, normalize and save ONNX models (their shapes: ``spa.loading.shapes``).

Normalization makes every exporter's graph look alike to the analysis: weights kept in
Constant nodes become initializers, initializers listed as graph inputs stop being inputs,
an initializer used by several nodes is copied per use so that unrelated layers that
happen to share a tensor (all-ones norm weights, say) are not tied together (but not for
Slice/Split readers, which cut one weight into pieces), and initializers named as
onnxruntime names the ones its optimizer adds are renamed (``ORT_GENERATED``). If/Loop/Scan
bodies get names unique in the whole model and give their weights to the main graph
(``spa.loading.scopes``).
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import weakref
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelLoadError
from .size_vectors import split_shared_size_vectors
from .scopes import (all_nodes, body_graphs, hoist_bodies, rename_inputs, tensor_names, unique_name,  # noqa: F401
                     walk)
from .files import check_readable, open_regular
from .in_place import parse_in_place
from .saving import EXTERNAL_ABOVE, copy_fields, output_paths, save  # noqa: F401
from .weight_files import ScratchWeights, WeightWriter, link_into, linkable_scratch, spillable  # noqa: F401
from .tensors import (_DATA_FILES, _MAPS, _elements, _external_info, _open_data_file, forget_files,  # noqa: F401
                      IN_PLACE_FILES, has_external_data, in_data_files, materialized, register_data_file,
                      release_mapped, stored_bytes, tensor_array, tensor_bytes, weight_view)

__all__ = ["load", "read", "normalize", "save", "output_paths", "tensor_array", "weight_view", "tensor_bytes",
           "materialized", "unique_name", "tensor_names", "add_typed_input", "release_mapped", "remove_initializers",
           "in_memory_bytes", "spillable", "ScratchWeights", "forget_files"]

# normalize names a further reader's copy of an initializer <name><COPY_MARK><n>
COPY_MARK = "__use"

# onnxruntime names the initializers its graph optimizer adds (MatMulAddFusion's Reshape shapes,
# Squeeze axes, Split sizes) with Graph::GenerateNodeName: the base name, then base_token_<n>,
# avoiding node names only. A file it optimized and saved keeps them (its transformer optimizer
# at opt_level 1 saves one: BERT's MatMul + Add became Reshape -> Gemm -> Reshape with
# "gemm_input_shape", "gemm_output_shape_token_3"...), and the next default session that fuses a
# MatMul + Add there generates the same name again and fails ("AddInitializedOrtValue Attempt to
# replace the existing tensor"). Renamed (<name><ORT_RENAMED>), the model and its pruned copies load.
ORT_GENERATED = re.compile(r"(gemm_input_shape|gemm_output_shape|SqueezeAxesInitializer|ConstAsInitializer|"
                           r"squeeze_axes|fused_Split)(_token_\d+)?")
ORT_RENAMED = "__spa"

# ops that read a part of an initializer: normalize gives them no copy of their own
_VIEWS = {"Slice", "Split"}

log = logging.getLogger(__name__)


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (with its external data); raise ModelLoadError on anything else.
    External weights are not read in: they are referred to where they lie (``spa.save``
    writes them out; ``spa.loading.tensors.materialized`` reads them in)."""
    return read(path)[0]


def read(path: str | os.PathLike, in_place: bool = False) -> tuple[onnx.ModelProto, dict[str, Path]]:
    """``load``, and the files the model was read from (what each is -> path). With
    ``in_place``, a file over ``IN_PLACE_ABOVE`` that holds its weights leaves them there
    (``spa.loading.in_place``), read through its descriptor while the files returned live:
    for a caller that holds them for as long as it reads the model (``analysis.Loaded``).

    External data must live inside the model's folder (after symlinks), in regular files,
    within their size: a downloaded model must never make spa read, or copy into its
    output, any other file."""
    path = Path(path)
    check_readable(path, "the model", ModelLoadError)
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    model, placed, key = _parsed(path, in_place)
    opened = [Path(key)] if placed else []
    try:
        if not model.graph.node or not model.opset_import:
            raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes or opset)")
        _check_old_ir(model, path)
        others = list(_other_tensors(model))
        _check_tensor_sizes([t for i, t in enumerate(model.graph.initializer) if i not in placed] + others, path)
        data_files = _resolve_external_data(model, others, path, set(placed))
        opened += data_files
        if placed:
            _read_in_place(model, placed, opened[0])
        try:
            onnx.checker.check_model(_weightless(model))  # structure only: weight bytes cost time
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"{path}: invalid ONNX model ({first})") from None
    except BaseException:
        _close_descriptors([(str(f), _DATA_FILES.get(str(f))) for f in opened])   # a refused model holds no file
        raise
    files = ReadFiles({"the input model": path})
    files.update((f"the input's external data file {f}", f) for f in data_files)
    # the descriptors live as long as something (a Loaded, an Analysis, a PruneResult) holds
    # these files: then a later read of the same model reopens by path, with the same checks
    weakref.finalize(files, _close_descriptors, [(str(f), _DATA_FILES.get(str(f))) for f in opened])
    return model, files


# A model file larger than this is mapped and its weights left in it (``in_place``)
IN_PLACE_ABOVE = 64 << 20


def _parsed(path: Path, in_place: bool) -> tuple[onnx.ModelProto, list[int], str | None]:
    """The model in ``path``, which of its initializers were left in the file (with
    ``in_place``: ``in_place.parse_in_place``, a large file's raw weights), and the resolved
    path the file is then held open under, registered for them."""
    fd = open_regular(path, "the model", ModelLoadError)
    try:
        if in_place and os.fstat(fd).st_size > IN_PLACE_ABOVE:
            try:
                with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                    parsed = parse_in_place(mapped)
            except (OSError, ValueError):
                parsed = None
            if parsed is not None:
                key = os.path.realpath(path)
                register_data_file(key, fd)
                fd = None
                return (*parsed, key)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        if fd is not None:
            os.close(fd)
    try:
        return onnx.load_model_from_string(data), [], None
    except Exception as e:  # protobuf raises several unrelated types for garbage
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None


def _read_in_place(model: onnx.ModelProto, in_place: list[int], resolved: Path):
    """Point the initializers left in the model's file at it (registered by ``_parsed``)."""
    for i in in_place:
        for e in model.graph.initializer[i].external_data:
            if e.key == "location":
                e.value = str(resolved)
    IN_PLACE_FILES.add(str(resolved))


class ReadFiles(dict):
    """What each file a model was read from is -> its path (a dict that can be weakly referenced)."""


def _close_descriptors(opened: list[tuple[str, int | None]]):
    for path, fd in opened:
        if fd is not None and _DATA_FILES.get(path) == fd:
            _MAPS.pop(path, None)
            os.close(_DATA_FILES.pop(path))


def _check_old_ir(model: onnx.ModelProto, path: Path):
    """Below IR version 4 an initializer must also be a graph input (the checker sees the
    weightless copy, where that rule cannot show)."""
    if model.ir_version >= 4:
        return
    listed = {i.name for i in model.graph.input}
    loose = [t.name for t in model.graph.initializer if t.name not in listed]
    if loose:
        raise ModelLoadError(f"{path}: invalid ONNX model (IR version {model.ir_version} needs every initializer "
                             f"listed as a graph input; {_short(loose[0])!r} is not)")


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _check_tensor_sizes(tensors: list[onnx.TensorProto], path: Path):
    """Every stored tensor holds as many values as its dims declare: memory follows the
    bytes in the file, never dims a file merely declares."""
    for t in tensors:
        n = _elements(t)
        if n < 0:
            raise ModelLoadError(f"{path}: tensor {t.name!r} has a negative dim {list(t.dims)}")
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
            continue
        if t.HasField("raw_data"):
            try:
                want = tensor_bytes(t)
            except Exception:
                raise ModelLoadError(f"{path}: tensor {t.name!r} has an unknown data type {t.data_type}") from None
            if len(t.raw_data) != want:
                raise ModelLoadError(f"{path}: tensor {t.name!r} declares dims {list(t.dims)} "
                                     f"({want} bytes) but holds {len(t.raw_data)} bytes")
            continue
        have = sum(len(getattr(t, f)) for f in _TYPED_FIELDS)
        if have and have < n:  # complex types store two values per element: more is fine
            raise ModelLoadError(f"{path}: tensor {t.name!r} declares dims {list(t.dims)} "
                                 f"({n} values) but holds {have}")
        if not have and n:
            raise ModelLoadError(f"{path}: tensor {t.name!r} declares dims {list(t.dims)} but holds no data")


def _other_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model except the main graph's initializers: Constant and
    other attribute values, subgraph initializers, sparse initializers, function bodies.
    Their external data must be checked like the initializers', or onnx would read it
    relative to the current directory."""
    def in_nodes(nodes):
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                    yield sp.values
                    yield sp.indices
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from in_graph(g, True)

    def in_graph(g, with_initializers):
        if with_initializers:
            yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        yield from in_nodes(g.node)
    yield from in_graph(model.graph, False)
    for f in model.functions:
        yield from in_nodes(f.node)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _resolve_external_data(model: onnx.ModelProto, others: list[onnx.TensorProto], path: Path,
                           in_place: set[int] = frozenset()) -> list[Path]:
    """Leave external weights on disk (they are read one tensor at a time when needed), but
    point them at resolved paths after checking that each stays inside the model's folder,
    is a regular file and holds the tensor in full. External tensors among ``others`` (Constant
    values, subgraphs: ``_other_tensors``) are checked the same way and read into memory."""
    folder = Path(os.path.realpath(path.parent if str(path.parent) else "."))
    sizes: dict[Path, int] = {}
    others = [t for t in others if t.data_location == onnx.TensorProto.EXTERNAL]
    initializers = [(False, t) for i, t in enumerate(model.graph.initializer) if i not in in_place]
    for is_other, t in initializers + [(True, t) for t in others]:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(t)
        location = info.get("location", "")
        where = f"{path}: tensor {_short(t.name)!r}: external data location {_short(location, 200)!r}"
        if not location or os.path.isabs(location) or location.startswith(("\\", "/")) or \
                re.match(r"^[A-Za-z]:", location) or "\x00" in location:
            raise ModelLoadError(f"{where} must be a relative path inside the model's folder")
        if t.data_type == onnx.TensorProto.STRING:
            raise ModelLoadError(f"{where}: string tensors cannot be stored as external data (ONNX keeps them "
                                 "in the model)")
        try:
            nbytes = tensor_bytes(t)
        except Exception:
            raise ModelLoadError(f"{where}: unknown data type {t.data_type}") from None
        try:
            resolved = Path(os.path.realpath(folder / location))
            if resolved != folder and folder not in resolved.parents:
                raise ModelLoadError(f"{where} leads outside the model's folder ({folder})")
            if resolved not in sizes:
                if not resolved.exists():
                    raise ModelLoadError(f"{where}: file is missing")
                sizes[resolved] = _open_data_file(resolved, where)
        except OSError as e:
            raise ModelLoadError(f"{where}: {e.strerror or e}") from None
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else nbytes
        except ValueError:
            raise ModelLoadError(f"{where}: offset/length are not integers") from None
        if offset < 0 or length != nbytes:
            raise ModelLoadError(f"{where}: offset {offset} / length {length} do not fit the tensor's "
                                 f"{nbytes} bytes")
        if offset + length > sizes[resolved]:
            raise ModelLoadError(f"{where}: file is truncated (needs {offset + length} bytes, "
                                 f"has {sizes[resolved]})")
        for e in t.external_data:
            if e.key == "location":
                e.value = str(resolved)
        if length <= 4096 or is_other:  # small constants and non-initializers: in memory
            t.CopyFrom(numpy_helper.from_array(tensor_array(t), t.name))
    return sorted(sizes)


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def normalize(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
    """Constant nodes as initializers, shared initializers split, unique node names.
    Works on a copy unless ``copy=False`` (for a model spa loaded itself)."""
    if copy:
        original, model = model, onnx.ModelProto()
        model.CopyFrom(original)
    g = model.graph
    inits = {t.name: t for t in g.initializer}

    kept_nodes = []
    for node in g.node:
        value = _constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is not None and node.output[0] not in {o.name for o in g.output}:
            t = numpy_helper.from_array(value, node.output[0])
            g.initializer.append(t)
            inits[t.name] = t
        else:
            kept_nodes.append(node)
    if len(kept_nodes) != len(g.node):
        del g.node[:]
        g.node.extend(kept_nodes)

    # Initializers listed as inputs are weights to the analysis. Below IR 4 every initializer
    # must be an input; from IR 4 on such an input is a default a user may override, so the
    # pruned model lists it again (pipeline._restore_default_inputs).
    real_inputs = [i for i in g.input if i.name not in inits]
    if len(real_inputs) != len(g.input):
        del g.input[:]
        g.input.extend(real_inputs)
        model.ir_version = max(model.ir_version, 4)

    # If/Loop/Scan bodies: names unique in the whole model, weights in the main graph
    # (``spa.loading.scopes``), so that their nodes are analyzed like the main graph's.
    if hoist_bodies(model):
        inits = {t.name: t for t in g.initializer}

    _rename_generated(model)

    # Rules, the report and the oracle refer to nodes by name: make names unique (in the
    # whole model: a body's nodes are analyzed and edited by name too).
    taken_nodes = {n.name for n in all_nodes(g) if n.name}
    seen: set[str] = set()
    for nodes in [g.node, *(b.node for b in body_graphs(g))]:
        for i, node in enumerate(nodes):
            if not node.name or node.name in seen:
                node.name = unique_name(f"{node.name or node.op_type}__{i}", taken_nodes)
            seen.add(node.name)

    # a size vector several layers read, split per reader: layers pruned apart need their own
    split_shared_size_vectors(model)

    # Slices and Splits of one weight are views of it (an LSTM cell's gates cut from one
    # matrix, once per code path): they keep reading it, so that its pieces stay one tensor.
    taken = tensor_names(model)
    uses: dict[str, int] = {}
    for _, node in walk(g):
        for k, name in enumerate(node.input):
            if name not in inits or (k == 0 and node.op_type in _VIEWS and node.domain in ("", "ai.onnx")):
                continue
            n = uses.get(name, 0)
            uses[name] = n + 1
            if n == 0:
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = unique_name(f"{name}{COPY_MARK}{n}", taken)
            g.initializer.append(copy)
            node.input[k] = copy.name
    return model


def _rename_generated(model: onnx.ModelProto):
    """Initializers named as onnxruntime's optimizer names its own (``ORT_GENERATED``) renamed,
    with every reader (subgraphs too). In place."""
    g = model.graph
    fixed = {v.name for v in [*g.input, *g.output]}
    olds = [t.name for t in g.initializer if ORT_GENERATED.fullmatch(t.name) and t.name not in fixed]
    if not olds:
        return
    taken = tensor_names(model)
    rename = {old: unique_name(old + ORT_RENAMED, taken) for old in olds}
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for v in g.value_info:
        v.name = rename.get(v.name, v.name)
    rename_inputs(g, rename)


def copied_from(name: str) -> str | None:
    """The initializer ``normalize`` copied to make ``name`` (a further reader's own copy),
    if the name says so; the caller checks the values agree."""
    base, mark, n = name.rpartition(COPY_MARK)
    return base if mark and n.isdigit() else None


def copies_of_equal(model: onnx.ModelProto) -> dict[str, str]:
    """{copy: original} for the readers' copies ``normalize`` made that still hold their
    original's values: a tied embedding that no pruning changed is one tensor again."""
    inits = {t.name: t for t in model.graph.initializer}
    same = {}
    for t in model.graph.initializer:
        base = inits.get(copied_from(t.name))
        if base is not None and _equal_tensors(t, base):
            same[t.name] = base.name
    return same


def rejoin_copies(model: onnx.ModelProto) -> onnx.ModelProto:
    """The readers of every unchanged copy read its original again; the copy is dropped. In place."""
    same = copies_of_equal(model)
    if same:
        g = model.graph
        rename_inputs(g, same)
        remove_initializers(g, set(same))
    return model


def remove_initializers(g: onnx.GraphProto, names: set[str]):
    """Drop these initializers, in place. Rebuilding the list instead copies every kept tensor
    into the model again, and protobuf frees the old copies only with the whole model: a 1.1B
    decoder's pruned weights were held twice (2.8 GB)."""
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name in names:
            del g.initializer[i]


def _equal_tensors(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    if a.HasField("raw_data") and b.HasField("raw_data"):
        return a.raw_data == b.raw_data
    return bool(np.array_equal(tensor_array(a), tensor_array(b)))


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers turned into typed graph inputs: shape
    inference needs their shapes, not their bytes, and copying bytes is what costs."""
    m = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "domain", "model_version"):
        setattr(m, name, getattr(model, name))
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    listed = {i.name for i in src.input}   # below IR 4 every initializer is also an input
    for t in src.initializer:
        if math.prod(t.dims) <= 64 and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in listed:
            add_typed_input(g, t)
    m.ir_version = max(m.ir_version, 4)
    return m


def add_typed_input(g: onnx.GraphProto, t: onnx.TensorProto):
    """A graph input of ``t``'s type and shape: what helper.make_tensor_value_info makes,
    without its checks (100k weights: seconds)."""
    vi = g.input.add()
    vi.name = t.name
    typed = vi.type.tensor_type
    typed.elem_type = t.data_type
    typed.shape.SetInParent()
    for d in t.dims:
        typed.shape.dim.add().dim_value = d


def in_memory_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights ``model`` holds in its own protobuf (not in external data)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
