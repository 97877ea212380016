"""Atomic writes: all or nothing, and the permissions a plain open() would give."""

import os
import stat

import pytest

from edgesqueeze._io import atomic_path, write_bytes_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restore it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_file_gets_open_mode_under_umask(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.bin"
    with open(plain, "wb") as fh:
        fh.write(b"x")
    atomic = tmp_path / "atomic.bin"
    write_bytes_atomic(atomic, b"x")
    assert _mode(atomic) == _mode(plain) == 0o666 & ~mask


def test_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "model.esq"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o640


def test_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
