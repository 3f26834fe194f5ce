"""clean-wal: remove or archive a WAL, under the writer lock, refusing unfinished runs unless forced."""
from __future__ import annotations

import gzip
import os
import shutil
import uuid

from . import state, wal
from .config import Config
from .errors import UsageError, WalCorrupt


def clean_wal(c: Config, *, force: bool = False, archive: str | None = None) -> str:
    p = state.paths(c)
    path = p["wal"]
    if not os.path.exists(path):
        return f"no WAL at {path}: nothing to clean"
    with state.WriterLock(p["collection_dir"], run_id=f"clean-wal-{uuid.uuid4().hex[:6]}"):
        try:
            replay = wal.read(path)
            manifest = state.load_manifest(p["manifest"])
            manifest_run = manifest.last_build.get("run_id") if manifest else None
            run_id, committed = replay.start.run_id, replay.docs_committed
            finished = replay.finished_ok and manifest_run == run_id  # else its manifest was never written
        except WalCorrupt as exc:
            if not force:
                raise UsageError(f"{exc}\nclean-wal refuses a corrupt WAL without --force") from None
            run_id, finished, committed = "unreadable", False, 0
        if not finished and not force:
            raise UsageError(
                f"WAL {path} belongs to unfinished run {run_id}: {committed} committed document(s) would be "
                f"forgotten and re-embedded. Run the build to resume it, or pass --force")
        if archive:
            target = _archive(path, archive, run_id)
            os.unlink(path)
            return f"archived WAL of run {run_id} ({'finished' if finished else 'UNFINISHED'}) to {target}"
        os.unlink(path)
        return f"removed WAL {path} of run {run_id} ({'finished' if finished else 'UNFINISHED, forced'})"


def _archive(path: str, folder: str, run_id: str) -> str:
    """gzip the WAL into folder, fsynced (file and folder) before the caller removes the original.
    A folder that cannot be made or written is the option's fault: exit 2 naming it, WAL untouched."""
    target = os.path.join(folder, f"index_state.stage.{run_id}.jsonl.gz")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "rb") as src, gzip.open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        _fsync(target, os.O_RDONLY)
        _fsync(folder, os.O_RDONLY)
    except OSError as exc:
        raise UsageError(f"--archive {folder}: cannot write {os.path.basename(target)}: {exc.strerror or exc}; "
                         f"the WAL is left in place") from None
    return target


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
