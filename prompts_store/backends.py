"""Where the store's bytes live: a local directory (default) or any fsspec filesystem.

The store needs five operations; each backend says how it makes them safe:

    read(path)             the whole file, with one open and one read
    write_dir(path, files) make a complete version directory appear at ``path``
    replace(path, data)    switch a small file (the head document) atomically
    lock()                 one writer at a time, across processes
    cleanup()              drop what a writer killed mid-publish left behind (called under lock)

Paths are relative and '/'-separated, built by the store from validated names only; backends
still refuse empty, '.', '..' and absolute components as a second line of defence.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .errors import StoreError, StoreLockTimeout

log = logging.getLogger(__name__)

TMP_DIR = "tmp"  # local staging area, inside the root so renames stay on one filesystem
LOCK_FILE = ".lock"


class Backend(Protocol):
    url: str

    def read(self, path: str) -> bytes: ...  # FileNotFoundError when absent
    def write_dir(self, path: str, files: dict[str, bytes]) -> None: ...
    def replace(self, path: str, data: bytes) -> None: ...
    def lock(self) -> contextlib.AbstractContextManager[None]: ...
    def cleanup(self) -> None: ...


def _check_relative(path: str) -> list[str]:
    parts = path.split("/")
    if any(p in ("", ".", "..") or "\x00" in p or "\\" in p for p in parts):
        raise StoreError(f"refusing unsafe store path {path!r}")
    return parts


def _backoff(attempt: int) -> float:
    return min(0.001 * 2 ** attempt, 0.01)


# --- local directory --------------------------------------------------------------------------

class LocalBackend:
    """A directory on a POSIX filesystem.

    Versions are written into ``tmp/``, fsynced, and renamed into place; the head is replaced with
    ``os.replace`` after an fsync; directories are fsynced after every entry change. Writers are
    serialised by ``fcntl.flock`` on ``.lock``, which the kernel releases when a writer dies.
    """

    def __init__(self, root: str | os.PathLike[str], *, lock_timeout: float = 60.0) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)
        self.lock_timeout = lock_timeout

    def _path(self, path: str) -> Path:
        return self.root.joinpath(*_check_relative(path))

    def read(self, path: str) -> bytes:
        with open(self._path(path), "rb") as f:
            return f.read()

    def write_dir(self, path: str, files: dict[str, bytes]) -> None:
        final = self._path(path)
        staging = self._tmp() / f"stage-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for name, data in files.items():
                _write_synced(staging / name, data)
            _fsync_dir(staging)
        except OSError:  # a full disk: its partial files would keep it full until the next writer's cleanup
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _ensure_dir(final.parent)
        if final.exists():  # left by a writer killed between this rename and its head switch
            trash = self._tmp() / f"trash-{uuid.uuid4().hex}"
            os.rename(final, trash)
            shutil.rmtree(trash)
        os.rename(staging, final)
        _fsync_dir(final.parent)

    def replace(self, path: str, data: bytes) -> None:
        dest = self._path(path)
        _ensure_dir(dest.parent)
        tmp = self._tmp() / f"{dest.name}.{uuid.uuid4().hex}"
        try:
            _write_synced(tmp, data)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        _ensure_dir(self.root)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire(fd)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int) -> None:
        deadline = time.monotonic() + self.lock_timeout
        attempt = 0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise StoreLockTimeout(f"store {self.url}: another writer held the lock for more "
                                       f"than {self.lock_timeout:g} s")
            time.sleep(_backoff(attempt))
            attempt += 1

    def cleanup(self) -> None:
        # Under the lock nobody else is writing, so everything in tmp/ belongs to a dead writer.
        tmp = self.root / TMP_DIR
        if not tmp.is_dir():
            return
        for entry in tmp.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _tmp(self) -> Path:
        tmp = self.root / TMP_DIR
        _ensure_dir(tmp)
        return tmp


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """Create ``path`` and missing parents, fsyncing each parent so the new entries survive a crash."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    _fsync_dir(path.parent)


# --- fsspec (memory://, s3://, gs://, ...) ----------------------------------------------------

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(key: str) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(key, threading.Lock())


class FsspecBackend:
    """Any fsspec filesystem, through the fsspec API only.

    Object stores have no rename, so a version's files are written straight to their final keys
    (task.json last); they become visible only when the head object is replaced, and a single-object
    PUT is atomic on S3 and GCS. The writer lock is a lock object created with
    ``pipe_file(mode="create")``, which is mutually exclusive only where the filesystem implements
    it as a conditional write (see docs/store.md). A lock older than ``stale_lock_after`` seconds is
    taken to belong to a dead writer and is broken.
    """

    def __init__(self, fs, root: str, url: str, *, lock_timeout: float = 60.0,
                 stale_lock_after: float = 300.0) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self.lock_timeout = lock_timeout
        self.stale_lock_after = stale_lock_after

    def _path(self, path: str) -> str:
        return "/".join([self.root, *_check_relative(path)])

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(self._path(path))

    def write_dir(self, path: str, files: dict[str, bytes]) -> None:
        final = self._path(path)
        self.fs.invalidate_cache(final)
        if self.fs.exists(final):  # left by a writer that died before its head switch
            self.fs.rm(final, recursive=True)
        for name in sorted(files, key=lambda n: n.endswith(".json")):  # task.json last
            self.fs.pipe_file(f"{final}/{name}", files[name])

    def replace(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(path), data)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        path = self._path(LOCK_FILE)
        # Threads of this process queue on a local lock first: exclusive create is not atomic
        # between threads on every fsspec filesystem (memory:// checks, then creates).
        local = _thread_lock(self.fs.unstrip_protocol(path))
        if not local.acquire(timeout=self.lock_timeout):
            raise StoreLockTimeout(f"store {self.url}: another thread held the lock for more than "
                                   f"{self.lock_timeout:g} s")
        try:
            token = uuid.uuid4().hex
            self._acquire(path, token)
            try:
                yield
            finally:
                self._release(path, token)
        finally:
            local.release()

    def _acquire(self, path: str, token: str) -> None:
        body = json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                           "time": time.time()}).encode()
        deadline = time.monotonic() + self.lock_timeout
        attempt = 0
        while True:
            try:
                self.fs.pipe_file(path, body, mode="create")
                return
            except FileExistsError:
                self._break_if_stale(path)
            except TypeError as exc:  # an fsspec implementation without exclusive create
                raise StoreError(f"store {self.url}: this filesystem cannot create a file "
                                 f"exclusively, so writers cannot be locked ({exc})") from exc
            if time.monotonic() > deadline:
                raise StoreLockTimeout(f"store {self.url}: lock object {path} was held for more "
                                       f"than {self.lock_timeout:g} s")
            time.sleep(_backoff(attempt))
            attempt += 1

    def _break_if_stale(self, path: str) -> None:
        try:
            held_since = float(json.loads(self.fs.cat_file(path))["time"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            held_since = 0.0  # unreadable lock: nobody can own it
        if time.time() - held_since > self.stale_lock_after:
            log.warning("store %s: breaking stale lock %s", self.url, path)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path)

    def _release(self, path: str, token: str) -> None:
        try:
            owner = json.loads(self.fs.cat_file(path)).get("token")
        except (FileNotFoundError, ValueError):
            owner = None
        if owner == token:
            self.fs.rm(path)
        else:
            log.warning("store %s: lock %s was broken by another writer while held", self.url, path)

    def cleanup(self) -> None:
        pass  # nothing is staged: write_dir replaces any orphaned version itself


def make_backend(url: str | os.PathLike[str], *, lock_timeout: float = 60.0) -> Backend:
    """A plain path or ``file://`` URL gives a ``LocalBackend``; any other URL goes to fsspec."""
    text = os.fspath(url)
    if "://" not in text:
        return LocalBackend(text, lock_timeout=lock_timeout)
    import fsspec  # only needed for URLs
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, root = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:  # unknown protocol, or its package is not installed
        raise StoreError(f"cannot open store {text!r}: {exc}") from exc
    if isinstance(fs, LocalFileSystem):
        return LocalBackend(root, lock_timeout=lock_timeout)
    return FsspecBackend(fs, root, text, lock_timeout=lock_timeout)
