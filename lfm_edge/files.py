"""Every file lfm-edge writes (a saved chat, a converted or demo GGUF) goes through here.

    with atomic_output("model.gguf") as tmp:   # write tmp by its path (GGUFWriter opens it)
        ...
    write_atomic("chat.json", text)            # or the whole content at once

What it promises:
- the output is whole or absent: written to a temporary file beside it, fsynced, renamed
  over the target, and the folder fsynced so the rename itself survives a power cut;
- only a regular file is ever replaced: a directory, FIFO, device or socket given as the
  output is refused in one sentence (the atomic rename would swap whatever was there);
- a symlink is written through: the link stays, its target is replaced (atomically);
- a replaced file keeps its permission bits (and owner, where allowed);
- temporary files are named `.NAME.lfm-edge-tmp.PID`; one left by a process that died
  (kill -9 mid-save) is swept at the next save into that folder.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LfmEdgeError

TMP_MARK = ".lfm-edge-tmp."
TMP_NAME = re.compile(r"^\..*\.lfm-edge-tmp\.(\d+)$", re.DOTALL)
MAX_NAME = 200  # bytes of the target's name kept in the temporary name (NAME_MAX is 255)
SYMLINK_HOPS = 40  # as the kernel's MAXSYMLINKS

_busy: dict[str, threading.Lock] = {}  # target -> its lock: one writer per target in this process
_busy_lock = threading.Lock()


def kind_of(mode: int) -> str:
    """What a non-regular file is, for the sentence that refuses it."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def resolve_output(path: str | os.PathLike[str]) -> Path:
    """The file a write to `path` replaces: `path` itself, or the end of its chain of
    symlinks (made absolute); refused in one sentence if that is not a regular file."""
    given = Path(path)
    target = Path(os.path.abspath(given))
    for _ in range(SYMLINK_HOPS):
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return target  # a new file (or a dangling link's target: created)
        except OSError as e:
            raise LfmEdgeError(f"cannot write {given}: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            try:
                link = os.readlink(target)
            except OSError as e:
                raise LfmEdgeError(f"cannot write {given}: {e.strerror or e}") from None
            target = Path(os.path.abspath(os.path.join(target.parent, link)))
            continue
        if not stat.S_ISREG(st.st_mode):
            shown = given if target == Path(os.path.abspath(given)) else f"{given} (-> {target})"
            what = kind_of(st.st_mode)
            raise LfmEdgeError(f"cannot write {shown}: it is {what}, and only a regular file is replaced")
        return target
    raise LfmEdgeError(f"cannot write {given}: too many levels of symbolic links")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31  # it exists, and is someone else's
    return True


def sweep_stale(folder: Path) -> int:
    """Remove the temporary files of lfm-edge processes that are gone; how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = TMP_NAME.match(entry.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass  # gone already, or not ours to remove
    return removed


def tmp_name(target: Path) -> Path:
    name = os.fsencode(target.name)[:MAX_NAME].decode(errors="ignore") or "out"
    return target.with_name(f".{name}{TMP_MARK}{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a folder we may write but not open (rare): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # folders some file systems cannot sync
            raise
    finally:
        os.close(fd)


def _target_lock(target: Path) -> threading.Lock:
    with _busy_lock:
        return _busy.setdefault(str(target), threading.Lock())


@contextmanager
def atomic_output(path: str | os.PathLike[str], make_parents: bool = False) -> Iterator[Path]:
    """A temporary path to write the output to; on a clean exit it replaces `path` (see the
    module's docstring), on an exception it is removed and `path` is left as it was."""
    target = resolve_output(path)
    folder = target.parent
    if make_parents:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LfmEdgeError(f"cannot write {path}: cannot create {folder} ({e.strerror or e})") from None
    if not folder.is_dir():
        raise LfmEdgeError(f"cannot write {path}: there is no folder {folder}")
    with _target_lock(target):
        sweep_stale(folder)
        tmp = tmp_name(target)
        try:
            tmp.unlink(missing_ok=True)  # ours by its PID and not in use (the lock): an earlier process's
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise LfmEdgeError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            keep_mode(fd, target)
            os.close(fd)
            yield tmp
            finish(tmp, target, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def keep_mode(fd: int, target: Path) -> None:
    """A replaced file keeps its permission bits and, where we may, its owner."""
    try:
        st = os.stat(target)
    except OSError:
        return
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    if hasattr(os, "fchown"):
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except OSError:
            pass


def finish(tmp: Path, target: Path, given: str | os.PathLike[str]) -> None:
    """fsync the written temporary file, rename it over the target, fsync the folder."""
    try:
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        resolve_output(target)  # still a regular file (or nothing) just before the rename
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        raise LfmEdgeError(f"cannot write {given}: {e.strerror or e}") from None


def write_atomic(path: str | os.PathLike[str], data: bytes | str, make_parents: bool = False) -> Path:
    """Write `data` (str: as UTF-8) to `path` atomically; the file written (a symlink's target)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_output(path, make_parents) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(raw)
        except OSError as e:
            raise LfmEdgeError(f"cannot write {path}: {e.strerror or e}") from None
    return resolve_output(path)
