"""Named crash hooks for fault injection, inert unless CHROMA_RESUME_FAILPOINTS is set.

Grammar (entries separated by ';'):  name[:EVENT][@N]=kill|torn|raise|sleep(MS)|on
  - `@N` fires on the N-th hit of that point only; without it, on every hit.
  - kill: end this process at once (SIGKILL; TerminateProcess on Windows); torn: the caller writes half its
    record, then kill; raise: OSError(EIO); sleep(MS): pause; on: a boolean switch
    (used by `bug.*` switches that plant known bugs to prove the harness catches them).
  - `trace=PATH` appends every hit as `name:EVENT` to PATH, to list a run's boundaries.
This module and the variable named by --chroma-headers-env are the only environment the package reads.
"""
from __future__ import annotations

import errno
import os
import re
import time

from . import osfs

ENV = "CHROMA_RESUME_FAILPOINTS"
_ENTRY = re.compile(r"^(?P<name>[\w.]+)(?::(?P<event>\w+))?(?:@(?P<n>\d+))?=(?P<action>kill|torn|raise|on|sleep\((?P<ms>\d+)\))$")


def _parse(spec: str) -> tuple[dict, str | None]:
    points: dict[tuple[str, str | None], tuple[int | None, str, int]] = {}
    trace = None
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        if entry.startswith("trace="):
            trace = entry[6:]
            continue
        m = _ENTRY.match(entry)
        if not m:
            raise ValueError(f"{ENV}: cannot parse {entry!r} (expected name[:EVENT][@N]=kill|torn|raise|sleep(MS)|on)")
        action = "sleep" if m["ms"] else m["action"]
        points[(m["name"], m["event"])] = (int(m["n"]) if m["n"] else None, action, int(m["ms"] or 0))
    return points, trace


_points, _trace = _parse(os.environ.get(ENV, ""))
_active = bool(_points or _trace)
_hits: dict[tuple[str, str | None], int] = {}


def fire(name: str, event: str | None = None) -> str | None:
    """Called at a boundary. Returns 'torn' when the caller must tear its write; else acts or returns None."""
    if not _active:
        return None
    if _trace:
        osfs.append_bytes(_trace, f"{name}:{event or ''}\n".encode())
    for key in dict.fromkeys(((name, event), (name, None))):  # one key when event is None: count a hit once
        if key not in _points:
            continue
        nth, action, ms = _points[key]
        _hits[key] = _hits.get(key, 0) + 1
        if nth is not None and _hits[key] != nth:
            continue
        if action == "kill":
            kill_self()
        if action == "raise":
            raise OSError(errno.EIO, f"failpoint {name}:{event or ''} injected an I/O error")
        if action == "sleep":
            time.sleep(ms / 1000)
        return action
    return None


def enabled(switch: str) -> bool:
    """A planted-bug switch such as `bug.skip_old_delete=on`."""
    return _active and (switch, None) in _points


def kill_self() -> None:
    osfs.kill_self()
