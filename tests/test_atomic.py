"""Safe file I/O: writes that never leave half a file, reads that refuse what is not a
small regular file, and the run folder's lock."""

import os

import pytest

from deepzip.atomic import (
    atomic_path,
    atomic_write,
    folder_lock,
    open_regular,
    read_limited,
    remove_stale_temps,
)
from deepzip.errors import DeepzipError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


def test_atomic_path_renames_on_success_only(tmp_path):
    path = tmp_path / "sub" / "g.bin"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and not path.exists()
        tmp.write_bytes(b"x")
    assert path.read_bytes() == b"x"
    with pytest.raises(ValueError), atomic_path(path) as tmp:
        tmp.write_bytes(b"y")
        raise ValueError
    assert path.read_bytes() == b"x" and sorted(os.listdir(path.parent)) == ["g.bin"]


def test_reads_refuse_what_is_not_a_small_regular_file(tmp_path):
    small = tmp_path / "s"
    small.write_bytes(b"12345")
    assert read_limited(small, 5, "thing") == b"12345"
    with pytest.raises(DeepzipError, match="larger than any thing"):
        read_limited(small, 4, "thing")
    with pytest.raises(DeepzipError, match="no such thing"):
        read_limited(tmp_path / "missing", 10, "thing")
    with pytest.raises(DeepzipError, match="regular file"):
        read_limited(tmp_path, 10, "thing")
    with pytest.raises(DeepzipError, match="NUL"):
        open_regular(str(small) + "\0x")


def test_only_the_writers_own_temp_files_are_removed(tmp_path):
    (tmp_path / ".model.dzip.abcd1234.tmp").write_bytes(b"")  # mkstemp's pattern
    (tmp_path / ".notes.tmp").write_bytes(b"")  # someone else's
    (tmp_path / "model.dzip").write_bytes(b"")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == [".notes.tmp", "model.dzip"]


def test_the_folder_lock_is_exclusive_and_released(tmp_path):
    with folder_lock(tmp_path / "run"), \
            pytest.raises(DeepzipError, match=f"pid {os.getpid()}"), \
            folder_lock(tmp_path / "run"):
        pass
    with folder_lock(tmp_path / "run"):  # released when the holder is done
        pass
