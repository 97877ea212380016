"""Atomic writes: all or nothing, and the permissions a plain open() would give; what native
code writes to file descriptor 2, filtered."""

import os
import stat

import pytest

from edgesqueeze._io import atomic_path, native_stderr, write_bytes_atomic


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


NOISE = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
         "I0000 00:00:1796341057.580983   22661 flatbuffer_export.cc:4410] Estimated count of "
         "arithmetic ops: 1.647 G  ops\n"
         "\n"
         "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")


def test_native_stderr_drops_known_noise_and_passes_the_rest(capfd):
    """Bytes written straight to file descriptor 2 (as C++ code does, past sys.stderr) are
    caught; the absl / XNNPACK chatter is dropped, anything else reaches stderr after the
    block, in order."""
    with native_stderr() as caught:
        os.write(2, b"ERROR: Didn't find op for builtin opcode 'CONV_2D'\n")
        os.write(2, NOISE.encode())
        os.write(2, b"W0000 00:00:1.0  1 file.cc:1] a warning stays\n")
    out, err = capfd.readouterr()
    assert caught.text.startswith("ERROR: Didn't find op") and "XNNPACK" in caught.text
    assert err == ("ERROR: Didn't find op for builtin opcode 'CONV_2D'\n"
                   "W0000 00:00:1.0  1 file.cc:1] a warning stays\n")
    os.write(2, b"after\n")  # file descriptor 2 is back where it was
    assert capfd.readouterr().err == "after\n"


def test_native_stderr_restores_fd_2_on_error(capfd):
    with pytest.raises(RuntimeError):
        with native_stderr(keep=lambda line: False) as caught:
            os.write(2, b"swallowed\n")
            raise RuntimeError("boom")
    assert caught.text == "swallowed\n"
    os.write(2, b"visible\n")
    assert capfd.readouterr().err == "visible\n"
