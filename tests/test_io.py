"""Atomic writes: all or nothing, and the permissions a plain open() would give; what native
code writes to file descriptor 2, filtered."""

import os
import stat
from pathlib import Path

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


def test_an_output_removed_before_it_is_written_again_keeps_its_mode(tmp_path, umask):
    """Audit: export, compress, verify and check remove an earlier run's outputs first (an
    interrupted run must not leave them beside its own), so a file restricted to 0o600 came
    back 0o644, where open() over it keeps its mode."""
    from edgesqueeze._io import remove_earlier_outputs

    umask(0o022)
    (tmp_path / "model.onnx").write_bytes(b"old")
    (tmp_path / "other.onnx").write_bytes(b"old")
    os.chmod(tmp_path / "model.onnx", 0o600)
    os.chmod(tmp_path / "other.onnx", 0o640)
    assert len(remove_earlier_outputs(tmp_path, ["model.onnx", "other.onnx", "absent.onnx"])) == 2
    write_bytes_atomic(tmp_path / "model.onnx", b"new")
    assert _mode(tmp_path / "model.onnx") == 0o600
    write_bytes_atomic(tmp_path / "fresh.onnx", b"new")  # never there: the umask's
    assert _mode(tmp_path / "fresh.onnx") == 0o644
    write_bytes_atomic(tmp_path / "model.onnx", b"again")  # an existing file's own mode, as before
    assert _mode(tmp_path / "model.onnx") == 0o600


def test_the_new_bytes_of_a_private_file_are_never_readable_by_others(tmp_path, umask):
    """Review: the temporary file was made 0o666 less the umask and narrowed only at the
    rename, so a 0o600 file's new contents were world-readable while written (and after a
    SIGKILL left the temporary file)."""
    from edgesqueeze._io import remove_earlier_outputs

    umask(0o022)
    for removed_first in (False, True):
        path = tmp_path / f"secret{int(removed_first)}.json"
        path.write_bytes(b"old")
        os.chmod(path, 0o600)
        if removed_first:
            remove_earlier_outputs(tmp_path, [path.name])
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"new")
            assert _mode(tmp) == 0o600, removed_first
        assert _mode(path) == 0o600 and path.read_bytes() == b"new"


def test_a_removed_output_lends_its_mode_only_within_its_command(tmp_path, umask):
    """Review: a file removed and never written again kept its entry for the process's life,
    so a later, unrelated write there (a notebook's next run) got the old mode."""
    from edgesqueeze._io import output_locks, remove_earlier_outputs

    umask(0o022)
    path = tmp_path / "out.json"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    with output_locks():
        remove_earlier_outputs(tmp_path, [path.name])  # this command never writes it again
    write_bytes_atomic(path, b"later")
    assert _mode(path) == 0o644


def _default_acl(rwx_user: int, rwx_group: int, rwx_other: int) -> bytes:
    """A POSIX default ACL as the kernel's xattr stores it (what `setfacl -d -m` writes)."""
    import struct

    entries = [(0x01, rwx_user), (0x04, rwx_group), (0x20, rwx_other)]  # USER_OBJ, GROUP_OBJ, OTHER
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries)


def test_a_new_file_in_a_folder_with_a_default_acl_gets_the_acls_mode_as_open_gives(tmp_path, umask):
    """Audit: under a default ACL (a shared team folder) the kernel ignores the umask: open()
    gave 664, edgesqueeze's files 644 (mkstemp's 0o600, then a chmod from the umask)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    try:
        os.setxattr(folder, "system.posix_acl_default", _default_acl(7, 7, 5))
    except (OSError, AttributeError) as exc:
        pytest.skip(f"this file system takes no POSIX ACL ({exc})")
    umask(0o022)
    with open(folder / "plain.bin", "wb") as fh:
        fh.write(b"x")
    assert _mode(folder / "plain.bin") == 0o664  # the ACL's, not the umask's
    write_bytes_atomic(folder / "atomic.bin", b"x")
    assert _mode(folder / "atomic.bin") == _mode(folder / "plain.bin")


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


def test_a_link_to_a_device_is_written_through_not_replaced(tmp_path):
    # `unpack x.esq -o /dev/stdout --force` (a link to /proc/self/fd/1) or `check --json
    # /dev/stdout` as root: the rename put a regular file where the link (or, for /dev/null
    # itself, the device node) was
    link = tmp_path / "null"
    link.symlink_to(os.devnull)
    write_bytes_atomic(link, b"model bytes")
    assert link.is_symlink() and os.readlink(link) == os.devnull
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_a_fifo_is_written_into(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that the writer's open does not block
    try:
        write_bytes_atomic(fifo, b"through the pipe")
        assert os.read(reader, 100) == b"through the pipe"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_link_to_a_file_stays_a_link(tmp_path):
    target = tmp_path / "real.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "model.onnx"
    link.symlink_to(target.name)
    write_bytes_atomic(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    # a link to a file not there yet: open() creates the file it names and keeps the link;
    # the link was replaced by a regular file
    dangling = tmp_path / "later.onnx"
    dangling.symlink_to("made-later.onnx")
    write_bytes_atomic(dangling, b"first")
    assert dangling.is_symlink() and (tmp_path / "made-later.onnx").read_bytes() == b"first"


def test_a_full_device_is_one_output_error(tmp_path):
    from edgesqueeze.errors import OutputError

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    link = tmp_path / "full"  # through a link: a regression replaces the link, not /dev/full
    link.symlink_to("/dev/full")
    with pytest.raises(OutputError, match="full: cannot write"):
        write_bytes_atomic(link, b"x" * 10)
    assert link.is_symlink()


def test_check_writable_refuses_before_the_work_and_creates_nothing(tmp_path):
    from edgesqueeze._io import check_writable
    from edgesqueeze.errors import OutputError

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="a-file is a file, not a folder"):
        check_writable(tmp_path / "a-file" / "sub" / "out.json")
    with pytest.raises(OutputError, match="a folder is in the way"):
        check_writable(tmp_path)
    check_writable(tmp_path / "new" / "deeper" / "out.json")  # folders to be made: fine, none made yet
    assert not (tmp_path / "new").exists()
    check_writable("/dev/null")
    if os.geteuid() != 0:  # root writes anywhere: access() says yes
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(OutputError, match="permission denied"):
            check_writable(locked / "out.json")


def test_check_writable_tries_a_real_file_where_access_says_yes(tmp_path):
    """os.access says root may write into /sys; the gate then measured everything before
    failing to write. A real probe file finds it first, and leaves nothing behind."""
    from edgesqueeze._io import check_writable
    from edgesqueeze.errors import OutputError

    if Path("/sys").is_dir():
        with pytest.raises(OutputError, match="cannot write into /sys"):
            check_writable("/sys/verify.json")
    check_writable(tmp_path / "new" / "verify.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a" * 251 + ".pt", "é" * 120 + "a" * 6 + ".onnx", os.fsdecode(b"\xff" * 250 + b".md")])
def test_names_up_to_255_bytes_are_written_and_their_stale_temps_found(tmp_path, name):
    """The temporary file adds 14 bytes to the name: outputs named with 242-255 bytes were
    refused as "File name too long" though the name itself fits."""
    from edgesqueeze._io import remove_stale_temps, write_text_atomic

    assert 242 <= len(os.fsencode(name)) <= 255
    write_text_atomic(tmp_path / name, "done")
    assert (tmp_path / name).read_text() == "done" and os.listdir(tmp_path) == [name]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / name) as tmp:
            raise KeyboardInterrupt
    tmp.write_text("half")  # the temporary file, as a SIGKILL mid-write would leave it
    assert len(os.fsencode(tmp.name)) <= 255
    assert remove_stale_temps(tmp_path, names=["other.md"]) == []
    assert remove_stale_temps(tmp_path, names=[name]) == [tmp]
    assert os.listdir(tmp_path) == [name]


def test_a_name_too_long_for_the_file_system_is_one_line_with_what_to_do(tmp_path):
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    res = CliRunner().invoke(cli, ["check", str(tmp_path / ("r" * 256 + ".json"))])
    assert res.exit_code == 2, res.output
    assert "File name too long; a file name holds at most 255 bytes" in res.output, res.output
    from edgesqueeze._io import write_text_atomic
    from edgesqueeze.errors import OutputError

    with pytest.raises(OutputError, match="File name too long: a file name holds at most 255 bytes.*choose a shorter"):
        write_text_atomic(tmp_path / ("w" * 256 + ".md"), "x")
    assert os.listdir(tmp_path) == []


def test_a_symbolic_link_loop_as_an_output_is_one_line_and_stays(tmp_path):
    """A link that leads back to itself: verify --out replaced it by a file (the rename of the
    finished report), unpack raised "RuntimeError: Symlink loop", export said "Directory 'loop'
    is a file". open() refuses it (ELOOP), and so does every writer now, before any work."""
    from click.testing import CliRunner

    from edgesqueeze._io import check_writable, write_text_atomic
    from edgesqueeze.cli import cli
    from edgesqueeze.errors import OutputError

    loop, two = tmp_path / "loop", tmp_path / "two"
    loop.symlink_to("loop")
    two.symlink_to("three")
    (tmp_path / "three").symlink_to("two")
    for link in (loop, two):
        for write in (check_writable, lambda p: write_text_atomic(p, "x")):
            with pytest.raises(OutputError, match="a symbolic link that leads back to itself; remove the link"):
                write(link)
    esq = tmp_path / "m.esq"
    esq.write_bytes(b"not read: the output is checked first")
    for args in (["unpack", esq, "-o", loop], ["export", esq, "--out", loop], ["verify", loop]):
        res = CliRunner().invoke(cli, [str(a) for a in args])
        assert res.exit_code == 2, res.output
        assert "symbolic link that leads back to itself" in res.output and "Traceback" not in res.output, res.output
    assert os.readlink(loop) == "loop" and os.readlink(two) == "three"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupt_just_after_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch, signame):
    """Ctrl-C or SIGTERM between making the temporary file and the try that removes it left a
    `.out.bin.XXXXXXXX.tmp` behind (found with real signals in interrupted exports and checks)."""
    import signal

    sig = getattr(signal, signame)

    def terminated(signum, frame):  # as the CLI's SIGTERM handler: an interrupt with a reason
        raise KeyboardInterrupt("Terminated")

    before = signal.signal(signal.SIGTERM, terminated) if sig == signal.SIGTERM else None
    real_open = os.open

    def open_then_signal(p, flags, *args, **kwargs):
        fd = real_open(p, flags, *args, **kwargs)
        if str(p).endswith(".tmp"):
            signal.raise_signal(sig)  # the moment the file exists
        return fd

    monkeypatch.setattr(os, "open", open_then_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_bytes_atomic(tmp_path / "out.bin", b"x")
    finally:
        monkeypatch.undo()
        if before is not None:
            signal.signal(signal.SIGTERM, before)
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers as they were


_READ_ONLY_OUTPUT = r"""
import sys
from pathlib import Path
from edgesqueeze._io import check_writable, remove_output, write_bytes_atomic
from edgesqueeze.errors import OutputError
d = Path(sys.argv[1])
f = d / "model.onnx"
f.write_bytes(b"old")
f.chmod(0o444)
try:
    check_writable(f)
    print("NOT REFUSED")
except OutputError as e:
    print("REFUSED", e)
h = d / "h.onnx"
h.write_bytes(b"old")
h.chmod(0o444)
remove_output(h)  # an earlier output, removed before the run writes its own (its mode remembered)
write_bytes_atomic(h, b"new")
print(h.read_bytes().decode(), oct(h.stat().st_mode & 0o777))
"""


def test_a_read_only_earlier_output_is_refused_before_the_work_and_its_mode_kept(tmp_path):
    """As a user (not root, whom permissions do not stop): export, compress, train, verify and
    check removed a read-only earlier output, did all their work, then failed to write it (the
    temporary file took the old 0444 and could not be reopened), and the old file was lost. The
    output is refused up front, as open() refuses it; a mode kept from a removed file is set
    after the bytes are written."""
    import shutil
    import subprocess
    import sys

    import tempfile

    as_user, folder = [], tmp_path
    if os.geteuid() == 0:  # root writes any file: run as nobody (setpriv, util-linux), in a folder it may write
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): cannot drop to a user that permissions stop")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        folder = Path(tempfile.mkdtemp(prefix="edgesqueeze-read-only-"))  # pytest's own is root's alone
        folder.chmod(0o777)
    try:
        r = subprocess.run([*as_user, sys.executable, "-c", _READ_ONLY_OUTPUT, str(folder)], capture_output=True,
                           text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    finally:
        if folder != tmp_path:
            shutil.rmtree(folder, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (f"REFUSED {folder / 'model.onnx'}: exists and is read-only (mode 444); make it writable "
                        "(chmod u+w) for edgesqueeze to replace it, or write elsewhere"), lines
    assert lines[1] == "new 0o444"


def test_native_stderr_from_many_threads_gives_fd_2_back():
    """TFLite files loaded in 8 threads: two swaps of fd 2 overlapped, one thread restored the
    other's temporary file, and the process's stderr went into a deleted file for good (9 runs
    in 10 in an audit)."""
    import threading
    import time

    from edgesqueeze._io import native_stderr

    before = os.fstat(2)
    said = []

    def work(i):
        for _ in range(20):
            with native_stderr(keep=lambda line: False) as caught:
                os.write(2, f"thread {i}\n".encode())
                time.sleep(0.0005)
            said.append(caught.text)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert len(said) == 160 and all(text.count("\n") == 1 for text in said)  # each block caught its own line


def test_abandon_removes_the_writes_under_way_and_the_locks(tmp_path):
    """A torchrun rank stopped by SIGTERM ends with os._exit, which runs no finally and no
    atexit: it left a half-written .last.pt.*.tmp and the folder's .edgesqueeze.lock. The stop
    handler calls abandon() first."""
    from edgesqueeze._io import abandon, atomic_path, lock_output_folder, output_locks

    with output_locks():
        lock_output_folder(tmp_path, "edgesqueeze train")
        assert (tmp_path / ".edgesqueeze.lock").exists()
        with atomic_path(tmp_path / "last.pt") as tmp:
            tmp.write_bytes(b"half a state")
            assert tmp.exists()
            abandon()
            assert not tmp.exists() and not (tmp_path / ".edgesqueeze.lock").exists()
            tmp.write_bytes(b"the write goes on, as in a process not stopped")
    assert (tmp_path / "last.pt").read_bytes() == b"the write goes on, as in a process not stopped"
