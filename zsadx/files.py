"""File-system rules every writer in zsadx follows.

* Atomic writes: a unique temporary name in the target's folder, then ``os.replace``; a temp file
  is removed when the write fails, and a full disk becomes a :class:`DiskFullError` naming the path.
* Ownership: a folder zsadx writes as a whole (a converted dataset, a shard folder) carries an
  ``.zsadx-owner.json`` marker; zsadx replaces or deletes only folders or files it marked.
* Locks: ``FolderLock`` is an ``flock`` on a file inside the folder, released by the kernel when its
  holder dies (no stale locks after a kill); the file names the holder for the error message.
* Names that become paths (grid labels, dataset and class names, index entries) go through
  :func:`safe_component` / :func:`resolve_within`, so nothing is read or written outside its root.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from zsadx.errors import DiskFullError, LockedError, UnsafePathError, UserError

OWNER_FILE = ".zsadx-owner.json"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


# ------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------

def temp_path(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path``, unique across processes, hosts and threads."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_writer_alive(name: str) -> bool:
    """Whether the process that named a :func:`temp_path` file still runs (on this host): its temp
    file may be in flight. Names that carry no pid count as dead."""
    pid = name.rpartition(".tmp-")[2].split("-")[0]
    return pid.isdigit() and pid_alive(int(pid))


def disk_full(exc: BaseException, path: str | os.PathLike) -> Optional[DiskFullError]:
    """The one-line error for an OSError that means 'no space left', else None."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return DiskFullError(exc.errno, f"{path}: no space left on the device (or quota exceeded) while "
                                        f"writing; free space and run the same command again")
    return None


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        full = disk_full(exc, path)
        if full is not None:
            raise full from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, **kwargs))


def hash_file(path: str | os.PathLike, digest=None, algorithm: str = "sha256"):
    """Feed a file's bytes into ``digest`` (a new ``algorithm`` digest when None) in 1 MiB blocks;
    returns the digest, so several files can go into one."""
    digest = digest if digest is not None else hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


# ------------------------------------------------------------------------------------------
# Ownership markers
# ------------------------------------------------------------------------------------------

def mark_owned(folder: str | os.PathLike, kind: str, **info) -> None:
    """Record that zsadx wrote ``folder`` (as a ``kind``: 'dataset', 'shards', ...)."""
    atomic_write_json(Path(folder) / OWNER_FILE, {"kind": kind, "written_by": "zsadx", **info}, indent=1)


def owner_kind(folder: str | os.PathLike) -> Optional[str]:
    """The kind zsadx marked ``folder`` with, or None when zsadx did not write it."""
    f = Path(folder) / OWNER_FILE
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) and data.get("written_by") == "zsadx" else None


# ------------------------------------------------------------------------------------------
# Locks
# ------------------------------------------------------------------------------------------

_HELD_LOCK_FDS: set[int] = set()


def _drop_locks_in_forked_child() -> None:
    # A forked child (a DataLoader worker, a pool process) shares the lock's open file: orphaned by
    # a killed holder, it would keep the folder locked until it noticed. Closing the child's copy
    # leaves the parent's lock in place (flock belongs to the open file, which the parent still has).
    for fd in list(_HELD_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_forked_child)


class FolderLock:
    """An exclusive lock on ``folder`` held through ``folder/<name>``.

    ``wait=False``: a held lock raises :class:`LockedError` naming the holder (user, host, pid,
    command, since when). ``wait=True``: block until the holder releases it (or dies). The lock
    file is opened close-on-exec and closed in forked children, so only the holder keeps it.
    """

    def __init__(self, folder: str | os.PathLike, what: str, name: str = ".zsadx.lock", wait: bool = False):
        self.folder, self.what, self.wait = Path(folder), what, wait
        self.path = self.folder / name
        self._fd: Optional[int] = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        return (f"{info.get('user', '?')}@{info.get('host', '?')} pid {info.get('pid', '?')} "
                f"({info.get('command', '?')}, since {info.get('since', '?')})")

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{self.folder}: {self.what} is in use by {self.holder()}; wait for it to "
                              f"finish (or pass the option to wait for the lock)") from None
        info = {"user": _user(), "host": socket.gethostname(), "pid": os.getpid(),
                "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200],
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCK_FDS.discard(self._fd)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


# ------------------------------------------------------------------------------------------
# Names that become paths
# ------------------------------------------------------------------------------------------

def safe_component(name: str, what: str) -> str:
    """``name`` as one path component, or an error naming ``what`` (e.g. "grid label 'x'")."""
    s = str(name)
    if (not s or s in (".", "..") or "/" in s or "\\" in s or "\x00" in s or s.startswith("~")
            or s != s.strip()):
        raise UnsafePathError(f"{what} {s!r} cannot be used as a file or folder name: use letters, digits, "
                              f"'-', '_' and '.', without '/' or '..'")
    return s


def resolve_within(root: str | os.PathLike, relative: str | os.PathLike, what: str) -> Path:
    """``root / relative``, refused when it leads outside ``root`` (through '..', an absolute path
    or a symbolic link)."""
    root_r = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise UnsafePathError(f"{what} {str(relative)!r} is an absolute path; it must lie inside {root}")
    target = (root_r / rel).resolve()
    if target != root_r and not target.is_relative_to(root_r):
        raise UnsafePathError(f"{what} {str(relative)!r} leads outside {root}")
    return target


__all__ = ["OWNER_FILE", "FolderLock", "UserError", "atomic_target", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "disk_full", "hash_file", "is_temp_name", "mark_owned", "owner_kind", "resolve_within",
           "safe_component", "temp_path"]
