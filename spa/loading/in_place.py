"""A model whose weights are inside its .onnx file, read without copying them into memory.

``onnx.load`` reads the whole file and parses it: the bytes and the parsed weights are two
copies at once, and the weights stay in the protobuf for the whole run, where every read
of one hands out yet another copy (a 0.15B decoder saved as one file peaked at 4.2x its size
in ``spa prune``, 1.05x with its weights in external data). Here the file is mapped and only
its structure parsed: each main-graph initializer's raw bytes stay where they lie in the file
and the tensor refers to them as external data does (location, offset, length), so the rest
of spa reads them as it reads external data: one tensor at a time, or mapped.

Only protobuf's wire format is read here (field numbers from onnx.proto: ModelProto.graph 7,
GraphProto.initializer 5, TensorProto.raw_data 9, external_data 13, data_location 14); any
file not laid out as expected gets None, and is then parsed whole as before (with the same
errors for a broken file)."""

from __future__ import annotations

import onnx
from google.protobuf.message import DecodeError

from .tensors import tensor_bytes

__all__ = ["parse_in_place", "IN_PLACE_MIN"]

# Raw bytes of at least this many stay in the file (smaller ones, as for external data: in memory)
IN_PLACE_MIN = 4097

_GRAPH, _INITIALIZER, _RAW_DATA, _EXTERNAL_DATA, _DATA_LOCATION = 7, 5, 9, 13, 14
_LENGTH_DELIMITED = 2


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, where the field starts, where its value starts and ends) of
    each field of the message in ``buf[start:end]``."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        wire = key & 7
        if wire == 0:
            value_end = _varint(buf, pos, end)[1]
        elif wire == 1:
            value_end = pos + 8
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(buf, pos, end)
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:                       # groups (deprecated) or garbage
            raise _Malformed
        if value_end > end:
            raise _Malformed
        yield key >> 3, wire, first, pos, value_end
        pos = value_end


def _initializer(buf, start: int, end: int) -> tuple[bytes, int | None, int]:
    """One initializer: its bytes without its raw data, and where the raw data lies (offset,
    length); or all its bytes and None where it stays whole (small, external, or raw data
    given twice)."""
    rest, raw = [], []
    for field, wire, first, value_start, value_end in _fields(buf, start, end):
        if field == _EXTERNAL_DATA or field == _DATA_LOCATION and _varint(buf, value_start, value_end)[0]:
            return buf[start:end], None, 0          # external already (DEFAULT, 0, is often written out)
        if field == _RAW_DATA and wire == _LENGTH_DELIMITED:
            raw.append((value_start, value_end - value_start))
        else:
            rest.append(buf[first:value_end])
    if len(raw) != 1 or raw[0][1] < IN_PLACE_MIN:
        return buf[start:end], None, 0
    return b"".join(rest), raw[0][0], raw[0][1]


def _stored_bytes(t: onnx.TensorProto) -> int | None:
    if t.data_type == onnx.TensorProto.STRING or any(d < 0 for d in t.dims):
        return None
    try:
        return tensor_bytes(t)
    except Exception:  # noqa: BLE001 - an unknown type: the whole parse reports it
        return None


def parse_in_place(buf) -> tuple[onnx.ModelProto, list[int]] | None:
    """The model serialized in ``buf`` (the file's bytes, mapped), and the indices of the main
    graph's initializers whose raw bytes were left in ``buf``: each refers to them as external
    data (offset and length; its location is for the caller to set). None where no raw data
    is large enough to leave, or the bytes are not what this reader expects."""
    try:
        return _parse(buf)
    except (_Malformed, DecodeError, ValueError, OverflowError):
        return None


def _parse(buf):
    model_parts, graph_parts, initializers = [], [], []
    for field, wire, first, value_start, value_end in _fields(buf, 0, len(buf)):
        if field != _GRAPH or wire != _LENGTH_DELIMITED:
            model_parts.append(buf[first:value_end])
            continue
        for g_field, g_wire, g_first, g_start, g_end in _fields(buf, value_start, value_end):
            if g_field == _INITIALIZER and g_wire == _LENGTH_DELIMITED:
                initializers.append(_initializer(buf, g_start, g_end))
            else:
                graph_parts.append(buf[g_first:g_end])
    if not any(offset is not None for _, offset, _ in initializers):
        return None
    model = onnx.ModelProto.FromString(b"".join(model_parts))
    model.graph.MergeFromString(b"".join(graph_parts))
    in_place = []
    for rest, offset, length in initializers:
        t = model.graph.initializer.add()
        t.ParseFromString(rest)
        if offset is None:
            continue
        if t.HasField("raw_data") or _stored_bytes(t) != length:
            # raw data the reader would take differently, or a size the dims do not declare:
            # the whole parse keeps or reports it as it always did
            return None
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", ""), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
        in_place.append(len(model.graph.initializer) - 1)
    return model, in_place
