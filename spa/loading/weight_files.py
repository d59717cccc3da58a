"""Files that weights are written to: the output's data file (``WeightWriter``) and the scratch
files a large model's new weights wait in until it is saved (``ScratchWeights``).

A scratch file has no name where the system allows it (Linux's O_TMPFILE): nothing is left
behind whatever ends the process, and when the pruned model is saved in the same file system
the file is given the output's name (``link_into``) instead of being copied there, so the pruned
weights are written once (a 1.1B decoder's 3.4 GB copy took 13 s of a 130 s prune).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

import onnx

from .tensors import _DATA_FILES, _external_info, _open_data_file, register_data_file, release_mapped, tensor_bytes

__all__ = ["WeightWriter", "ScratchWeights", "spillable", "linkable_scratch", "link_into", "write_slices"]

log = logging.getLogger(__name__)

_WRITE_SLICE = 16 << 20


class WeightWriter:
    """Appends weights to an open file ``f``, a slice at a time (a mapped file's pages dropped
    as they are written), and makes their references to it as ``location``."""

    def __init__(self, f, location: str):
        self.file, self.location = f, location

    def put(self, t: onnx.TensorProto, data) -> onnx.TensorProto:
        """A reference to ``data`` (``t``'s bytes as stored: raw bytes, a memoryview or a
        C-contiguous array), written here, with ``t``'s name, type and dims."""
        ref = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
        ref.data_location = onnx.TensorProto.EXTERNAL
        data = memoryview(data).cast("B")
        for key, value in (("location", self.location), ("offset", str(self.file.tell())), ("length", str(len(data)))):
            ref.external_data.add(key=key, value=value)
        write_slices(self.file, data)
        return ref


def write_slices(f, data):
    """Write ``data`` (bytes, a memoryview or a C-contiguous array) to ``f`` a slice at a time,
    a mapped file's pages dropped after each."""
    data = memoryview(data).cast("B")
    for start in range(0, len(data), _WRITE_SLICE):
        f.write(data[start:start + _WRITE_SLICE])
        release_mapped(trim=False)


# the keys (tensors' locations) of the scratch files that have no name, so can be given one ->
# the file's identity (device, inode): a key whose descriptor is no longer that file is not one
_UNNAMED: dict[str, tuple[int, int]] = {}


class ScratchWeights:
    """A scratch file that weights are written to and then read from as external data is
    (memory-mapped): a pruned decoder's weights held in its protobuf were handed out as a new
    copy on every read, so each session was fed another copy of them, and they were freed only
    with the whole model (``spa.rewrite.apply.rewrite`` with ``spill``). Nobody else sees it:
    it has no name (O_TMPFILE), or is unlinked once written; its descriptor keeps it until the
    process ends, or until ``forget_files`` of the model reading it. ``open()`` is None where no
    scratch file can be made; ``put`` and ``close`` raise OSError where it cannot be written (a
    full or read-only temporary folder), and the caller keeps its weights in memory then."""

    def __init__(self, path: str, fd: int | None = None):
        # the location its tensors name, and the key its descriptor is kept under: the file's
        # path, or for a file with no name an unguessable path in the temporary folder that
        # nothing has (a model read from a path equal to the key would take its place)
        self.path = path
        self._unnamed = fd is not None
        self._file = os.fdopen(fd, "wb") if self._unnamed else open(path, "wb")
        self.put = WeightWriter(self._file, path).put

    @classmethod
    def open(cls) -> "ScratchWeights | None":
        folder = tempfile.gettempdir()
        try:
            if hasattr(os, "O_TMPFILE"):
                try:
                    fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
                    return cls(os.path.join(folder, f"spa-weights-{secrets.token_hex(12)}.unnamed"), fd)
                except OSError as e:    # a file system or kernel without it: a named file, unlinked once written
                    log.debug("no unnamed scratch file in %s (%s)", folder, e)
            fd, name = tempfile.mkstemp(prefix="spa-weights-", suffix=".data")
            os.close(fd)
            return cls(str(Path(name)))
        except OSError as e:
            log.info("weights stay in memory (%s)", e)
            return None

    def close(self, written: bool = True):
        """Done writing: from now on its tensors are read from it (``written``), or it is dropped."""
        if self._file.closed:
            return
        if self._unnamed:
            try:
                self._file.flush()
                if written:
                    self._register_unnamed()
            finally:
                self._file.close()
            return
        try:
            self._file.close()
            if written:
                _open_data_file(Path(self.path), "spilled weights")
        finally:
            try:
                os.unlink(self.path)
            except OSError:     # where an open file cannot be removed: at exit, if it can be then
                import atexit
                atexit.register(_remove_quietly, self.path)

    def _register_unnamed(self):
        """Keep a read-only descriptor of the file under its key, as ``_open_data_file`` does
        (the written one, where /proc cannot reopen it)."""
        if self.path in _DATA_FILES:
            raise OSError(f"{self.path} names another file")
        written = self._file.fileno()
        try:
            fd = os.open(f"/proc/self/fd/{written}", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            fd = os.dup(written)
        register_data_file(self.path, fd)
        st = os.fstat(fd)
        _UNNAMED[self.path] = (st.st_dev, st.st_ino)


def spillable(t: onnx.TensorProto) -> bool:
    """Whether a weight goes to a scratch file: held in memory, 1 KB or more, and no strings
    (which have no raw bytes)."""
    return t.data_location != onnx.TensorProto.EXTERNAL and tensor_bytes(t) >= 1024 and \
        t.data_type != onnx.TensorProto.STRING


def linkable_scratch(model: onnx.ModelProto) -> str | None:
    """The unnamed scratch file ``model``'s tensors fill exactly, each byte read by one tensor
    once (what a rewrite spilled, nothing dropped since): given a name it is the model's data
    file as it would be written. None where there is none."""
    ranges: dict[str, set[tuple[int, int]]] = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = _external_info(t)
            if info["location"] in _UNNAMED:
                ranges.setdefault(info["location"], set()).add((int(info.get("offset", 0)), tensor_bytes(t)))
    for location, spans in ranges.items():
        st = os.fstat(_DATA_FILES[location]) if location in _DATA_FILES else None
        if st is None or (st.st_dev, st.st_ino) != _UNNAMED[location] or st.st_nlink:
            continue    # forgotten, or given a name (two outputs never share one file)
        end = 0
        for offset, length in sorted(spans):
            if offset != end:
                break
            end += length
        else:
            if end == st.st_size:
                return location
    return None


def link_into(location: str, path: str) -> bool:
    """Give the unnamed scratch file ``location`` the name ``path``, a new empty file of the
    caller's that it replaces; False where it cannot be (another file system, no /proc) or
    should not: where a file made in that folder gets another group or other extended
    attributes (a setgid folder, default ACLs, a security label) than the scratch file has."""
    fd = _DATA_FILES[location]
    try:
        if not _alike(fd, path):
            log.info("spilled weights copied, not linked (the output's folder gives its files other attributes)")
            return False
        root = os.open("/", os.O_RDONLY)
    except OSError as e:
        log.info("spilled weights copied, not linked (%s)", e)
        return False
    aside = f"{path}.link"
    try:
        # linkat with AT_SYMLINK_FOLLOW through /proc (os.link uses it only given a folder
        # descriptor): a file with no name can be given one, never one that was unlinked
        os.link(f"/proc/self/fd/{fd}", aside, src_dir_fd=root, follow_symlinks=True)
    except OSError as e:
        log.info("spilled weights copied, not linked (%s)", e)
        return False
    finally:
        os.close(root)
    try:
        os.replace(aside, path)
    except BaseException:
        _remove_quietly(aside)
        raise
    return True     # (named now, it is linked no more: a second save copies it)


def _alike(fd: int, path: str) -> bool:
    """Whether the file ``fd`` has the group and extended attributes of the file ``path``."""
    return os.fstat(fd).st_gid == os.stat(path).st_gid and _attributes(fd) == _attributes(path)


def _attributes(file) -> dict:
    if not hasattr(os, "listxattr"):
        return {}
    return {name: os.getxattr(file, name) for name in os.listxattr(file)}


def _remove_quietly(path: str):
    try:
        os.unlink(path)
    except OSError:
        pass
