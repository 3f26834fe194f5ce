"""clean-wal: remove or archive a WAL, under the writer lock, refusing unfinished runs unless forced."""
from __future__ import annotations

import gzip
import os
import uuid

from . import osfs, state, wal
from .config import Config
from .errors import RuntimeFailure, UsageError, WalCorrupt


def clean_wal(c: Config, *, force: bool = False, archive: str | None = None) -> str:
    p = state.paths(c)
    path = p["wal"]
    if not os.path.exists(path):
        return f"no WAL at {path}: nothing to clean"
    with state.WriterLock(p["collection_dir"], run_id=f"clean-wal-{uuid.uuid4().hex[:6]}"):
        try:
            replay = wal.read(path)
            if replay.start is None:  # a run killed while writing its RUN_START: no run to name
                raise WalCorrupt(f"{path}: its first record is unreadable, so it names no run")
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
            target = _unused_archive_name(archive, run_id)
            _archive(path, target)
            _remove(path)
            return f"archived WAL of run {run_id} ({'finished' if finished else 'UNFINISHED'}) to {target}"
        _remove(path)
        return f"removed WAL {path} of run {run_id} ({'finished' if finished else 'UNFINISHED, forced'})"


def _unused_archive_name(folder: str, run_id: str) -> str:
    """`index_state.stage.<run>.jsonl.gz`, numbered `.2`, `.3`... where that name is taken: every WAL
    that names no run is archived as run `unreadable`, and the same run's WAL can be archived twice (a
    copy restored and archived again); an archive must never replace the records of an earlier one."""
    target, number = os.path.join(folder, f"index_state.stage.{run_id}.jsonl.gz"), 1
    while os.path.exists(target):
        number += 1
        target = os.path.join(folder, f"index_state.stage.{run_id}.{number}.jsonl.gz")
    return target


def _archive(path: str, target: str) -> None:
    """The archive is durable (file fsynced, renamed into place, folder fsynced) before the WAL it
    replaces is removed: after a power cut one of them holds the run's records (DESIGN §13). A folder
    that cannot be made or written is the option's fault: exit 2 naming it, the WAL left in place."""
    folder = os.path.dirname(os.path.abspath(target))
    try:
        if not os.path.isdir(folder):
            os.makedirs(folder)
            osfs.fsync_dir(os.path.dirname(folder))  # the new folder's own name
        with open(path, "rb") as src:
            data = gzip.compress(src.read(), mtime=0)
        osfs.atomic_write(target, data)
    except (OSError, RuntimeFailure) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"--archive {folder}: cannot write {os.path.basename(target)}: {cause}; "
                         f"the WAL is left in place") from None


def _remove(path: str) -> None:
    try:
        osfs.unlink(path)
        osfs.fsync_dir(os.path.dirname(path))
    except OSError as exc:
        raise RuntimeFailure(f"cannot remove {path}: {exc.strerror or exc}") from None
