"""Safe file I/O: atomic writes (a crash or Ctrl-C never leaves a half-written file
behind) and bounded reads (a device, a huge file or a decompression bomb is refused
before it fills memory)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import DeepzipError


def output_kind(path: str | os.PathLike[str]) -> str:
    """What writing ``path`` would do: ``"file"`` (a new or regular file, or a symlink,
    which is replaced by the file: its target is never written), ``"null"`` (the null
    device, or a symlink to it: the bytes are discarded, the device stays). Anything else
    (a directory, a FIFO, another device, a socket, a symlink to one of those, a NUL
    byte in the name) is one DeepzipError: deepzip never replaces what is not a file."""
    text = os.fspath(path)
    if "\0" in str(text):
        raise DeepzipError(f"output path {str(text)!r} contains a NUL byte")
    try:
        st = os.lstat(text)
    except FileNotFoundError:
        return "file"
    except OSError as e:
        raise DeepzipError(f"cannot write {text}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(text)
        except OSError:  # a dangling link: replaced, like a link to a file
            return "file"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == _null_rdev():
        return "null"
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    raise DeepzipError(f"{text} is {kind}: deepzip writes its outputs only as regular files "
                       "and never replaces anything else; name a file")


@contextlib.contextmanager
def unless_null(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``path`` itself, or for the null device a scratch file in a temporary folder that
    is gone afterwards: a command that reads back what it wrote (sizes, a check) does the
    same work on ``-o /dev/null`` and keeps nothing."""
    if output_kind(path) != "null":
        yield Path(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / Path(path).name


def _null_rdev() -> int | None:
    try:
        return os.stat(os.devnull).st_rdev
    except OSError:
        return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp file's path beside ``path``, renamed over ``path`` only on success (removed
    on any failure): for writers that take a file name. ``path`` must be what
    :func:`output_kind` accepts; the null device gets the bytes written and thrown away."""
    kind = output_kind(path)
    path = Path(path)
    where = Path(tempfile.gettempdir()) if kind == "null" else path.parent
    where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=where)
    os.close(fd)
    try:
        yield Path(tmp)
        if kind == "null":
            os.unlink(tmp)
        else:
            # mkstemp makes it private, and a writer may make the file anew: the user's
            # umask decides, as for any file they write
            os.chmod(tmp, 0o666 & ~_umask())
            output_kind(path)  # again, just before the rename: it may have changed
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; rename it over ``path`` only on success."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    import torch  # here, not at the top: the NumPy reader of .dzip files uses this module

    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except RuntimeError as e:  # torch's writer reports a full disk as a RuntimeError
        raise DeepzipError(f"cannot write {path}: {str(e).splitlines()[0][:100]} "
                           "(disk full?)") from None


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete the temp files an interrupted :func:`atomic_write` left in ``folder`` (and
    below): a kill between write and rename cannot run the cleanup. Returns how many."""
    import re

    pattern = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # mkstemp's ".NAME.XXXXXXXX.tmp"
    removed = 0
    for p in Path(folder).rglob(".*.tmp"):
        if p.is_file() and pattern.match(p.name):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def open_regular(path: str | os.PathLike[str], what: str = "file") -> IO[bytes]:
    """``path`` opened for reading if it is a regular file; anything else (a FIFO, a
    device, a directory, a name with a NUL byte, a missing file) is one DeepzipError.

    The file is opened non-blocking and checked on the open descriptor, so a FIFO never
    hangs the open and a file swapped between check and open is still caught."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except ValueError:  # an embedded NUL byte
        raise DeepzipError(f"{what} path {str(path)!r} contains a NUL byte") from None
    except FileNotFoundError:
        raise DeepzipError(f"cannot read {path}: no such {what}") from None
    except OSError as e:
        raise DeepzipError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeepzipError(f"{path}: not a regular file (a {what} must be one)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """All bytes of a regular file of at most ``limit`` bytes (only what is there is
    allocated); anything else is one DeepzipError. ``what`` names the file in errors."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise DeepzipError(f"{path}: {size:,} bytes is larger than any {what}")
        try:
            data = f.read(size + 1)
        except OSError as e:
            raise DeepzipError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:  # it grew while we read it
        raise DeepzipError(f"{path}: larger than any {what}")
    return data


def read_json(path: str | os.PathLike[str], limit: int, what: str) -> Any:
    """A small JSON file's value; damage (not JSON, not UTF-8, nested past Python's
    recursion limit) is one DeepzipError naming ``what``."""
    import json

    data = read_limited(path, limit, what)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise DeepzipError(f"{path}: not a valid {what} (damaged?)") from None


def read_gzip_limited(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The unpacked bytes of a gzip file, read in chunks and refused past ``limit``."""
    import gzip
    import zlib

    chunks, total = [], 0
    try:
        with open_regular(path, what) as raw, gzip.open(raw, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise DeepzipError(f"{path}: unpacks to more than any {what}")
                chunks.append(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise DeepzipError(f"{path}: cannot read ({e})") from None
    return b"".join(chunks)


LOCK_NAME = ".deepzip.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for one process: a second
    process gets a one-line DeepzipError at once, naming the holder. The lock is the
    kernel's (``flock``), so a run that was killed leaves nothing that blocks a rerun."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise DeepzipError(f"cannot lock {folder}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise DeepzipError(f"{folder} is in use by another deepzip run (pid {holder}); "
                               "wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # releases the lock
