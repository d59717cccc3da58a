"""Sizes for the symbolic input dims nobody fixed: the probe.

Channels do not depend on spatial or sequence sizes, so a model whose inputs leave H, W or
the sequence length open is analyzed at sizes spa picks itself: from the model's metadata or
the dim's name where they say something, else from candidates (images: 224, 320, 640, then
multiples of 32; sequences and other dims: 16, 128, ...), the first at which onnxruntime runs
the model on random inputs and every tensor's shape resolves. A dim name shared by several
inputs gets one size; a symbolic leading dim is the batch (1), as is a dim named batch,
unless its name says otherwise (``seq_len`` leading a sequence-first input is probed). When
no candidates run the model, an unnamed dim that may be the batch carried by another input
(the first open dim of an input whose leading dim is static, as the batch of a recurrent
state ``[layers, batch, hidden]``) is also tried at the batch size, 1. The
written model keeps its symbolic dims; the oracle also runs at a second probe
(``second_probe``), so a size constant that held only for the first is caught.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import InputShapeError
from .body_shapes import fill_body_shapes
from .model import opset_of
from .shapes import (MAX_INPUT_VALUES, Shapes, _check_input_size, _fixed_input_shapes, _infer_at, compared_values,
                     graph_inputs, is_open, random_inputs, too_large)

__all__ = ["infer_shapes", "choose_probe", "second_probe", "describe", "IMAGE_SIZES", "OTHER_SIZES"]

log = logging.getLogger(__name__)

IMAGE_SIZES = (224, 320, 640) + tuple(32 * k for k in range(1, 21) if 32 * k not in (224, 320, 640))
OTHER_SIZES = (16, 128, 64, 32, 256, 512, 8, 1024, 4, 2, 1)
MAX_TRIES = 32   # forward runs at most, before giving up
_PRODUCT = 3     # several dims: after trying them in lockstep, every mix of their first 3 sizes

_BATCH_WORDS = {"batch", "batchsize", "bs", "nbatch"}
_IMAGE_WORDS = {"height", "width", "h", "w", "img", "image", "rows", "cols"}
_SEQ_WORDS = {"s", "t", "l", "len", "seq", "seqlen", "sequence", "length", "token", "tokens", "time",
              "frames", "frame", "steps", "past", "total", "context"}
_IMAGE_KEYS = {"imgsz", "img_size", "image_size", "imagesize", "input_size", "resolution", "input_shape",
               "input_resolution", "size", "shape"}


@dataclass
class Dim:
    """One symbolic size: every (input, axis) that bears its name, and the sizes to try."""

    name: str                                             # the dim_param, or "?" when unnamed
    key: str = ""
    places: list = field(default_factory=list)            # (input, axis)
    kind: str | None = None                               # image, sequence; None: unknown
    candidates: list = field(default_factory=list)        # (size, "metadata" | "name" | "candidate" | "batch")
    batch: int | None = None                              # index of the batch size (1) among them, if it may be one

    @property
    def label(self) -> str:
        return self.key.lstrip("?")


def _words(name: str) -> tuple[set, str]:
    text = re.sub(r"([a-z])([A-Z])", r"\1_\2", name)
    return set(re.findall(r"[a-z]+", text.lower())), name.lower()


def _kind_of_name(name: str) -> str | None:
    words, text = _words(name)
    if words & _BATCH_WORDS or "batch" in text:
        return "batch"
    if words & _IMAGE_WORDS or "height" in text or "width" in text:
        return "image"
    if words & _SEQ_WORDS or "seq" in text or "length" in text:
        return "sequence"
    return None


def _role(name: str, place, shapes: dict) -> str | None:
    """"h" or "w" for an image dim: from its name, else its position in a rank-4 input
    (NCHW, or NHWC where axis 3 is the fixed one)."""
    words, text = _words(name)
    if "height" in text or "h" in words:
        return "h"
    if "width" in text or "w" in words:
        return "w"
    inp, axis = place
    dims = shapes[inp]
    if len(dims) == 4 and axis in (1, 2, 3):
        spatial = (1, 2) if dims[3] is not None and dims[1] is None else (2, 3)
        if axis in spatial:
            return "hw"[spatial.index(axis)]
    return None


def _metadata(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Metadata entries whose value is a number or a list of numbers ("640", "[1, 3, 384, 384]")."""
    out = {}
    for p in model.metadata_props:
        if re.fullmatch(r"[\s\[\](),\d]+", p.value or "") and re.search(r"\d", p.value):
            out[p.key.lower()] = [int(v) for v in re.findall(r"\d+", p.value)]
    return out


def _hint(dim: Dim, role: str | None, meta: dict[str, list[int]]) -> int | None:
    """The size the metadata gives for ``dim``, if any."""
    if dim.name.lower() in meta:
        return meta[dim.name.lower()][0]
    for key, nums in meta.items():
        if dim.kind == "image" and role:
            word = "height" if role == "h" else "width"
            if word in key and len(nums) == 1:
                return nums[0]
            if key in _IMAGE_KEYS:
                return nums[0] if len(nums) == 1 else nums[-2 if role == "h" else -1]
        if dim.kind == "sequence" and len(nums) == 1 and ("seq" in key or "length" in key or "max_len" in key):
            return nums[0]
    return None


def _declared(model: onnx.ModelProto) -> dict[str, list]:
    return {vi.name: [d.dim_param or None for d in vi.type.tensor_type.shape.dim] for vi in graph_inputs(model)}


def _key(declared: dict, inp: str, axis: int) -> str:
    """Dims that share a name share a size; an unnamed dim is its own."""
    return declared[inp][axis] or f"?{inp}[{axis}]"


def _open_dims(model: onnx.ModelProto, shapes: dict) -> tuple[list[Dim], dict]:
    """The symbolic dims ``shapes`` leaves open (None), grouped by name, with their sizes to
    try; and the sizes set without trying (batch dims; names --input-shape fixed elsewhere)."""
    declared = _declared(model)
    fixed = {}  # a dim name the user fixed in one input holds in every input
    for inp, shape in shapes.items():
        for axis, size in enumerate(shape):
            if size is not None and declared[inp][axis]:
                fixed.setdefault(declared[inp][axis], size)
    dims: dict[str, Dim] = {}
    for inp, shape in shapes.items():
        for axis, size in enumerate(shape):
            key = _key(declared, inp, axis)
            if size is None and key not in fixed:
                dims.setdefault(key, Dim(declared[inp][axis] or "?", key)).places.append((inp, axis))
    meta = _metadata(model)
    found = []
    for dim in dims.values():
        named = _kind_of_name(dim.name) if dim.name != "?" else None
        if named == "batch" or (named is None and any(axis == 0 for _, axis in dim.places)):
            fixed[dim.key] = 1  # the batch (a symbolic leading dim, or so named) is 1, as always: no probe
            continue
        rank4 = any(len(shapes[inp]) == 4 and axis > 0 for inp, axis in dim.places)
        dim.kind = named or ("image" if rank4 else None)
        role = next((r for r in (_role(dim.name, p, shapes) for p in dim.places) if r), None) \
            if dim.kind == "image" else None
        hint = _hint(dim, role, meta)
        source = "name" if named else "candidate"
        sizes = IMAGE_SIZES if dim.kind == "image" else OTHER_SIZES
        dim.candidates = ([(hint, "metadata")] if hint and hint >= 1 else []) + [
            (s, source) for s in sizes if s != hint]
        found.append(dim)
    leading = [vi.type.tensor_type.shape.dim[0] for vi in graph_inputs(model) if vi.type.tensor_type.shape.dim]
    batched = any(is_open(d) and _kind_of_name(d.dim_param) in (None, "batch") for d in leading)
    for dim in found:
        if batched and dim.kind is None and any(_carries_batch(shapes[inp], axis) for inp, axis in dim.places):
            dim.batch = next(k for k, (s, _) in enumerate(dim.candidates) if s == 1)
            dim.candidates[dim.batch] = (1, "batch")
    return found, fixed


def _carries_batch(shape: tuple, axis: int) -> bool:
    """Whether ``axis`` may carry the batch of another input (one whose leading dim is open,
    even where --input-shape fixed it): the first open dim of an input whose leading dim is
    static (a recurrent state [layers, batch, hidden] beside [batch, ...])."""
    return shape[0] is not None and axis == shape.index(None)


def _tries(dims: list[Dim]):
    """Assignments (one candidate index per dim): in lockstep; in lockstep again with the dims
    that may be a batch at 1 (``Dim.batch``); then mixes of the first few."""
    seen = set()
    longest = max(len(d.candidates) for d in dims)
    lockstep = (tuple(min(k, len(d.candidates) - 1) for d in dims) for k in range(longest))
    batch = (tuple(min(k, len(d.candidates) - 1) if d.batch is None else d.batch for d in dims)
             for k in range(longest if any(d.batch is not None for d in dims) else 0))
    mixes = itertools.product(*(range(min(_PRODUCT, len(d.candidates))) for d in dims))
    for pick in itertools.chain(lockstep, batch, mixes):
        if pick not in seen:
            seen.add(pick)
            yield pick


def _assign(model, shapes: dict, fixed: dict, dims: list[Dim] = (), pick=()) -> dict:
    """``shapes`` with its open dims set: the probed ones to ``pick``, the others from ``fixed``."""
    declared = _declared(model)
    sizes = dict(fixed)
    sizes.update((d.key, d.candidates[k][0]) for d, k in zip(dims, pick))
    return {inp: tuple(sizes.get(_key(declared, inp, a)) if s is None else s for a, s in enumerate(shape))
            for inp, shape in shapes.items()}


class _Runner:
    """One onnxruntime session of the original, run at the sizes a probe tries."""

    def __init__(self, model: onnx.ModelProto, in_parts: bool = False):
        from ..runtime import session
        from ..score.blocks import PartwiseSession
        self.model, self.error = model, None
        try:
            self.session = PartwiseSession(model, optimize=False, whole=False) if in_parts \
                else session(model, optimize=False)
        except Exception as e:
            self.session, self.error = None, _first_line(e)

    def fails(self, shapes: dict) -> str | None:
        """Why the model does not run at ``shapes`` (None: it runs)."""
        try:
            self.session.run(None, random_inputs(self.model, shapes, np.random.default_rng(0)))
            return None
        except Exception as e:
            return _first_line(e)


def _first_line(e: Exception) -> str:
    """onnxruntime's message without its prefix and source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Status Message: /\S+:\d+ .*? was false\. ", "Status Message: ", text)
    return text[:240]


def _info(dims: list[Dim], pick, with_source: bool = True) -> dict:
    out: dict = {}
    for d, k in zip(dims, pick):
        size, source = d.candidates[k]
        for inp, axis in d.places:
            entry = {"dim": d.name if d.name != "?" else d.label, "size": int(size)}
            if with_source:
                entry["from"] = source
            out.setdefault(inp, {})[axis] = entry
    return out


def choose_probe(model: onnx.ModelProto, shapes: dict, infer):
    """The Shapes of ``model`` analyzed by ``infer(input_shapes) -> (Shapes, resolved)`` at
    ``shapes`` (each input's dims, None where symbolic and not fixed by --input-shape), with
    the open dims set to the first probe at which onnxruntime runs the model and every shape
    resolves. ``Shapes.probe`` says which sizes were chosen and why (empty: none needed)."""
    dims, fixed = _open_dims(model, shapes)
    base = _assign(model, shapes, fixed)
    if not dims:
        _check_input_size(base)
        return infer(base)[0]
    runner = _Runner(model)
    tried, errors, fallback = [], [], None
    for pick in _tries(dims):
        if len(tried) >= MAX_TRIES:
            break
        at = _assign(model, shapes, fixed, dims, pick)
        if too_large(at):
            continue
        tried.append(pick)
        if runner.session is not None:
            why = runner.fails(at)
            if why:
                errors.append(why)
                continue
        out, resolved = infer(at)
        if resolved:
            return _chosen(out, dims, pick, len(tried), runner)
        if fallback is None and runner.session is not None:
            fallback = (out, pick)  # it runs, but some shape stays unknown: those nodes block
    if fallback is not None:
        return _chosen(fallback[0], dims, fallback[1], len(tried), runner)
    names = ", ".join(d.label for d in dims)
    lists = {d.label: ", ".join(str(d.candidates[k][0]) for k in sorted({p[i] for p in tried}))
             for i, d in enumerate(dims)}
    sizes = "; ".join(f"{k}: {v}" for k, v in lists.items()) if len(set(lists.values())) > 1 else \
        f"{next(iter(lists.values()))}" + (" for each" if len(lists) > 1 else "")
    if runner.session is None:
        why = f"onnxruntime cannot load the model ({runner.error}) and shape inference leaves shapes unknown"
    else:
        why = "onnxruntime runs the model at none of them" + (f" (last: {errors[-1]})" if errors else "")
    if not tried:
        sizes, why = "none", f"every candidate is over {MAX_INPUT_VALUES} input values"
    raise InputShapeError(f"cannot choose sizes for the symbolic dims {names} (tried {sizes}): {why}; "
                          f"pass {_template(base)}")


def _template(shapes: dict) -> str:
    return " ".join(f"--input-shape {inp}=" + ",".join("N" if s is None else str(s) for s in shape)
                    for inp, shape in shapes.items() if None in shape)


def _chosen(out, dims: list[Dim], pick, tried: int, runner: _Runner):
    out.probe = {"inputs": _info(dims, pick), "tried": tried}
    values = compared_values(runner.model)
    if values:  # random_inputs fed these the value the graph compares them with: say which branch ran
        out.probe["values"] = values
    if runner.session is None:
        out.probe["ran"] = f"not run: onnxruntime cannot load the model ({runner.error})"
    log.info("%s", describe(out.probe))
    return out


def second_probe(model: onnx.ModelProto, shapes) -> tuple[dict | None, dict]:
    """Other sizes for the dims ``shapes.probe`` chose, the first at which the original
    ``model`` runs (each probed dim at a new size, where it has one to try): those input
    shapes, and what the report says about them (or why there are none)."""
    chosen = {inp: {a: e for a, e in axes.items() if e.get("from") != "batch"}  # a batch stays 1
              for inp, axes in shapes.probe.get("inputs", {}).items()}
    open_shapes = {inp: tuple(None if a in chosen.get(inp, {}) else s for a, s in enumerate(shape))
                   for inp, shape in shapes.input_shapes.items()}
    dims, fixed = _open_dims(model, open_shapes)
    if not dims:
        return None, {"skipped": "the only dims spa chose are batch sizes, which stay 1"}
    first = [chosen[d.places[0][0]][d.places[0][1]]["size"] for d in dims]
    from ..score.blocks import in_parts
    # after pruning, beside the pruned model and its plan: a large original runs in parts
    runner = _Runner(model, in_parts=in_parts(model))
    if runner.session is None:
        return None, {"skipped": f"onnxruntime cannot load the model ({runner.error})"}
    tried = 0
    for pick in _tries(dims):
        if any(d.candidates[k][0] == f and len(d.candidates) > 1 for d, k, f in zip(dims, pick, first)):
            continue
        at = _assign(model, open_shapes, fixed, dims, pick)
        if too_large(at):
            continue
        tried += 1
        if runner.fails(at) is None:
            return at, {"inputs": _info(dims, pick, with_source=False)}
        if tried >= MAX_TRIES:
            break
    return None, {"skipped": f"the original runs at no other size of {', '.join(d.label for d in dims)} "
                             f"({tried} tried), so it was verified at the first probe only"}


def describe(probe: dict) -> str:
    """One line: the sizes chosen (and where from), and the second probe if there was one."""
    def sizes(inputs, source):
        seen = {}
        for axes in inputs.values():
            for e in axes.values():
                seen.setdefault(e["dim"], f"{e['size']}" + (f" ({e['from']})" if source else ""))
        return ", ".join(f"{k}={v}" for k, v in seen.items())
    text = f"symbolic input dims analyzed at {sizes(probe.get('inputs', {}), True)}"
    if probe.get("values"):
        text += " with " + ", ".join(f"{k}={v}" for k, v in probe["values"].items()) + \
            " (a value the graph compares with)"
    second = probe.get("second")
    if second and "inputs" in second:
        text += f", verified also at {sizes(second['inputs'], False)}"
    elif second:
        text += f"; no second probe: {second['skipped']}"
    return text + "; --input-shape chooses others"


def infer_shapes(model: onnx.ModelProto, overrides: dict | None = None,
                 want_values: bool = True) -> Shapes:
    """Static shapes for every tensor, from ONNX shape inference, completed by one
    onnxruntime run (random inputs) for whatever inference left symbolic or unknown. Input
    dims ``overrides`` leave symbolic get probe sizes (``spa.loading.probe``; ``Shapes.probe`` says which)."""
    shapes = choose_probe(model, _fixed_input_shapes(model, overrides or {}),
                          lambda input_shapes: _infer_at(model, input_shapes, want_values))
    fill_body_shapes(model, shapes, lambda sub, input_shapes: _infer_at(sub, input_shapes, want_values)[0],
                     opset_of(model))
    return shapes
