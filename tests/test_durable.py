"""Durable where promised (DESIGN §13): the embedding cache at the batch barrier, a WAL archive
before the WAL goes; and a lock file that fails mid-acquire is an exit 5 with its cause.

The order of syncs is the proof: recorded in-process (os.fsync patched) for what Python
syncs, and with strace, where installed, for what SQLite syncs inside the cache."""
from __future__ import annotations

import errno
import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HASH_BUILD, REPO, write_corpus

pytestmark = pytest.mark.timeout(120)


def _config(root: Path):
    from chroma_resume import config

    return config.make_config(root=str(root), docs="corpus", collection="test", embed_model="hash:32")


# ---- clean-wal --archive ----------------------------------------------------------------

def test_archive_is_synced_and_renamed_into_place_before_the_wal_is_removed(tmp_path, monkeypatch):
    from chroma_resume import clean, state, wal

    c = _config(tmp_path)
    p = state.paths(c)
    os.makedirs(p["state_dir"])
    writer = wal.Writer(p["wal"], "run1", policy="doc", interval=50)
    writer.append(wal.RunStart(wal_version=wal.WAL_VERSION, schema_hash="s", collection="test", db="d",
                               sync_mode="incremental", config={}, pid=1, host="h"))
    writer.close()
    original = Path(p["wal"]).read_bytes()
    calls: list[tuple[str, str]] = []
    for name in ("fsync", "replace", "unlink"):
        real = getattr(os, name)

        def record(*args, _name=name, _real=real):
            where = os.readlink(f"/proc/self/fd/{args[0]}") if _name == "fsync" else str(args[0])
            calls.append((_name, where))
            return _real(*args)

        monkeypatch.setattr(os, name, record)
    archive = tmp_path / "arch"
    message = clean.clean_wal(c, force=True, archive=str(archive))
    monkeypatch.undo()
    target = archive / "index_state.stage.run1.jsonl.gz"
    assert str(target) in message and gzip.decompress(target.read_bytes()) == original
    assert not os.path.exists(p["wal"])

    def at(name: str, test) -> int:
        return next(i for i, (n, where) in enumerate(calls) if n == name and test(where))

    synced_archive = at("fsync", lambda w: w.startswith(f"{target}.tmp"))
    renamed = at("replace", lambda w: w.startswith(f"{target}.tmp"))
    synced_folder = at("fsync", lambda w: w == str(archive))
    removed = at("unlink", lambda w: w == p["wal"])
    synced_wal_folder = at("fsync", lambda w: w == p["state_dir"])
    assert synced_archive < renamed < synced_folder < removed < synced_wal_folder, calls


# ---- the embedding cache -----------------------------------------------------------------

def test_cache_commits_are_fsynced(tmp_path):
    """synchronous=FULL in WAL mode: SQLite syncs the -wal at every commit (put_many: one per batch)."""
    from chroma_resume import cache

    store = cache.EmbedCache(str(tmp_path / "c.sqlite3"), "fp", lambda *a, **k: None)
    try:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()


def _strace_works() -> bool:
    if not shutil.which("strace"):
        return False
    probe = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True)
    return probe.returncode == 0  # ptrace may be forbidden in a container


@pytest.mark.skipif(not _strace_works(), reason="needs strace (and ptrace allowed)")
def test_cache_is_synced_before_the_upsert_of_the_same_batch(tmp_path):
    """A build killed right after its first upsert returns, traced: the cache's -wal was synced
    (holding that batch's vectors) before the WAL barrier, and both before Chroma's commit of the
    upsert. A power cut after the upsert keeps every vector Chroma holds in the cache."""
    write_corpus(tmp_path / "corpus", 12)
    trace = tmp_path / "sync.trace"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHROMA_RESUME_FAILPOINTS": "store.after_upsert@1=kill",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["strace", "-f", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace),
                           sys.executable, "-m", "chroma_resume", "build", *HASH_BUILD], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == -9 or "killed by SIGKILL" in proc.stderr, proc.stderr
    synced = re.findall(r"f(?:data)?sync\(\d+<([^>]+)>\)", trace.read_text())
    names = [os.path.relpath(s, tmp_path) for s in synced]

    def first(name: str, after: int = -1) -> int:
        return next(i for i, n in enumerate(names) if i > after and n.endswith(name))

    cache_synced = first("embed-cache.sqlite3-wal")
    barrier = first("index_state.stage.jsonl", cache_synced)
    upsert_committed = first(os.path.join(".chroma", "chroma.sqlite3-journal"), barrier)
    assert cache_synced < barrier < upsert_committed, names


# ---- the writer lock ---------------------------------------------------------------------

@pytest.mark.parametrize("call,error", [("open_for_write", FileNotFoundError(errno.ENOENT, "No such file or directory")),
                                        ("write_all", OSError(errno.ENOSPC, "No space left on device"))])
def test_lock_file_error_mid_acquire_exits_5_with_the_cause(tmp_path, monkeypatch, capsys, call, error):
    """Writing the holder's sidecar fails once the lock is held: exit 5 naming the lock, lock released."""
    from chroma_resume import cli, osfs, state

    write_corpus(tmp_path / "corpus", 2)
    monkeypatch.chdir(tmp_path)

    def fail(*args, **kwargs):
        raise error

    real = getattr(osfs, call)
    monkeypatch.setattr(osfs, call, fail)
    code = cli.main(["build", *HASH_BUILD])
    monkeypatch.setattr(osfs, call, real)
    err = capsys.readouterr().err
    assert code == 5 and "Traceback" not in err
    assert "writer.lock" in err and error.strerror in err, err
    with state.WriterLock(str(tmp_path / ".chroma-state" / "test"), run_id="next"):  # released: the next run takes it
        pass
