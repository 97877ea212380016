"""Small file helpers shared by every writer: atomic writes, content hashes, and what native
libraries write to file descriptor 2."""

from __future__ import annotations

import atexit
import codecs
import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Iterator

from edgesqueeze.errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success.

    Readers never see a half-written file: either the old file or the complete new one.
    On any exception the temporary file is removed and ``path`` is left untouched.
    The file ends up with the mode a plain ``open(path, "w")`` would give it: an existing
    file's own mode (or that of the earlier output :func:`remove_output` removed), a new
    file ``0o666`` less the umask, or as the folder's default ACL says.
    A symbolic link to a file stays a link: the file it names is replaced (or created, for
    a link to a file not there yet, as ``open()`` creates it). A character
    device or a pipe (``/dev/null``, ``/dev/stdout``, a FIFO) is written in place, as
    ``open()`` would, never replaced; any other non-regular file is refused (OutputError).
    """
    path = Path(path)
    try:
        _no_folder_in_the_way(path)
        link = path.is_symlink()
    except OSError as exc:  # a name over 255 bytes
        raise OutputError(f"{path}: cannot write ({_why(exc, path)})") from None
    try:
        st = os.stat(path)  # follows a symbolic link: what a plain open() would write into
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            # /dev/null, /dev/stdout, a named pipe: written into as open() would, never
            # replaced by a rename (which would put a regular file where the device node
            # or pipe was: as root, `-o /dev/null --force` used to do exactly that)
            with _stream_errors(path):
                yield path
            return
        raise OutputError(f"{path}: cannot write: not a regular file (a socket or block device); "
                          f"write elsewhere")
    if link:  # replace (or, for a dangling link, create) the file the link names, and keep the link
        path = Path(os.path.realpath(path))
    # the mode open() would leave: an existing file's, or one this run removed first (an
    # earlier run's output it replaces); else the new file's, which the kernel sets from the
    # umask or the folder's default ACL (which a chmod to 0o666 & ~umask overrode)
    keep = stat.S_IMODE(st.st_mode) if st is not None else _REMOVED_MODES.get(os.path.realpath(path))
    tmp_path = None
    try:
        # Ctrl-C or SIGTERM between creating the temporary file and this try's finally left it
        # behind (a new-user audit found 5 in some 60 interrupted exports): held until it is
        # this try's to remove
        with _signals_held():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # created no wider than the file it replaces: a 0o600 file's new bytes are never
                # readable by others while they are written (or after a SIGKILL leaves them)
                # writable by us while it is written (a 0o444 file's mode made it EACCES to reopen,
                # after the earlier file was gone); the kept mode is set before the rename
                tmp_path = _new_temp(path, 0o666 if keep is None else keep | stat.S_IWUSR)
                _LIVE_TEMPS.add(tmp_path)
            except OSError as exc:
                raise OutputError(f"{path}: cannot write ({_why(exc, path)})") from None
        try:
            yield tmp_path
        except OSError as exc:  # the writer's own error on the temporary file, or a full disk
            ours = exc.filename == str(tmp_path) or (exc.filename is None and exc.errno in _WRITE_ERRNOS)
            if not ours:
                raise
            raise OutputError(f"{path}: cannot write ({_why(exc, path)})") from None
        try:
            with open(tmp_path, "rb") as fh:  # make the bytes durable before the rename
                os.fsync(fh.fileno())
            if keep is not None:
                os.chmod(tmp_path, keep)
            os.replace(tmp_path, path)
            _REMOVED_MODES.pop(os.path.realpath(path), None)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({_why(exc, path)})") from None
    finally:
        if tmp_path is not None:
            _LIVE_TEMPS.discard(tmp_path)
            if tmp_path.exists():
                tmp_path.unlink()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM, while inside, recorded and raised again on leaving (where the
    caller's cleanup already covers them), when Python handles them (its Ctrl-C, the CLI's
    SIGTERM): a few microseconds. Elsewhere (another thread, a signal left to the system's
    default action) nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            before[sig] = handler
            signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for sig in held:
            before[sig](sig, None)  # the handler's own KeyboardInterrupt, here


@contextlib.contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Create the folder ``path`` (and its missing parents) for a command's outputs; if the
    command then fails, remove the folders made here that are still empty, so that bad
    input leaves nothing behind (an export whose calibration data was missing left an empty
    ``--out`` folder)."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the folder ({_why(exc, path)})") from None
    try:
        yield path
    except BaseException:
        _remove_empty(made)
        raise


def once_each(paths) -> tuple[list[str], list[str]]:
    """``paths`` with each file once, by its real path, in order, and the repeats left out
    (as given, with the first spelling when it differs), for the caller's note."""
    out: list[str] = []
    seen: dict[str, str] = {}
    repeats: list[str] = []
    for p in map(os.fspath, paths):
        key = os.path.realpath(p)
        if key in seen:
            repeats.append(p if p == seen[key] else f"{p} (the same file as {seen[key]})")
            continue
        seen[key] = p
        out.append(p)
    return out, repeats


def dangling_link(path: str | os.PathLike) -> str | None:
    """"a symbolic link to X, which does not exist; ..." for a link whose file is gone (it was
    read as "no such file"), else None."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a symbolic link to {os.readlink(path)}, which does not exist; fix or remove the link"
    return None


def link_loop(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a symbolic link that leads back to itself (``open()``: "Too many
    levels of symbolic links")."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def not_a_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a model file, or None when it is a regular file: "no
    such file", a folder, or a pipe or device (``<(cat model.onnx)``, a FIFO), which was
    reported as missing, or as damaged after its first bytes had been read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return dangling_link(path) or "no such file"
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a model file; name the file in it"
    return ("is a pipe or a device, not a file (a process substitution <(...) or a FIFO): the file is read more "
            "than once, so save it to a file first")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there yet: the same name after links are followed
        return os.path.realpath(a) == os.path.realpath(b)


def outputs_clear_of_inputs(outputs, inputs) -> None:
    """Refuse (OutputError) an output file that is one of the command's inputs, or two
    outputs that are one file. ``outputs`` and ``inputs`` are ``(what, path)`` pairs, e.g.
    ``("--json", path)``, ``("the recipe", path)``; ``None`` and ``-`` (standard output) are
    skipped. ``verify --out model.onnx`` wrote its report over the model, ``check --json
    ref.pt --reference ref.pt`` deleted the reference before reading it."""
    def files(pairs):
        return [(what, Path(p)) for what, p in pairs if p is not None and not is_stdout(p)]

    outs, ins = files(outputs), files(inputs)
    for i, (what, out) in enumerate(outs):
        for src_what, src in ins:
            if _same_file(out, src):
                raise OutputError(f"{what} {out}: is also an input ({src_what}{'' if src == out else f' {src}'}); "
                                  "writing there would replace it: write elsewhere")
        for other_what, other in outs[:i]:
            if _same_file(out, other):
                raise OutputError(f"{other_what} and {what} both name {out}; one would replace the other: "
                                  "give each its own file")


# real path -> permission bits of an earlier run's output removed before this run writes it
# again: the new file gets them back, as open() over the old one would have kept them
_REMOVED_MODES: dict[str, int] = {}


def remove_output(path: str | os.PathLike) -> None:
    """Remove an earlier run's output file before this run writes its own, remembering its
    permission bits for :func:`atomic_path` (a file restricted to 0o600 came back 0o644)."""
    path = Path(path)
    _REMOVED_MODES[os.path.realpath(path)] = stat.S_IMODE(path.stat().st_mode)
    path.unlink()


def remove_earlier_outputs(folder: str | os.PathLike, names) -> list[Path]:
    """Remove the files ``names`` (regular files, not links) from ``folder``, before a new run
    writes its own: an interrupted run must never leave an earlier run's results beside its
    own files. Returns what was removed, for the caller's note. A file written again gets
    its old permission bits (:func:`remove_output`)."""
    old = [Path(folder) / n for n in names]
    old = [p for p in old if p.is_file() and not p.is_symlink()]
    for path in old:
        remove_output(path)
    return old


_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # mkstemp's: remove_stale_temps knows these names


def _temp_stem(name: str) -> str:
    """``name`` as its temporary file holds it: cut to fit the 255 bytes a file name may have
    with the 14 the temporary name adds (an output named with 242-255 bytes was refused as
    "File name too long"), at a character's boundary."""
    raw = os.fsencode(name)
    if len(raw) <= _NAME_MAX - 14:
        return name
    cut = raw[:_NAME_MAX - 14]
    try:  # a UTF-8 name loses the character cut in two; another name's bytes are kept as bytes
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsdecode(cut)
    return cut.decode("utf-8", errors="ignore")


_NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def _new_temp(path: Path, mode: int = 0o666) -> Path:
    """A new hidden file beside ``path`` (``.NAME.XXXXXXXX.tmp``), created as ``open()``
    creates a file: ``mode`` (0o666 for a new output) for the kernel to reduce by the umask,
    or to set from the folder's default ACL (``mkstemp``'s 0o600 followed by a chmod ignored
    the ACL)."""
    import secrets

    for _ in range(100):
        tmp = path.parent / f".{_temp_stem(path.name)}.{''.join(secrets.choice(_TEMP_CHARS) for _ in range(8))}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def check_writable(path: str | os.PathLike, *, appends: bool = False) -> None:
    """Refuse (OutputError) an output path that cannot be written, before the work that
    fills it: a folder in its place, a file where a folder of its path should be, a folder
    this user cannot write into or a read-only file system. What it cannot foresee (a full
    disk) is still reported by :func:`atomic_path` when the file is written. Leaves nothing
    behind (it makes and removes one empty file to be sure, since ``os.access`` says yes to
    root in ``/sys``).
    ``appends``: the file is appended to in place (a job summary), so an existing file must
    itself be writable.
    """
    path = Path(path)
    _no_folder_in_the_way(path)
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return  # a device or pipe: atomic_path writes into it or says why not
        if appends:
            if not os.access(path, os.W_OK):
                why = "a read-only file system" if _read_only(path.parent) else "permission denied"
                raise OutputError(f"{path}: cannot append to it ({why}); write elsewhere")
            return
        if not os.access(path, os.W_OK) and not _read_only(path.parent):  # as open() refuses it, before
            # the work (the run removed it as an earlier output, worked, then could not write it)
            raise OutputError(f"{path}: exists and is read-only (mode {stat.S_IMODE(st.st_mode):o}); make it "
                              "writable (chmod u+w) for edgesqueeze to replace it, or write elsewhere")
    parent = Path(os.path.realpath(path)).parent if path.is_symlink() else path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise OutputError(f"{path}: cannot write: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only(existing) else "permission denied"
        raise OutputError(f"{path}: cannot write into {existing} ({why}); write elsewhere")
    try:  # what access() cannot tell (root in /sys or /proc): a real file, made and removed at once
        fd, probe = tempfile.mkstemp(prefix=".edgesqueeze-probe.", dir=existing)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write into {existing} ({exc.strerror or exc}); write elsewhere") from None
    os.close(fd)
    os.unlink(probe)


def _no_folder_in_the_way(path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"{path}: cannot write: a folder is in the way; remove it or write elsewhere")
    if link_loop(path):  # the rename of a finished file replaced the link (verify --out), or resolve() raised
        raise OutputError(f"{path}: cannot write: a symbolic link that leads back to itself; remove the "
                          "link or write elsewhere")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


@contextlib.contextmanager
def _stream_errors(path: Path) -> Iterator[None]:
    """A writer's own OSError on ``path`` (a device or pipe written in place) as one OutputError."""
    try:
        yield
    except OSError as exc:
        ours = exc.filename == str(path) or (exc.filename is None and exc.errno in _WRITE_ERRNOS | {errno.EPIPE})
        if not ours:
            raise
        raise OutputError(f"{path}: cannot write ({_why(exc, path)})") from None


def _why(exc: OSError, path: Path) -> str:
    """The reason in words, and which part of ``path`` is in the way when it is a file."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"{reason}: {blocking} is a file, not a folder"
    if exc.errno == errno.ENAMETOOLONG:
        return f"{reason}: a file name holds at most {_NAME_MAX} bytes and a path 4,096; choose a shorter one"
    return reason


_STALE_TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(directory: str | os.PathLike, log: Callable[[str], None] | None = None, *,
                       names=None) -> list[Path]:
    """Delete temporary files :func:`atomic_path` left behind when a process was killed
    mid-write (SIGKILL runs no cleanup). Only ``.<name>.<random>.tmp`` files are touched, the
    random part as :func:`tempfile.mkstemp` makes it (8 letters, digits or ``_``): verify's
    folder is wherever its first file lies, where another tool's ``.x.tmp`` may be.
    ``log``: told of each file removed, in one line. ``names``: only the temporary files of
    these outputs (verify: its reports, beside which another run's may be written)."""
    removed = []
    folder = Path(directory)
    stems = None if names is None else {_temp_stem(n) for n in names}  # as the temporary names hold them
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            match = _STALE_TEMP.fullmatch(p.name)
            if match and (names is None or match.group(1) in stems) and p.is_file():
                p.unlink()
                removed.append(p)
                if log is not None:
                    log(f"removed {p.name}, left by an interrupted write")
    return removed


_LOCK_NAME = ".edgesqueeze.lock"
# a folder's real path -> (its open lock file, the file's path, the folders made to hold it)
_held_locks: dict[str, tuple[int, Path, list[Path]]] = {}
_lock_scopes: list[list[str]] = []


@contextlib.contextmanager
def output_locks() -> Iterator[None]:
    """Release, when it ends, every output folder :func:`lock_output_folder` locked inside it.
    compress, export, train, sensitivity and verify run in one; a lock taken outside any
    lasts until the process ends. Nested scopes keep their outer scope's locks."""
    _lock_scopes.append([])
    try:
        yield
    finally:
        for key in reversed(_lock_scopes.pop()):
            _release_lock(key)
        if not _lock_scopes:  # the command is over: an output it removed and never wrote again
            _REMOVED_MODES.clear()  # does not lend its mode to a later write in this process


def lock_output_folder(folder: str | os.PathLike, what: str = "edgesqueeze", *, report: str | None = None) -> None:
    """Take the folder ``folder`` for this run's outputs, or refuse (OutputError) when another
    process runs into it: two runs into one folder wrote each file whole but left a mix of
    both runs' files, each removing the other's temporary files as stale. An advisory
    ``flock`` on ``folder/.edgesqueeze.lock``, holding who took it; the kernel drops it when
    the process dies (SIGKILL included), so a stale lock file never blocks the next run. This
    process taking a folder it holds already is a no-op. Where the file system has no locks,
    the run goes on unlocked, as before.
    ``report``: lock only the report of that name in the folder (``.NAME.edgesqueeze.lock``):
    verify writes wherever its files lie, and two reports of other names in one folder (CI
    jobs writing ``/tmp/a.json`` and ``/tmp/b.json``) share no file."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return
    folder = Path(folder)
    key = os.path.join(os.path.realpath(folder), f".{report}" if report else "")
    if key in _held_locks:
        return
    key_folder = os.path.realpath(folder)
    made = [p for p in (Path(key_folder), *Path(key_folder).parents) if not p.exists()]
    try:
        Path(key_folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the folder ({_why(exc, Path(key_folder))})") from None
    path = Path(key_folder) / (f".{report}{_LOCK_NAME}" if report else _LOCK_NAME)
    for _ in range(20):  # the holder unlinks the file as it lets go: lock the file the name names
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            _remove_empty(made)
            raise OutputError(f"{folder}: cannot write into it ({_why(exc, path)}); write elsewhere") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(fd)
            os.close(fd)
            _remove_empty(made)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                what_of = f"{folder / report}: another edgesqueeze run is writing it" if report else \
                    f"{folder}: another edgesqueeze run is writing into it"
                raise OutputError(f"{what_of}{holder}; wait for it to end, or give another output "
                                  f"{'file' if report else 'folder'}") from None
            return  # no locks on this file system (ENOLCK, EOPNOTSUPP): unlocked, as before
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder had just unlinked: take the new one
    else:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": what,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _held_locks[key] = (fd, path, made)
    if _lock_scopes:
        _lock_scopes[-1].append(key)


def _lock_holder(fd: int) -> str:
    """`` (pid N, `edgesqueeze compress`, since ...)`` from a lock file, or nothing."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f" (pid {int(info['pid'])}, `{info['command']}`, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


def _release_lock(key: str) -> None:
    if key not in _held_locks:  # let go of already (abandon)
        return
    fd, path, made = _held_locks.pop(key)
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still ours: nobody else has it while we hold it
            os.unlink(path)
    os.close(fd)  # lets go of the lock
    _remove_empty(made)  # a run refused before its first file leaves no empty folder


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()  # only if empty
        except OSError:
            break


@atexit.register
def _release_all_locks() -> None:
    for key in list(_held_locks):
        _release_lock(key)


_LIVE_TEMPS: set[Path] = set()  # temporary files of atomic writes under way


def abandon() -> None:
    """Remove the temporary files of the writes under way and let go of the output locks: for
    a process about to end with ``os._exit`` (a torchrun rank stopped by SIGTERM), which runs
    no ``finally`` and no ``atexit`` (it left a half-written ``.last.pt.*.tmp`` and the lock)."""
    for tmp in list(_LIVE_TEMPS):
        with contextlib.suppress(OSError):
            tmp.unlink()
    _LIVE_TEMPS.clear()
    with contextlib.suppress(Exception):
        _release_all_locks()


def files_below(root: str | os.PathLike, broken: list[Path] | None = None) -> list[Path]:
    """Every file below the folder ``root``, sorted, following symbolic links to folders (a
    class folder is often a link to where the images are; ``Path.rglob`` does not enter
    such links before Python 3.13, so their images would silently be missing). A link to
    one of its own parent folders (a cycle) is not entered. ``broken``: a list that gets the
    symbolic links that lead nowhere (left out, as they are not files), for the caller's note."""
    out: list[Path] = []
    root = Path(root)
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        real = os.path.realpath(here)
        if here != root:
            up = os.path.realpath(here.parent)
            walked = [p for p in here.parents if p == root or root in p.parents]
            if (up == real or up.startswith(real.rstrip(os.sep) + os.sep)
                    or any(os.path.realpath(p) == real for p in walked)):
                dirs[:] = []  # a link back up the tree: walking it would never end
                continue
        out += [here / f for f in files if os.path.isfile(here / f)]
        if broken is not None:
            broken += [here / f for f in files if os.path.islink(here / f) and not os.path.exists(here / f)]
    return sorted(out)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def utf8_text(text: str) -> bytes:
    """``text`` as UTF-8, with a file name that is not UTF-8 shown as its bytes: Python holds
    such a name's bytes as lone surrogates (``b"m\\xff.onnx"`` as ``"m\\udcff.onnx"``), which
    UTF-8 cannot encode, so a report naming it failed with a traceback after the work was done.
    They are written ``m\\xff.onnx``, as ``ls -b`` shows the name; any other lone surrogate as
    ``\\udXXX``. JSON needs none of this: ``json.dumps`` escapes them, and reads back the name."""
    return text.encode("utf-8", errors=_NAME_BYTES)  # UTF-8 fails on lone surrogates only


def _name_bytes(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start:exc.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
                   for c in bad), exc.end


_NAME_BYTES = "edgesqueeze-name-bytes"
codecs.register_error(_NAME_BYTES, _name_bytes)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, utf8_text(text))


def is_stdout(path: str | os.PathLike | None) -> bool:
    """``-`` given as an output file: standard output, as for most command-line tools."""
    return path is not None and str(path) == "-"


def names_standard_output(path: str | os.PathLike | None) -> bool:
    """``-``, or a path to the pipe or terminal standard output is (``/dev/stdout``,
    ``/dev/fd/1``): where a machine-readable output goes, the human-readable text must not."""
    if is_stdout(path):
        return True
    if path is None:
        return False
    try:
        st, out = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no such file; a stdout without a descriptor (a test runner's)
        return False
    return not stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


def write_text_output(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, or to standard output when ``path`` is ``-``."""
    if is_stdout(path):
        sys.stdout.flush()
        sys.stdout.buffer.write(utf8_text(text))
        sys.stdout.buffer.flush()
    else:
        write_text_atomic(path, text)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class NativeStderr:
    """What :func:`native_stderr` caught: ``text`` once the block has ended."""

    text: str = ""


# Lines native converters and runtimes print on every successful run, which tell a user
# nothing: absl's preamble and INFO records (the TFLite converter's MLIR passes), and
# LiteRT's note that it applied XNNPACK (it always does on a CPU).
NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    r"|\s*$)")


def not_noise(line: str) -> bool:
    return NATIVE_NOISE.match(line) is None


# fd 2 is the process's: two threads swapping it at once (TFLite files loaded in threads)
# restored each other's temporary file, and stderr went into a deleted file for good
_STDERR_SWAP = threading.RLock()


@contextlib.contextmanager
def native_stderr(keep: Callable[[str], bool] = not_noise) -> Iterator[NativeStderr]:
    """Route file descriptor 2 into a temporary file for the block: C++ code (LiteRT, the
    TFLite converter, TFLite Micro) writes there directly, past ``sys.stderr``. On exit the
    caught text is in the yielded object's ``text``, and its lines for which ``keep`` is
    true are written to stderr (so warnings and errors still reach the user, after the
    block). ``keep=lambda line: False`` swallows everything. Where there is no file
    descriptor 2 to redirect, nothing is caught. One thread at a time holds fd 2 (a
    process-wide lock): blocks in other threads wait."""
    with _STDERR_SWAP:
        with _native_stderr(keep) as caught:
            yield caught


@contextlib.contextmanager
def _native_stderr(keep: Callable[[str], bool]) -> Iterator[NativeStderr]:
    caught = NativeStderr()
    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield caught
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield caught
        finally:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            caught.text = tmp.read().decode(errors="replace")
            rest = "".join(line for line in caught.text.splitlines(keepends=True) if keep(line))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()
