"""`python -m fault_injection.engine ARGS`: the engine's CLI, watched for fsyncs, and pinned.

Power loss keeps exactly what was fsynced. The WAL's own `synced_to` fields only say what
the engine *declares*, and miss an fsync after the last record (a commit group's, the barrier
before a delete), so a damage cut there would drop durable records and fail a correct engine.
With FAULT_INJECTION_SYNC_LOG set, every os.fsync/os.fdatasync that returns appends
`path inode size` of its file to that log, one os.write per line; the harness cuts a killed
run's WAL back to the last size logged for it (walfile.synced_size). Nothing else changes.

A matrix run takes minutes while developers may be editing src/: `pinned` copies the engine
once, and every worker and build of the run imports that copy, so goldens and rows test the
same code.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

SYNC_LOG_ENV = "FAULT_INJECTION_SYNC_LOG"
ENGINE_ENV = "FAULT_INJECTION_ENGINE_PATH"  # the folder holding the pinned chroma_resume package


@contextlib.contextmanager
def pinned(base: Path):
    """The engine as it is now, copied under `base`, first on the path of the workers spawned
    inside (sys.path) and of every build (engine_env reads ENGINE_ENV); undone on exit."""
    import chroma_resume

    folder = base / "engine"
    shutil.copytree(Path(chroma_resume.__file__).parent, folder / "chroma_resume",
                    ignore=shutil.ignore_patterns("__pycache__"))
    saved_env, saved_path = os.environ.get(ENGINE_ENV), list(sys.path)
    os.environ[ENGINE_ENV] = str(folder)
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path[:] = saved_path
        if saved_env is None:
            os.environ.pop(ENGINE_ENV, None)
        else:
            os.environ[ENGINE_ENV] = saved_env


def observe_fsyncs(log_path: str) -> None:
    """Wrap os.fsync and os.fdatasync so each call that returns is logged (after it returns:
    a kill inside the call must not count as durable)."""
    for name in ("fsync", "fdatasync"):
        setattr(os, name, _logged(getattr(os, name), log_path))


def _logged(real, log_path: str):
    def sync(fd) -> None:
        real(fd)
        fd = fd if isinstance(fd, int) else fd.fileno()
        info = os.fstat(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        line = f"{path}\t{info.st_ino}\t{info.st_size}\n".encode()
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(log, line)
        finally:
            os.close(log)
    return sync


def main() -> int:
    if os.environ.get(SYNC_LOG_ENV):
        observe_fsyncs(os.environ[SYNC_LOG_ENV])
    from chroma_resume.cli import main as engine_main

    return engine_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
