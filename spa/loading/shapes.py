"""Static shapes of every tensor: ONNX shape inference on a weightless skeleton, completed by one
onnxruntime run for what inference leaves unknown, with the input sizes fixed (by the user, by
the model, or probed: see ``spa.loading.probe``); and random inputs at those sizes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ..errors import InputShapeError, UnsupportedModelError
from .model import _constant_value, _weightless, tensor_array
from .scopes import all_nodes, bodies, outer_reads

__all__ = ["Shapes", "infer_skeleton", "parse_input_shapes", "random_inputs", "graph_inputs",
           "is_open", "too_large", "compared_values", "branch_values", "SIZE_INPUTS", "MAX_INPUT_VALUES",
           "DATA_PROP_MAX"]

log = logging.getLogger(__name__)

# Inputs that carry sizes rather than data: their values are needed to map axes.
SIZE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Split": (1,), "Slice": (1, 2, 3, 4),
    "Squeeze": (1,), "Unsqueeze": (1,), "Pad": (1, 2, 3), "Resize": (1, 2, 3),
    "Upsample": (1,), "ConstantOfShape": (0,), "ReduceSum": (1,), "ReduceMean": (1,),
    "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL1": (1,),
    "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
    "Clip": (1, 2), "Range": (0, 1, 2), "CumSum": (1,),
}


@dataclass
class Shapes:
    """Static shapes of every tensor, and the values of small integer tensors."""

    shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtype: dict[str, int] = field(default_factory=dict)
    value: dict[str, np.ndarray] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    probe: dict = field(default_factory=dict)  # sizes spa chose for symbolic input dims (spa.loading.probe)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1,3,224,224`` strings."""
    out = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = tuple(int(d) for d in dims.split(","))
            if any(d < 1 for d in out[name]):
                raise InputShapeError(f"bad --input-shape {spec!r}: every dim must be at least 1")
        except ValueError:
            raise InputShapeError(f"bad --input-shape {spec!r}; expected name=1,3,224,224") from None
    return out


def is_open(d) -> bool:
    """A declared dim left open: symbolic, unset, or the -1 (or 0) that some exporters
    (paddle2onnx) write for "any size". Never a size to feed or to check against."""
    return not d.HasField("dim_value") or d.dim_value <= 0


def _fixed_input_shapes(model, overrides) -> dict[str, tuple]:
    """Each input's dims: from ``--input-shape``, else as declared, with None for a symbolic
    dim (``spa.loading.probe`` chooses those)."""
    shapes = {}
    known = {i.name for i in graph_inputs(model)}
    for name in overrides:
        if name not in known:
            raise InputShapeError(f"--input-shape names {name!r}, but the model's inputs are {sorted(known)}")
    for inp in graph_inputs(model):
        if not inp.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"input {inp.name!r} is not a tensor; spa handles tensor inputs only")
        dims = inp.type.tensor_type.shape.dim
        if inp.name in overrides:
            fixed = overrides[inp.name]
            if len(fixed) != len(dims):
                raise InputShapeError(f"--input-shape {inp.name} has {len(fixed)} dims, the model's input has {len(dims)}")
        else:
            fixed = [None if is_open(d) else d.dim_value for d in dims]
        shapes[inp.name] = tuple(None if x is None else int(x) for x in fixed)
    return shapes


def too_large(shapes: dict) -> str | None:
    """The first input whose dims ask for more than MAX_INPUT_VALUES values, if any."""
    return next((name for name, shape in shapes.items() if int(np.prod(shape, dtype=object)) > MAX_INPUT_VALUES),
                None)


def _check_input_size(shapes: dict):
    name = too_large(shapes)
    if name is not None:
        shape = shapes[name]
        raise InputShapeError(f"input {name!r} has dims {list(shape)}: too large to run here "
                              f"(over {MAX_INPUT_VALUES} values); pass --input-shape {name}=... with smaller dims")


# Random inputs are drawn to find shapes and to verify: no input may ask for more values.
MAX_INPUT_VALUES = 1 << 26


def random_inputs(model: onnx.ModelProto, input_shapes: dict, rng: np.random.Generator,
                  batch: int | None = None) -> dict[str, np.ndarray]:
    """Random feeds for every graph input: normal floats, small non-negative integers; an
    integer scalar the graph compares with a constant takes that constant (``compared_values``)."""
    feeds = {}
    compared = compared_values(model)
    for inp in graph_inputs(model):
        shape = list(input_shapes[inp.name])
        if batch is not None and shape:
            shape[0] = batch
        np_type = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if np.issubdtype(np_type, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(np_type)
        elif np_type == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        elif inp.name in compared:
            feeds[inp.name] = np.full(shape, compared[inp.name], np_type)
        else:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np_type)
    return feeds


_COMPARISONS = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"}
_SAME_VALUE = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather", "Expand"}  # of a scalar
_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def _comparisons(model: onnx.ModelProto) -> list[tuple[str, str, int, bool]]:
    """(input, op, constant, input on the left) for every comparison of an integer scalar
    graph input with a constant, in the main graph or any If/Loop/Scan body."""
    scalars = {vi.name for vi in graph_inputs(model)
               if vi.type.tensor_type.elem_type in _INT_TYPES and vi.type.tensor_type.HasField("shape")
               and all(d.HasField("dim_value") and d.dim_value == 1 for d in vi.type.tensor_type.shape.dim)}
    if not scalars:
        return []
    nodes = list(all_nodes(model.graph))
    producers = {o: n for n in nodes for o in n.output if o}

    def source(name: str) -> str:
        """The input a value is read from through ops that keep its value (sr reshaped to [1]
        and gathered back to a scalar, as the dynamo exporter writes ``sr == 16000``)."""
        for _ in range(8):
            node = producers.get(name)
            if node is None or node.op_type not in _SAME_VALUE or not node.input:
                break
            name = node.input[0]
        return name

    pairs = [(n.op_type, source(n.input[i]), n.input[1 - i], i == 0) for n in nodes if n.op_type in _COMPARISONS
             and len(n.input) == 2 for i in (0, 1) if source(n.input[i]) in scalars]
    if not pairs:
        return []
    consts = {t.name: t for t in model.graph.initializer if t.name in {c for _, _, c, _ in pairs}}
    constant_nodes = {n.output[0]: n for n in nodes if n.op_type == "Constant" and n.output}
    out = []
    for op, name, other, left in pairs:
        if other in consts and math.prod(consts[other].dims) == 1:
            value = tensor_array(consts[other])
        elif other in constant_nodes:
            value = _constant_value(constant_nodes[other])
        else:
            continue
        if value is not None and np.size(value) == 1 and np.asarray(value).dtype.kind in "iu":
            out.append((name, op, int(np.asarray(value).reshape(())), left))
    return out


def compared_values(model: onnx.ModelProto) -> dict[str, int]:
    """Integer scalar inputs that the graph (or a body in it) compares with a constant, and
    the first such constant: a sample rate read as ``If(sr == 16000)`` is fed 16000, which
    selects a branch the model was built for, where a small random integer selects the other
    one (or none that runs). Only scalars: comparing token ids with a pad id must not make
    every id the pad."""
    out: dict[str, int] = {}
    for name, _, value, _ in _comparisons(model):
        out.setdefault(name, value)
    return out


# op -> (value making ``x op c`` true, value making it false), as offsets from c (x on the left)
_SIDES = {"Equal": (0, 1), "Greater": (1, 0), "GreaterOrEqual": (0, -1), "Less": (-1, 0), "LessOrEqual": (0, 1)}


def branch_values(model: onnx.ModelProto) -> dict[str, list[int]]:
    """For each integer scalar input the graph compares with constants (``compared_values``),
    values that put it on both sides of every such comparison, the one ``random_inputs``
    feeds first: for ``sr == 16000``, 16000 and 16001. Fed one input at a time, they make
    every If whose condition is such a comparison run each of its branches (the oracle
    checks them all). An Equal's other side is the next value no Equal compares with."""
    comparisons = _comparisons(model)
    equal = {(n, c) for n, op, c, _ in comparisons if op == "Equal"}
    dtypes = {vi.name: helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) for vi in graph_inputs(model)}
    out: dict[str, list[int]] = {}
    for name, op, c, left in comparisons:
        values = out.setdefault(name, [])
        sides = _SIDES[op] if left or op == "Equal" else tuple(-d for d in _SIDES[op])
        for d in sides:
            v = c + d
            while op == "Equal" and d and (name, v) in equal:
                v += 1
            info = np.iinfo(dtypes[name])
            if info.min <= v <= info.max and v not in values:
                values.append(v)
    return out


def _tensor_shape(vi) -> tuple[int, ...] | None:
    typed = vi.type
    if not typed.HasField("tensor_type"):
        return None
    typed = typed.tensor_type
    if not typed.HasField("shape"):
        return None
    dims = []
    for d in typed.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:  # paddle2onnx writes "any size" as -1
            return None
        dims.append(d.dim_value)
    return tuple(dims)


def _infer_at(model: onnx.ModelProto, input_shapes: dict, want_values: bool) -> tuple[Shapes, bool]:
    """``infer_shapes`` at fixed input shapes, and whether every tensor's shape resolved."""
    out = Shapes(input_shapes=dict(input_shapes))
    g = model.graph
    for t in g.initializer:
        out.shape[t.name] = tuple(t.dims)
        out.dtype[t.name] = t.data_type

    # Inference on a skeleton (no weight bytes) with the inputs fixed.
    skeleton = _weightless(model)
    for inp in skeleton.graph.input:
        if inp.name not in out.input_shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        for d, v in zip(dims, out.input_shapes[inp.name]):
            d.Clear()
            d.dim_value = v
    try:
        inferred = infer_skeleton(skeleton)
        infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    except Exception as e:  # inference gives up on some custom graphs; onnxruntime may not
        log.debug("onnx shape inference failed: %s", e)
        infos = list(skeleton.graph.input)
    for vi in infos:
        s = _tensor_shape(vi)
        if s is not None and vi.name not in out.shape:
            out.shape[vi.name] = s
            out.dtype[vi.name] = vi.type.tensor_type.elem_type
    for name, s in out.input_shapes.items():
        out.shape[name] = s

    for t in g.initializer:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and math.prod(t.dims) <= 64:
            out.value[t.name] = tensor_array(t)

    produced = [o for n in g.node for o in n.output if o]
    missing = [n for n in produced if n not in out.shape]
    wanted = []
    if want_values:
        for node in g.node:
            for k in SIZE_INPUTS.get(node.op_type, ()):
                if k < len(node.input) and node.input[k] and node.input[k] not in out.value:
                    wanted.append(node.input[k])
    # what bodies read from this graph: their standalone runs need its sizes and values
    produced_here = set(produced)
    wanted.extend(sorted({name for node in g.node for _, body in bodies(node) for name in outer_reads(body)
                          if name in produced_here and name not in out.value}))
    fetch = sorted((set(missing) | set(wanted)) - set(out.input_shapes))  # inputs are data, not sizes
    if fetch:
        _fill_from_onnxruntime(model, out, fetch)
    return out, all(n in out.shape for n in produced)


# ONNX's data propagation keeps a value per element of 1-D tensors (~80 bytes each): it is
# for shape vectors, so a model with longer 1-D tensors (a 2^24 bias, a hostile 2^27 vector
# declared by a 200-byte file) is inferred without it.
DATA_PROP_MAX = 4096


def infer_skeleton(skeleton: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """ONNX shape inference on a weightless model, with data propagation where it is cheap."""
    plain = onnx.shape_inference.infer_shapes(skeleton, strict_mode=strict, data_prop=False)
    g = plain.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if len(dims) == 1 and dims[0].HasField("dim_value") and dims[0].dim_value > DATA_PROP_MAX:
            return plain
    return onnx.shape_inference.infer_shapes(skeleton, strict_mode=strict, data_prop=True)


def _fill_from_onnxruntime(model, out: Shapes, names):
    from ..runtime import session

    try:
        sess = session(model, optimize=False, outputs=tuple(names))
        feeds = random_inputs(model, out.input_shapes, np.random.default_rng(0))
        fetch = [o.name for o in sess.get_outputs()]
        results = sess.run(fetch, feeds)
    except Exception as e:
        log.info("onnxruntime could not run the model for shapes (%s); unknown shapes block their nodes",
                 str(e).splitlines()[0][:200])
        return
    for name, arr in zip(fetch, results):
        if not isinstance(arr, np.ndarray):
            continue
        out.shape[name] = tuple(arr.shape)
        out.dtype[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)
        if arr.dtype.kind in "iu" and arr.size <= 64:
            out.value[name] = arr
