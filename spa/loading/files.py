"""Where spa writes, and how.

Every path a run will write (the model, its ``.data`` file, the report) is checked against
every file it reads (the model, its external data, calibration and evaluation data) before
any work starts, so no mistake on the command line can overwrite an input, a device node or
another output. Files are written atomically (a temporary file beside the target, then a
rename) with the permissions a plain ``open(path, "w")`` would give them.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import OutputPathError

__all__ = ["check_outputs", "check_readable", "check_inside", "check_side_file", "open_regular",
           "pread_into", "read_small", "atomic_write"]


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_outputs(outputs: dict[str, Path], inputs: dict[str, Path]):
    """Refuse (one line) when an output is, or resolves to, an input, another output, a
    directory, a non-regular file, or lies in a missing or read-only directory.
    ``outputs`` and ``inputs`` map what a file is (``-o``, ``--report``, ``the input's
    external data``) to its path."""
    seen: dict[str, Path] = {}
    for role, out in outputs.items():
        out = Path(out)
        if os.path.lexists(out):
            if out.is_dir():
                raise OutputPathError(f"{out}: {role} is a directory")
            if out.exists() and not out.is_file():
                raise OutputPathError(f"{out}: {role} is not a regular file ({_kind(out)}); spa only "
                                      "writes regular files")
        for what, inp in inputs.items():
            if inp is not None and _same(out, inp):
                raise OutputPathError(f"{out}: {role} is {what}; spa never overwrites what it reads")
        for other_role, other in seen.items():
            if _same(out, other):
                raise OutputPathError(f"{out}: {role} and {other_role} are the same file")
        seen[role] = out
        parent = Path(os.path.realpath(out)).parent
        _check_name_length(out, role, parent)
        if not parent.is_dir():
            raise OutputPathError(f"{out}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise OutputPathError(f"{out}: directory {parent} is not writable")


def _check_name_length(out: Path, role: str, parent: Path):
    """The name, and the temporary name beside it (``.NAME.XXXXXXXX.tmp``), fit the file
    system: refused now, not after the work."""
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX") if parent.is_dir() else 255
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(out.name)) + len(".") + 13 > limit:
        raise OutputPathError(f"{str(out)[:80]}...: {role}'s name is too long for the file system "
                              f"(at most {limit - 14} bytes)")


def _kind(path: Path) -> str:
    return _kind_of_mode(path.stat().st_mode)


def _kind_of_mode(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a file"


def check_readable(path, what: str, error=OutputPathError) -> Path:
    """A readable regular file, or one line saying what it is instead."""
    path = Path(path)
    if not os.path.lexists(path):
        raise error(f"{path}: {what}: no such file")
    if path.is_dir():
        raise error(f"{path}: {what} is a directory")
    if not path.exists():
        raise error(f"{path}: {what} is a broken symbolic link")
    if not path.is_file():
        raise error(f"{path}: {what} is not a regular file ({_kind(path)})")
    if not os.access(path, os.R_OK):
        raise error(f"{path}: {what} is not readable (permission denied)")
    return path


def open_regular(path, what: str, error=OutputPathError) -> int:
    """A descriptor of ``path`` once it is known to be a regular file. Every read goes through
    it, so a file swapped for a FIFO or a device after the checks cannot block or feed spa:
    O_NONBLOCK makes opening a FIFO return at once, and the descriptor is what is checked."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(f"{path}: {what}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: {what} is not a regular file ({_kind_of_mode(mode)}); spa only reads "
                        "regular files")
    except BaseException:
        os.close(fd)
        raise
    return fd


def pread_into(fd: int, buffer: memoryview, offset: int, where: str, error=OutputPathError):
    """Fill ``buffer`` from ``fd`` at ``offset``; a file that shrank since it was checked is an
    error, not a short read."""
    view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise error(f"{where}: file ended {len(view) - done} bytes early (changed while spa read it?)")
        done += n


def check_inside(root: Path, path: Path, what: str):
    """Refuse a path spa derived (from a file name, say) that would leave ``root``: every file
    a run writes lies inside the folder the user named, whatever the input is called."""
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real_root != real.parent and real_root not in real.parents:
        raise OutputPathError(f"{path}: {what} would be written outside {root}; rename the input file")


def check_side_file(side: Path, refers: Callable[[], bool], what: str, option: str):
    """``side`` is written beside a file the user named though they never named it: it may
    replace only a file that the named one, as it stands, refers to (``refers()``: an ONNX
    file's external data, a plan's arrays), never a stranger's file."""
    if not os.path.lexists(side) or refers():
        return
    raise OutputPathError(f"{side}: {what} would replace a file spa did not write; move it away or "
                          f"choose another {option}")


def read_small(path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes, else None (never blocks)."""
    try:
        fd = open_regular(path, "", OSError)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _plain_write_mode(path: Path) -> int:
    """What ``open(path, "w")`` would leave: an existing file keeps its bits, a new one
    gets 0666 minus the umask."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_beside(out: Path) -> str:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=os.path.realpath(out.parent))
    except OSError as e:
        raise OutputPathError(f"{out}: cannot write ({e.strerror or e})") from None
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_files(*targets: Path) -> Iterator[list[str]]:
    """Temporary files beside each target; when the block succeeds, each is given the
    permissions of a plain write and renamed over its target (in order), else removed."""
    tmps: list[str] = []
    try:
        for t in targets:
            tmps.append(temp_beside(Path(t)))
        yield tmps
        for tmp, target in zip(tmps, targets):
            os.chmod(tmp, _plain_write_mode(Path(target)))
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
    except OSError as e:
        raise OutputPathError(f"{targets[0]}: cannot write ({e.strerror or e})") from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """``write(temporary_path)``, then rename it over ``path``."""
    path = Path(path)
    with atomic_files(path) as (tmp,):
        write(tmp)
    return path

