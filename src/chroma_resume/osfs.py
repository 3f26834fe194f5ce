"""Every operating-system-dependent file operation of the package, and nothing else.

Why one module: Windows differs from POSIX in ways that each broke a promise silently
(tests/test_osfs.py and tests/test_windows_semantics.py list them). Here they are decided once:

- files are opened binary on every OS (`O_BINARY`): without it Windows writes `\\r\\n` into
  the WAL and every record reads as damaged;
- a file is fsynced through a handle that may write (Windows refuses `fsync` on a read-only one);
- a folder is fsynced where the OS can (POSIX); NTFS journals its metadata and cannot open a folder;
- replace and unlink retry briefly on a sharing violation (a reader, an antivirus scanner or
  Chroma's own handle keeps a file open for a moment on Windows);
- locks are `filelock`'s (flock on POSIX, LockFileEx on Windows); the holder's pid/host/run is
  kept in a sidecar file, since Windows does not let another process read a locked byte range.

No other module of the package calls `os.open`, `os.fsync`, `os.replace`, `os.pread/pwrite`
or a lock directly (tests/test_osfs.py scans for it).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import filelock

from .errors import RuntimeFailure

IS_WINDOWS = sys.platform == "win32"
O_BINARY: int = getattr(os, "O_BINARY", 0)  # 0 on POSIX, where there is no text mode

# A sharing violation lasts as long as another handle is open: a few tenths of a second for a
# scanner or a reader; longer is a real holder, reported with its error.
_SHARING_WAITS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
_SHARING_WINERRORS = frozenset({5, 32})  # ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION

# A holder killed a moment ago may still hold its lock while Windows tears the process down;
# a second is enough there and costs nothing where the OS releases at once.
LOCK_GRACE_SEC = 1.0


# ---- opening, writing, syncing ------------------------------------------------------------

def open_for_write(path: str, *, append: bool = False, truncate: bool = False, create: bool = True,
                   mode: int = 0o644) -> int:
    """A binary write descriptor (O_BINARY where it exists); raises OSError."""
    flags = os.O_WRONLY | O_BINARY
    flags |= os.O_APPEND if append else 0
    flags |= os.O_TRUNC if truncate else 0
    flags |= os.O_CREAT if create else 0
    return os.open(path, flags, mode)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (os.write may write fewer on a full disk; the retry raises its errno)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_bytes(path: str, data: bytes) -> None:
    """Append with one write to a file made if missing (logs and traces; not fsynced)."""
    fd = open_for_write(path, append=True)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def fsync(fd: int) -> None:
    """fsync through `fd`, which must have been opened for writing (Windows refuses otherwise)."""
    os.fsync(fd)


def fsync_file(path: str) -> None:
    """Make a file's bytes durable by its path. POSIX syncs through a read-only descriptor (a file
    made read-only still syncs); Windows needs a handle that may write. Raises OSError."""
    fd = os.open(path, (os.O_RDWR | O_BINARY) if IS_WINDOWS else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the names in folder `path` durable (a file created, renamed or removed); raises OSError.
    A no-op on Windows: a folder cannot be opened there, and NTFS journals its metadata."""
    if IS_WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate_durably(path: str, size: int) -> None:
    """Cut a file back to `size` bytes and make that durable; raises OSError."""
    fd = open_for_write(path, create=False)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Replace `path` by `data` so a reader never sees half a file, even after a power cut:
    temp file, fsync, replace, fsync of the folder. Raises RuntimeFailure naming the file."""
    folder = os.path.dirname(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = open_for_write(tmp, truncate=True)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        replace(tmp, path)
        fsync_dir(folder)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise RuntimeFailure(f"cannot write {path}: {exc.strerror or exc}") from None


def sync_and_replace(tmp: str, target: str) -> None:
    """A file written by someone else's code (an exporter): its bytes on disk before its name."""
    fsync_file(tmp)
    replace(tmp, target)


# ---- renaming and removing ------------------------------------------------------------------

def _sharing_violation(exc: OSError) -> bool:
    """Windows' "in use by another process" (a POSIX EACCES is a real permission error: no retry)."""
    return isinstance(exc, PermissionError) and getattr(exc, "winerror", None) in _SHARING_WINERRORS


def _retrying(action, *args) -> None:
    for wait in (*_SHARING_WAITS, None):
        try:
            action(*args)
            return
        except OSError as exc:
            if wait is None or not _sharing_violation(exc):
                raise
            time.sleep(wait)


def replace(src: str, dst: str) -> None:
    """os.replace (atomic on both OSes), retried for about 0.7 s while another handle holds either
    name open (a Windows sharing violation); raises the last OSError."""
    _retrying(os.replace, src, dst)


def unlink(path: str) -> None:
    """os.unlink, retried like `replace`; raises OSError (FileNotFoundError included)."""
    _retrying(os.unlink, path)


# ---- locks ----------------------------------------------------------------------------------

class LockBusy(Exception):
    """Another process holds the lock; `holder` is what its sidecar says (see read_holder)."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path}: {holder}")
        self.path, self.holder = path, holder


def holder_path(lock_path: str) -> str:
    return f"{lock_path}.holder"


@contextlib.contextmanager
def exclusive_lock(path: str, *, wait: float | None = None, holder: dict | None = None,
                   on_busy: Callable[[], object] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on file `path` (made if missing); the OS frees it if this process dies.

    wait: seconds to wait for another holder before LockBusy; None waits as long as it takes.
    holder: written to the sidecar `<path>.holder` once the lock is held, for the next contender's
    message (an OSError writing it releases the lock and propagates).
    on_busy: called once when the lock is taken already and this call will wait for it."""
    # no soft fallback: a filesystem without locks must fail the build, not let two writers in
    lock = filelock.FileLock(path, mode=0o644, thread_local=False, fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if on_busy is not None:
            on_busy()
        try:
            lock.acquire(timeout=-1 if wait is None else wait)
        except filelock.Timeout:
            raise LockBusy(path, read_holder(path)) from None
    try:
        if holder is not None:
            fd = open_for_write(holder_path(path), truncate=True)
            try:
                write_all(fd, json.dumps(holder).encode())
            finally:
                os.close(fd)
        yield
    finally:
        lock.release()


HOLDER_WAIT = 0.5  # seconds a holder has to write its record after taking the lock


def read_holder(lock_path: str) -> str:
    """`pid=… host=… run_id=… started_at=…` from the sidecar. A holder writes it just after taking the
    lock, so an empty or missing record is waited for briefly, then reported as a writer still starting."""
    deadline = time.monotonic() + HOLDER_WAIT
    while True:
        try:
            with open(holder_path(lock_path), "rb") as fh:
                info = json.loads(fh.read() or b"{}")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and info.get("pid") is not None:
            return " ".join(f"{k}={info.get(k)}" for k in ("pid", "host", "run_id", "started_at"))
        if time.monotonic() > deadline:
            return "a writer that is starting (its record is not written yet): rerun in a moment"
        time.sleep(0.05)


WINDOWS_MAX_PATH = 260  # MAX_PATH, counting the terminating NUL


def beyond_windows_path_limit(path: str) -> bool:
    """On Windows without long paths enabled, a path this long fails with "not found" (ENOENT,
    WinError 3 or 206): the one cause its message would not name."""
    return IS_WINDOWS and len(os.path.abspath(path)) >= WINDOWS_MAX_PATH


# ---- processes --------------------------------------------------------------------------------

def usable_cpus() -> int:
    """Cores this process may run on (its affinity on Linux; every core elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def kill_self() -> None:
    """End this process at once, no clean-up run: SIGKILL on POSIX, TerminateProcess on Windows
    (os.kill with any signal there); os._exit if even that returns."""
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
    os._exit(137)
