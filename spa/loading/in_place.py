"""A model whose weights are inside its .onnx file, read without copying them into memory.

``onnx.load`` reads the whole file and parses it: the bytes and the parsed weights are two
copies at once, and the weights stay in the protobuf for the whole run, where every read
of one hands out yet another copy (a 0.15B decoder saved as one file peaked at 4.2x its size
in ``spa prune``, 1.05x with its weights in external data). Here the file is mapped and only
its structure parsed: each main-graph initializer's raw bytes stay where they lie in the file
and the tensor refers to them as external data does (location, offset, length), so the rest
of spa reads them as it reads external data: one tensor at a time, or mapped.

Only protobuf's wire format is read here (field numbers from onnx.proto: ModelProto.graph 7,
GraphProto.initializer 5, TensorProto.segment 3, raw_data 9, external_data 13, data_location
14); any file not laid out as expected gets None, and is then parsed whole as before (with the
same errors for a broken file)."""

from __future__ import annotations

import onnx
from google.protobuf.message import DecodeError

from .tensors import tensor_bytes

__all__ = ["parse_in_place", "IN_PLACE_MIN"]

# Raw bytes of at least this many stay in the file (smaller ones, as for external data: in memory)
IN_PLACE_MIN = 4097

class _Malformed(Exception):
    pass


# A key or a length is a 32-bit varint: at most 5 bytes (protobuf refuses longer ones there)
_SHORT = 5
# Fields one initializer may have before it is kept whole (name, dims, type, raw data and a few
# others: one with more holds its values in typed fields, one field per value), and fields the
# graph and the model may have before the file is parsed whole: the reader spends Python time
# per field, where protobuf's parser spends C time.
_TENSOR_FIELDS, _FIELDS = 64, 2_000_000
_GRAPH, _INITIALIZER, _SEGMENT, _RAW_DATA, _EXTERNAL_DATA, _DATA_LOCATION = 7, 5, 3, 9, 13, 14
_LENGTH_DELIMITED = 2


def _varint(buf, pos: int, end: int, most: int = 10) -> tuple[int, int]:
    value, shift = 0, 0
    for _ in range(most):
        if pos >= end:
            break
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Malformed


def _fields(buf, start: int, end: int):
    """(field number, wire type, where the field starts, where its value starts and ends) of
    each field of the message in ``buf[start:end]``."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end, _SHORT)
        wire = key & 7
        if wire == 0:
            value_end = _varint(buf, pos, end)[1]
        elif wire == 1:
            value_end = pos + 8
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(buf, pos, end, _SHORT)
            if length >= 1 << 31:
                raise _Malformed
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:                       # groups (deprecated) or garbage
            raise _Malformed
        if value_end > end or key >> 3 == 0:
            raise _Malformed
        yield key >> 3, wire, first, pos, value_end
        pos = value_end


def _initializer(buf, start: int, end: int) -> tuple[list[tuple[int, int]], int | None, int]:
    """One initializer: the spans of its bytes without its raw data, and where the raw data
    lies (offset, length); or the span of all of it and None where it stays whole (small,
    external, in segments, in typed fields, or its raw data given twice)."""
    whole = [(start, end)], None, 0
    rest, raw = [], []
    for count, (field, wire, first, value_start, value_end) in enumerate(_fields(buf, start, end)):
        if field in (_EXTERNAL_DATA, _SEGMENT) or count >= _TENSOR_FIELDS or \
                field == _DATA_LOCATION and _varint(buf, value_start, value_end)[0]:
            return whole            # (DEFAULT, 0, is often written out)
        if field == _RAW_DATA and wire == _LENGTH_DELIMITED:
            raw.append((value_start, value_end - value_start))
        else:
            rest.append((first, value_end))
    if len(raw) != 1 or raw[0][1] < IN_PLACE_MIN:
        return whole
    return rest, raw[0][0], raw[0][1]


def _joined(buf, spans: list[tuple[int, int]]) -> bytes:
    """The bytes of ``spans``, those that touch merged into one slice each."""
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return b"".join(buf[a:b] for a, b in merged)


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
    model_spans, graph_spans, initializers = [], [], []
    fields = 0
    for field, wire, first, value_start, value_end in _fields(buf, 0, len(buf)):
        if field != _GRAPH or wire != _LENGTH_DELIMITED:
            model_spans.append((first, value_end))
            continue
        for g_field, g_wire, g_first, g_start, g_end in _fields(buf, value_start, value_end):
            fields += 1
            if fields > _FIELDS:
                raise _Malformed
            if g_field == _INITIALIZER and g_wire == _LENGTH_DELIMITED:
                initializers.append(_initializer(buf, g_start, g_end))
            else:
                graph_spans.append((g_first, g_end))
    if not any(offset is not None for _, offset, _ in initializers):
        return None
    model = onnx.ModelProto.FromString(_joined(buf, model_spans))
    model.graph.MergeFromString(_joined(buf, graph_spans))
    in_place = []
    for spans, offset, length in initializers:
        t = model.graph.initializer.add()
        t.ParseFromString(_joined(buf, spans))
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
