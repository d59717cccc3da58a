"""Writing a model: one file, or the structure and its weights in ``<name>.data`` beside it,
a tensor at a time either way, atomically, never over a file spa reads or did not write."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..errors import OutputPathError
from .files import atomic_files, check_outputs, check_side_file, read_small
from .tensors import _external_info, in_data_files, release_mapped, stored_bytes, tensor_bytes
from .weight_files import WeightWriter, link_into, linkable_scratch, spillable, write_slices

__all__ = ["save", "output_paths", "copy_fields", "EXTERNAL_ABOVE"]


def output_paths(output_path: str | os.PathLike) -> dict[str, Path]:
    """The files saving a model to ``output_path`` may write."""
    out = Path(output_path)
    if not out.name or str(output_path).endswith(os.sep):
        raise OutputPathError(f"-o {str(output_path)!r}: names no file (give a path such as small.onnx)")
    return {"-o": out, "-o's weight file": out.with_name(out.name + ".data")}


def copy_fields(src, dst, skip: set[str]):
    """Copy a protobuf message's set fields except ``skip`` (to rebuild a model without
    copying the bytes of its weights)."""
    for desc, value in src.ListFields():
        if desc.name in skip:
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__.startswith("Repeated"):
            getattr(dst, desc.name).extend(value)
        elif desc.message_type:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


# Above this many weight bytes a model is written with its weights in one external file.
EXTERNAL_ABOVE = 1_800_000_000


def save(model: onnx.ModelProto, path: str | os.PathLike, inputs: dict[str, Path] | None = None,
         one_file: bool | None = None) -> list[Path]:
    """Write atomically: temporary files in the same directory, then renames. Large models
    (or, unless ``one_file``, ones whose weights still live in an external data file) get
    their weights streamed, one tensor at a time, into ``<name>.data`` beside the model; the
    rest are written as one file, also a tensor at a time. ``inputs`` (what each file is ->
    path) are never written over. Returns the files written."""
    outputs = output_paths(path)
    check_outputs(outputs, inputs or {})
    out, data = outputs["-o"], outputs["-o's weight file"]
    external = (not one_file and in_data_files(model)) or \
        sum(tensor_bytes(t) for t in model.graph.initializer) > EXTERNAL_ABOVE
    if external:
        check_side_file(data, lambda: _keeps_weights_in(out, data.name), "the weight file of -o", "-o")
        with atomic_files(data, out) as (data_tmp, tmp):
            onnx.save(_with_streamed_weights(model, data_tmp, data.name), tmp)
        return [out, data]
    with atomic_files(out) as (tmp,):
        _write_one_file(model, tmp)
    return [out]


def _write_one_file(model: onnx.ModelProto, path: str):
    """The file ``onnx.save`` writes (fields in another order, the same model), a weight at a
    time: ``onnx.save`` serializes the whole model first, a second copy of its weights in memory.
    Weights that lie elsewhere (read in place from the input's file, or in a scratch file) are
    written into this one from there, a slice at a time."""
    structure, graph = onnx.ModelProto(), onnx.GraphProto()
    copy_fields(model, structure, skip={"graph"})
    copy_fields(model.graph, graph, skip={"initializer"})
    parts = [_tensor_parts(t) for t in model.graph.initializer]
    sizes = [_size(head, raw) for head, raw in parts]
    body = graph.SerializeToString()
    length = len(body) + sum(1 + len(_varint(n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(structure.SerializeToString())
        f.write(_key(7) + _varint(length) + body)                  # ModelProto.graph
        for (head, raw), n, t in zip(parts, sizes, model.graph.initializer):
            f.write(_key(5) + _varint(n))                            # GraphProto.initializer
            if raw is None:
                f.write(t.SerializeToString())
                continue
            f.write(head + _key(9) + _varint(raw))                   # TensorProto.raw_data, then its bytes
            write_slices(f, stored_bytes(t))


def _tensor_parts(t: onnx.TensorProto) -> tuple[bytes | int, int | None]:
    """An external tensor's fields but its reference (serialized) and its byte count; for a
    tensor held in memory, its serialized size and None."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return t.ByteSize(), None
    head = onnx.TensorProto()
    head.CopyFrom(t)
    head.ClearField("external_data")
    head.ClearField("data_location")
    return head.SerializeToString(), tensor_bytes(t)


def _size(head: bytes | int, raw: int | None) -> int:
    """The serialized size of a tensor from ``_tensor_parts``."""
    return head if raw is None else len(head) + 1 + len(_varint(raw)) + raw


def _key(field: int) -> bytes:
    """A length-delimited field's key."""
    return _varint(field << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _keeps_weights_in(path: Path, name: str) -> bool:
    """Whether the ONNX file ``path`` (a structure without its weights: at most 256 MB)
    reads external data from ``name``."""
    data = read_small(path, 256 << 20)
    try:
        model = onnx.load_model_from_string(data) if data else None
    except Exception:  # noqa: BLE001 - not an ONNX file: it refers to nothing
        return False
    return model is not None and any(e.key == "location" and e.value == name
                                     for t in model.graph.initializer for e in t.external_data)


def _with_streamed_weights(model: onnx.ModelProto, data_path: str, location: str) -> onnx.ModelProto:
    """The model's structure, with every weight of 1 KB or more appended to ``data_path`` and
    referenced there as ``location``; never more than one tensor in memory. A scratch file the
    weights fill exactly becomes ``data_path`` itself where it can (``link_into``), and only the
    rest is appended."""
    proto = onnx.ModelProto()
    copy_fields(model, proto, skip={"graph"})
    copy_fields(model.graph, proto.graph, skip={"initializer"})
    scratch = linkable_scratch(model)
    linked = scratch is not None and link_into(scratch, data_path)
    with open(data_path, "r+b" if linked else "wb") as f:
        f.seek(0, os.SEEK_END)
        out = WeightWriter(f, location)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL and not spillable(t):
                proto.graph.initializer.append(t)    # small, or strings (no raw bytes): in the model
            elif linked and t.data_location == onnx.TensorProto.EXTERNAL and _external_info(t)["location"] == scratch:
                proto.graph.initializer.append(_relocated(t, location))
            else:
                # the bytes as stored (one copy at most: protobuf's bytes), a mapped file's pages
                # written and dropped a slice at a time
                proto.graph.initializer.append(out.put(t, stored_bytes(t)))
                release_mapped()
    return proto


def _relocated(t: onnx.TensorProto, location: str) -> onnx.TensorProto:
    """``t``'s reference, to the same bytes in the file named ``location``."""
    ref = onnx.TensorProto()
    ref.CopyFrom(t)
    for entry in ref.external_data:
        if entry.key == "location":
            entry.value = location
    return ref
