"""The ``.npz`` files a user hands spa (``--calib``, ``--eval``) and what is measured on them.

Only the arrays the model reads are decompressed: each is checked from its header (a number
type, a size within bounds) before a byte of it is inflated, so a small file declaring a huge
array, or holding arrays nobody asked for, costs nothing. Both the library and the command
line read data here.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile

import numpy as np
import onnx

from ..errors import SpaError
from .files import check_readable, open_regular
from .shapes import graph_inputs

__all__ = ["read_npz", "npy_header", "calibration_data", "eval_data", "accuracy", "array_limit"]

# Kinds of number onnxruntime takes as model inputs and labels: bool, ints, floats.
_NUMBER_KINDS = "biuf"

# The longest .npy header read: numpy writes a few hundred bytes (a 64-D shape fits in 2 KiB)
MAX_NPY_HEADER = 64 << 10


def npy_header(member, where: str, error=SpaError) -> tuple[tuple, bool, np.dtype]:
    """(shape, Fortran order, dtype) of the ``.npy`` stream ``member``, left at its data.

    numpy's ``read_array_header_*`` reads the whole header before its own size check, so a
    member declaring a 300 MB header costs 300 MB: the magic and the length field are read
    here first, and a header past :data:`MAX_NPY_HEADER` is refused unread."""
    prefix = member.read(8)             # b"\x93NUMPY", then the major and minor version
    if len(prefix) < 8 or prefix[:6] != np.lib.format.MAGIC_PREFIX:
        raise error(f"{where}: not a .npy array")
    version = (prefix[6], prefix[7])
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise error(f"{where}: .npy version {version[0]}.{version[1]} is not read here")
    field = member.read(2 if version == (1, 0) else 4)
    if len(field) < (2 if version == (1, 0) else 4):
        raise error(f"{where}: the .npy header ends early")
    length = struct.unpack("<H" if version == (1, 0) else "<I", field)[0]
    if length > MAX_NPY_HEADER:
        raise error(f"{where}: its .npy header declares {length} bytes; spa reads at most {MAX_NPY_HEADER}")
    text = member.read(length)
    # numpy parses the bounded header; version 3.0 differs from 2.0 only in the text's encoding
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        return read(io.BytesIO(field + text))
    except ValueError as e:
        raise error(f"{where}: bad .npy header ({str(e).splitlines()[0] if str(e) else 'unreadable'})") from None


def array_limit(model: onnx.ModelProto) -> int:
    """The most bytes one data array may decompress to: generous for any data set one
    prunes with, and in proportion to the model, so a few kilobytes of file cannot ask for
    gigabytes of memory."""
    weights = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
    return max(2 << 30, 4 * weights)


def read_npz(path, what: str, names: list[str], limit: int) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` file (those present), each checked from its
    header before it is read."""
    check_readable(path, what, SpaError)
    fd = open_regular(path, what, SpaError)
    try:
        with os.fdopen(fd, "rb") as f, np.load(f, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise SpaError(f"{path}: {what} is a single .npy array, not an .npz archive of named arrays")
            return {k: _read_member(z, k, path, what, limit) for k in names if k in z.files}
    except SpaError:
        raise
    except Exception as e:
        raise SpaError(f"{path}: {what} cannot be read as .npz ({type(e).__name__})") from None


def _read_member(z, name: str, path, what: str, limit: int) -> np.ndarray:
    where = f"{path}: {what}: array {name!r}"
    with z.zip.open(name + ".npy") as member:
        shape, _, dtype = npy_header(member, where)
    if dtype.kind not in _NUMBER_KINDS or dtype.hasobject:
        raise SpaError(f"{where} holds {dtype} values; spa reads numbers (bool, int, float)")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > limit:
        raise SpaError(f"{where} declares shape {shape} ({nbytes / 2**30:.1f} GiB), more than the "
                       f"{limit / 2**30:.1f} GiB spa reads for this model")
    try:
        return z[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise SpaError(f"{where} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def calibration_data(path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The ``--calib`` arrays: one per model input, named after it."""
    names = [i.name for i in graph_inputs(model)]
    data = read_npz(path, "--calib file", names, array_limit(model))
    if len(data) != len(names):
        have = _names_in(path)
        raise SpaError(f"{path}: --calib file needs arrays named after the model's inputs {names}, "
                       f"has {have}")
    return data


def eval_data(path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The ``--eval`` arrays: one per model input and ``label``, the same number of samples each."""
    inputs = {i.name: i for i in graph_inputs(model)}
    if "label" in inputs:
        raise SpaError(f"{path}: the model has an input named 'label', the name --eval gives the labels; "
                       "--eval cannot measure this model")
    names = list(inputs) + ["label"]
    data = read_npz(path, "--eval file", names, array_limit(model))
    if len(data) != len(names):
        raise SpaError(f"{path}: --eval file needs arrays {names}, has {_names_in(path)}")
    flat = [n for n in names if data[n].ndim == 0]
    if flat:
        raise SpaError(f"{path}: --eval array {flat[0]!r} is a single value (0-d); give one per sample")
    if any(len(data[n]) != len(data["label"]) for n in names) or not len(data["label"]):
        raise SpaError(f"{path}: --eval arrays need the same number of samples as 'label' (at least one)")
    if data["label"].ndim != 1 or data["label"].dtype.kind not in "iub":
        raise SpaError(f"{path}: --eval 'label' must hold one integer class per sample, has shape "
                       f"{data['label'].shape} of {data['label'].dtype}")
    for name, vi in inputs.items():
        data[name] = _as_input(data[name], vi, f"{path}: --eval array {name!r}")
    return data


def _as_input(arr: np.ndarray, vi: onnx.ValueInfoProto, where: str) -> np.ndarray:
    """``arr`` (samples first) in the input's element type, its shape checked against the
    input's fixed dims (the first, the samples, excepted)."""
    tensor = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.HasField("shape") and (arr.ndim != len(dims) or any(
            d is not None and d != n for d, n in zip(dims[1:], arr.shape[1:]))):
        want = "(" + ", ".join(["N"] + [str(d) if d is not None else "?" for d in dims[1:]]) + ")"
        raise SpaError(f"{where} has shape {arr.shape}; the model takes {want}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
    if arr.dtype.kind == "f" and dtype.kind in "iub":
        raise SpaError(f"{where} holds {arr.dtype}; the model takes {dtype}")
    return arr.astype(dtype, copy=False)


def _names_in(path) -> list[str]:
    fd = open_regular(path, "data file", SpaError)
    with os.fdopen(fd, "rb") as f, zipfile.ZipFile(f) as z:
        return sorted(n[:-4] if n.endswith(".npy") else n for n in z.namelist())


def accuracy(model, data: dict) -> float:
    """Top-1 accuracy of ``model``'s first output on ``data`` (inputs and ``label``)."""
    from ..runtime import session
    sess = session(model)
    names = [i.name for i in sess.get_inputs()]
    n = len(data["label"])
    first = sess.get_inputs()[0].shape if names else []
    fixed = first[0] if first and isinstance(first[0], int) and first[0] > 0 else None   # a static batch size
    batch, counted = fixed or 64, n - n % fixed if fixed else n
    if not counted:
        raise SpaError(f"--eval: the model takes batches of exactly {fixed} samples; --eval has {n}")
    correct = 0
    for start in range(0, counted, batch):
        feeds = {k: data[k][start:start + batch] for k in names}
        labels = data["label"][start:start + batch]
        try:
            logits = sess.run(None, feeds)[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise SpaError(f"--eval: onnxruntime cannot run the model on these arrays "
                           f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        if logits.ndim < 1 or logits.shape[:1] != labels.shape:
            raise SpaError(f"--eval: the model's first output {logits.shape} is not one row of class scores "
                           f"per sample ({len(labels)} labels)")
        correct += int((logits.reshape(len(labels), -1).argmax(axis=-1) == labels).sum())
    return correct / counted
