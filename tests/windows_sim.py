"""Windows' file semantics, switched on in a Linux process (no Windows machine runs this project).

Each behaviour is one documented Windows difference that once broke a promise of ours:
  - a folder cannot be opened (so not fsynced):              os.open(folder) -> EACCES
  - fsync needs a handle that may write:                      os.fsync(read-only fd) -> EBADF
  - os.open without O_BINARY is text mode: `\\n` is written as `\\r\\n` (os.O_BINARY is defined here,
    as on Windows, and writes through a descriptor opened without it are translated)
  - a file this process holds open cannot be renamed or removed, nor a folder holding one
    (PermissionError, winerror 32: a sharing violation)
  - os.path.normcase is ntpath's (lower case, backslashes), which fnmatch.fnmatch consults
and chroma_resume.osfs is told it runs on Windows (its platform decisions: no folder fsync, fsync
through a write handle). The rest (sys.platform, signals, filelock's flock) stays Linux.

Use: `install()` in a process (tests: the `windows_semantics` fixture undoes it), or run the CLI
under it: `python tests/windows_sim.py build --docs corpus ...` (exit code and kills as the CLI's).
"""
from __future__ import annotations

import errno
import fcntl
import ntpath
import os
import posixpath
import sys

O_BINARY = 1 << 30  # a bit Linux does not use; stripped before the real open
_real = {name: getattr(os, name) for name in ("open", "write", "close", "fsync", "replace", "rename", "unlink",
                                                "remove")}
_real_normcase = posixpath.normcase
_text_mode: set[int] = set()


def _sim_open(path, flags, mode=0o777, *, dir_fd=None):
    if dir_fd is None and os.path.isdir(path):
        raise PermissionError(errno.EACCES, "Permission denied (Windows cannot open a folder)", path)
    fd = _real["open"](path, flags & ~O_BINARY, mode, dir_fd=dir_fd)
    if flags & (os.O_WRONLY | os.O_RDWR) and not flags & O_BINARY:
        _text_mode.add(fd)
    else:
        _text_mode.discard(fd)
    return fd


def _sim_write(fd, data):
    if fd in _text_mode:
        _real["write"](fd, bytes(data).replace(b"\n", b"\r\n"))
        return len(data)  # the CRT counts the caller's bytes
    return _real["write"](fd, data)


def _sim_close(fd):
    _text_mode.discard(fd)
    return _real["close"](fd)


def _sim_fsync(fd):
    fd = fd if isinstance(fd, int) else fd.fileno()
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        raise OSError(errno.EBADF, "Bad file descriptor (Windows: FlushFileBuffers needs write access)")
    return _real["fsync"](fd)


def held_open() -> list[str]:
    """What this process holds open, by real path."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return found


def _refuse_if_open(*paths) -> None:
    held = held_open()
    for path in paths:
        real = os.path.realpath(path)
        if any(h == real or h.startswith(real + "/") for h in held):
            exc = PermissionError(errno.EACCES, "The process cannot access the file because it is being used by "
                                                "another process", path)
            exc.winerror = 32
            raise exc


def _sim_replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
    if src_dir_fd is None and dst_dir_fd is None:
        _refuse_if_open(src, dst)
    return _real["replace"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def _sim_rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
    if src_dir_fd is None and dst_dir_fd is None:
        _refuse_if_open(src, dst)
    return _real["rename"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def _sim_unlink(path, *, dir_fd=None):
    if dir_fd is None:
        _refuse_if_open(path)
    return _real["unlink"](path, dir_fd=dir_fd)


PATCHES = {"open": _sim_open, "write": _sim_write, "close": _sim_close, "fsync": _sim_fsync,
           "replace": _sim_replace, "rename": _sim_rename, "unlink": _sim_unlink, "remove": _sim_unlink}


def install(setattr_=setattr) -> None:
    """Switch every behaviour on (setattr_: monkeypatch.setattr to have it undone)."""
    setattr_(os, "O_BINARY", O_BINARY)
    for name, fake in PATCHES.items():
        setattr_(os, name, fake)
    setattr_(posixpath, "normcase", ntpath.normcase)
    from chroma_resume import osfs

    setattr_(osfs, "IS_WINDOWS", True)
    setattr_(osfs, "O_BINARY", O_BINARY)


if __name__ == "__main__":
    install()
    if os.environ.get("WINDOWS_SIM_FORGET_BINARY"):  # the bug this simulation must catch: text-mode opens
        from chroma_resume import osfs

        osfs.O_BINARY = 0
    from chroma_resume.cli import main

    sys.exit(main(sys.argv[1:]))
