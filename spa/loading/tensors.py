"""Where an initializer's bytes are and how spa reads them: in the model, or in external data
files that ``spa.loading.model.read`` checked and holds open; read one tensor at a time, or
memory-mapped where they lie (``weight_view``) so a session fed them holds no copy."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelLoadError
from .files import open_regular, pread_into

__all__ = ["tensor_array", "weight_view", "stored_bytes", "tensor_bytes", "release_mapped", "check_mapped",
           "has_external_data", "in_data_files", "materialized", "forget_files", "IN_PLACE_FILES"]

def _external_info(t: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def _elements(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            return -1
        n *= int(d)
    return n


# Sub-byte types are stored packed: this many values per byte.
_PACKED = {getattr(onnx.TensorProto, n): per for n, per in
           (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4)) if hasattr(onnx.TensorProto, n)}


def tensor_bytes(t: onnx.TensorProto) -> int:
    n = max(_elements(t), 0)
    if t.data_type in _PACKED:
        return -(-n // _PACKED[t.data_type])
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


# External data files by resolved path -> the descriptor opened and checked when the model
# was read. Tensors are read from it, never by opening the path again: a file swapped for a
# FIFO, a device or a link after the checks is not what spa reads. Reading the same path again
# (a new load) replaces the entry.
_DATA_FILES: dict[str, int] = {}


def _open_data_file(resolved: Path, where: str) -> int:
    """Open and check one external data file; its size."""
    fd = open_regular(resolved, "external data", ModelLoadError)
    register_data_file(str(resolved), fd)
    return os.fstat(fd).st_size


# Model files whose own weights are read where they lie in them (``in_place``): external data
# to read from, but the model's own file, not a data file beside it. Kept after the file is
# closed: a model read in place still refers to it (and reopens it by path to read).
IN_PLACE_FILES: set[str] = set()


def register_data_file(location: str, fd: int):
    """Read the tensors that name ``location`` from ``fd`` (an open, checked file) from now on;
    a descriptor and map held for it before are let go."""
    old = _DATA_FILES.pop(location, None)
    _MAPS.pop(location, None)
    if old is not None:
        os.close(old)
    _DATA_FILES[location] = fd


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """An initializer's value; external data is read from its file (only this tensor)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = _external_info(t)
    location = info["location"]
    fd = _DATA_FILES.get(location)
    if fd is not None:
        return _read_tensor(t, fd, location, info)
    # a model whose reader is gone (or that spa did not read): open, check and close again
    fd = open_regular(location, "external data", ModelLoadError)
    try:
        return _read_tensor(t, fd, location, info)
    finally:
        os.close(fd)


def weight_view(t: onnx.TensorProto) -> np.ndarray:
    """An initializer's value, read-only; external data is memory-mapped where it lies rather
    than read (a session fed it holds no copy: ``spa.runtime``)."""
    if t.data_location != onnx.TensorProto.EXTERNAL or t.data_type in _PACKED:
        return tensor_array(t)
    info = _external_info(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    offset = int(info.get("offset", 0))
    mapped = _mapping(info["location"])
    if mapped is None:
        return tensor_array(t)
    # at any offset: weights read in place lie where onnx.save put them, mostly not at a multiple
    # of their item size, and onnxruntime reads such an array where it lies (a 128 MB MatMul
    # weight at offset 3 fed to a session: no copy, the same product)
    count = _elements(t)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(tuple(int(d) for d in t.dims))


def stored_bytes(t: onnx.TensorProto):
    """A tensor's bytes as ONNX stores them (sub-byte types packed): its raw data, a view of
    the mapped file, or, for values kept in typed fields, the raw data they make."""
    if t.HasField("raw_data"):
        return t.raw_data
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = _external_info(t)
        offset, mapped = int(info.get("offset", 0)), _mapping(info["location"])
        if mapped is not None:
            check_mapped()
            return memoryview(mapped)[offset:offset + tensor_bytes(t)]
    return numpy_helper.from_array(tensor_array(t), t.name).raw_data


def forget_files(model: onnx.ModelProto):
    """Close the external data files spa holds open for ``model`` alone (a model of spilled
    weights once nothing reads it: its scratch file's space goes back then, not at exit)."""
    for location in {_external_info(t)["location"] for t in model.graph.initializer
                     if t.data_location == onnx.TensorProto.EXTERNAL} - IN_PLACE_FILES:   # (the input's: its reader's)
        _MAPS.pop(location, None)       # arrays still viewing the map keep it until they go
        fd = _DATA_FILES.pop(location, None)
        if fd is not None:
            os.close(fd)


# Read-only maps of the external data files spa read (path -> mmap); arrays viewing one keep it alive.
_MAPS: dict[str, mmap.mmap] = {}


def check_mapped():
    """Raise if a mapped external data file shrank since it was mapped: reading past its end
    would kill the process (SIGBUS) where a read gives a clear error. Done before each run
    of a session fed from the maps; a file changed in place is not caught."""
    for location, mapped in list(_MAPS.items()):
        fd = _DATA_FILES.get(location)
        if fd is not None and os.fstat(fd).st_size < len(mapped):
            raise ModelLoadError(f"{location}: external data file shrank while spa read it (changed by "
                                 "another program?)")


def _mapping(location: str) -> mmap.mmap | None:
    fd = _DATA_FILES.get(location)
    if fd is None:
        return None
    mapped = _MAPS.get(location)
    if mapped is None:
        try:
            mapped = _MAPS[location] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):   # an empty file, or one that cannot be mapped: read instead
            return None
    return mapped


def release_mapped(trim: bool = True):
    """Drop the pages of the mapped external data from this process's memory (arrays viewing
    them read them again from the page cache, or the file), and give freed heap memory back
    to the system: a stage that read every weight does not leave them counted against the
    next one."""
    for mapped in _MAPS.values():
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):   # no madvise here, or a closed map
            pass
    if trim:
        _trim_heap()


def _trim_heap():
    """glibc keeps freed blocks of the sizes a program allocated often (its mmap threshold
    grows to the largest array freed): weights read one at a time stayed resident, 0.45x of
    a decoder after l1 scored it. malloc_trim returns them; elsewhere nothing to do."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _read_tensor(t: onnx.TensorProto, fd: int, location: str, info: dict) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    where, offset = f"{location}: tensor {t.name!r}", int(info.get("offset", 0))
    if t.data_type in _PACKED:   # several values a byte: let onnx unpack the raw bytes
        raw = bytearray(tensor_bytes(t))
        pread_into(fd, memoryview(raw), offset, where, ModelLoadError)
        return numpy_helper.to_array(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                                                      raw_data=bytes(raw)))
    arr = np.empty(tuple(int(d) for d in t.dims), dtype=dtype)
    pread_into(fd, memoryview(arr.reshape(-1).view(np.uint8)), offset, where, ModelLoadError)
    return arr


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def in_data_files(model: onnx.ModelProto) -> bool:
    """Whether some weight of ``model`` lies in an external data file, not in the memory or the
    .onnx file of the model it was read from (``in_place``)."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL and _external_info(t).get("location") not in IN_PLACE_FILES
               for t in model.graph.initializer)


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every external tensor read into memory (what onnxruntime needs from bytes)."""
    if not has_external_data(model):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t.CopyFrom(numpy_helper.from_array(tensor_array(t), t.name))
    return m
