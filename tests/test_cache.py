"""The embedding cache: what lands in sqlite, what survives a kill, and that a corrupt, locked or
full file never fails the caller; plus the cache-stats / cache-prune verbs (no model, no torch)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chroma_resume import cache, embedders
from chroma_resume.config import make_config
from chroma_resume.errors import RuntimeFailure
from chroma_resume.reporting import Warnings
from conftest import REPO

FP = "hash:8"


def config(tmp_path: Path, **options):
    return make_config(root=str(tmp_path), embed_model=FP, **options)


def warnings() -> Warnings:
    return Warnings(stream=io.StringIO())


def texts(n: int, tag: str = "t") -> list[str]:
    return [f"{tag} chunk {i} 文本" for i in range(n)]


def vectors_of(items: list[str]) -> np.ndarray:
    return embedders.HashEmbedder(8).encode(items)


def rows(path: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT v.key, m.fingerprint, v.dim, v.vector, v.last_used FROM vectors v "
                          "JOIN models m ON m.id = v.model ORDER BY v.rowid").fetchall()


def cache_file(tmp_path: Path) -> Path:
    return tmp_path / ".chroma-state" / "embed-cache.sqlite3"


# ---- what is stored and found ------------------------------------------------------

def test_put_stores_keyed_float32_bytes_and_a_new_process_finds_them(tmp_path):
    items = texts(3)
    vectors = vectors_of(items)
    store = cache.open_cache(config(tmp_path), FP, warnings())
    store.put_many(items, vectors)
    store.close()
    stored = rows(cache_file(tmp_path))
    assert [r[0] for r in stored] == [hashlib.sha256(f"{FP}\0{t}".encode()).digest() for t in items]
    assert [(r[1], r[2], r[3]) for r in stored] == [(FP, 8, v.astype("<f4").tobytes()) for v in vectors]
    assert store.writes == 3

    again = cache.open_cache(config(tmp_path), FP, warnings())
    asked = ["never seen", items[2], items[0], items[2]]
    got = again.get_many(asked)
    assert sorted(got) == [1, 2, 3]
    assert got[1].dtype == np.float32 and got[1].tobytes() == vectors[2].tobytes()
    assert got[2].tobytes() == vectors[0].tobytes()
    assert (again.hits, again.misses, again.writes) == (3, 1, 0)
    other_model = cache.open_cache(config(tmp_path), "hash:16", warnings())
    assert other_model.get_many(items) == {} and other_model.misses == 3


def test_lookups_beyond_one_in_query_map_back_to_their_indices(tmp_path):
    items = texts(cache.IN_CHUNK * 2 + 7)
    vectors = vectors_of(items)
    store = cache.open_cache(config(tmp_path), FP, warnings())
    store.put_many(items, vectors)
    got = store.get_many(items[::-1])
    assert len(got) == len(items)
    assert all(got[i].tobytes() == vectors[len(items) - 1 - i].tobytes() for i in range(len(items)))


def test_off_relative_and_absolute_paths(tmp_path):
    assert cache.open_cache(config(tmp_path, embed_cache="off"), FP, warnings()) is None
    cache.open_cache(config(tmp_path, state_root="st", embed_cache="c.db"), FP, warnings()).close()
    assert (tmp_path / "st" / "c.db").exists()
    elsewhere = tmp_path / "shared" / "vectors.db"
    cache.open_cache(config(tmp_path, embed_cache=str(elsewhere)), FP, warnings()).close()
    assert elsewhere.exists()


def test_a_row_is_committed_when_put_many_returns_even_if_the_process_is_killed(tmp_path):
    code = ("import os, signal, sys\nfrom chroma_resume import cache, embedders\nfrom chroma_resume.config import "
            "make_config\nfrom chroma_resume.reporting import Warnings\n"
            f"c = make_config(root={str(tmp_path)!r}, embed_model={FP!r})\n"
            f"store = cache.open_cache(c, {FP!r}, Warnings())\n"
            "items = ['killed %d' % i for i in range(50)]\n"
            "store.put_many(items, embedders.HashEmbedder(8).encode(items))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    store = cache.open_cache(config(tmp_path), FP, warnings())
    assert len(store.get_many([f"killed {i}" for i in range(50)])) == 50


def test_last_used_is_refreshed_only_when_a_day_old(tmp_path):
    items = texts(2)
    store = cache.open_cache(config(tmp_path), FP, warnings())
    store.put_many(items, vectors_of(items))
    written = [r[4] for r in rows(cache_file(tmp_path))]
    store.get_many(items)
    assert [r[4] for r in rows(cache_file(tmp_path))] == written  # a read the same day writes nothing
    with contextlib.closing(sqlite3.connect(cache_file(tmp_path))) as db, db:
        db.execute("UPDATE vectors SET last_used = last_used - 2 * 86400")
    store.get_many(items[:1])
    after = [r[4] for r in rows(cache_file(tmp_path))]
    assert after[0] >= written[0] and after[1] == written[1] - 2 * 86400


# ---- a cache that cannot be used never fails the caller ------------------------------

def test_garbage_file_is_set_aside_with_a_warning_and_a_new_cache_started(tmp_path):
    path = cache_file(tmp_path)
    path.parent.mkdir(parents=True)
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    seen = warnings()
    store = cache.open_cache(config(tmp_path), FP, seen)
    assert store is not None and seen.keys == {"embed_cache_set_aside": 1}
    aside = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert str(path) in seen.stream.getvalue() and "SQLITE_NOTADB" in seen.stream.getvalue()
    store.put_many(["x"], vectors_of(["x"]))
    assert len(rows(path)) == 1


def test_corruption_found_during_a_read_is_a_miss_and_the_file_is_set_aside(tmp_path):
    items = texts(400)
    store = cache.open_cache(config(tmp_path), FP, warnings())
    store.put_many(items, vectors_of(items))
    store.close()
    path = cache_file(tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[4096 * 2:] = b"\xff" * (len(data) - 4096 * 2)  # keep the header and schema page, wreck the rest
    path.write_bytes(bytes(data))
    seen = warnings()
    store = cache.open_cache(config(tmp_path), FP, seen)
    assert store.get_many(items) == {} and store.misses == len(items)
    assert seen.keys == {"embed_cache_set_aside": 1}
    store.put_many(items[:1], vectors_of(items[:1]))
    assert len(store.get_many(items)) == 1


@contextlib.contextmanager
def writer_holding(path: Path, locking_mode: str = "NORMAL"):
    """Another connection in the middle of a write transaction. In WAL mode that blocks writers only;
    with locking_mode EXCLUSIVE it keeps everyone else out, even a new connection's first read."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(f"PRAGMA locking_mode={locking_mode}")
        db.execute("BEGIN EXCLUSIVE")
        db.execute("UPDATE vectors SET last_used = last_used")
        yield
    finally:
        db.close()


def test_a_locked_cache_skips_the_write_and_keeps_serving_reads_warned_once(tmp_path):
    items = texts(3)
    seen = warnings()
    store = cache.open_cache(config(tmp_path), FP, seen, busy_timeout=0.05)
    store.put_many(items[:1], vectors_of(items[:1]))
    with writer_holding(cache_file(tmp_path)):
        store.put_many(items[1:], vectors_of(items[1:]))
        store.put_many(items[1:], vectors_of(items[1:]))
        assert sorted(store.get_many(items)) == [0]
    assert seen.keys == {"embed_cache_unusable": 1}  # the same cause twice: one line
    assert "action=write" in seen.stream.getvalue() and "SQLITE_BUSY" in seen.stream.getvalue()
    assert str(cache_file(tmp_path)) in seen.stream.getvalue() and store.writes == 1
    store.put_many(items[1:], vectors_of(items[1:]))
    assert sorted(store.get_many(items)) == [0, 1, 2]


def test_a_cache_held_exclusively_at_open_is_no_cache_with_a_warning(tmp_path):
    cache.open_cache(config(tmp_path), FP, warnings()).close()
    seen = warnings()
    with writer_holding(cache_file(tmp_path), locking_mode="EXCLUSIVE"):
        assert cache.open_cache(config(tmp_path), FP, seen, busy_timeout=0.05) is None
    assert seen.keys == {"embed_cache_unusable": 1}
    assert "action=open" in seen.stream.getvalue() and "SQLITE_BUSY" in seen.stream.getvalue()


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs and mounting one is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # never leave a mount behind


def test_a_full_disk_skips_the_write_with_a_warning_and_keeps_what_was_stored(tmp_path, tiny_disk):
    seen = warnings()
    c = config(tmp_path, embed_cache=str(tiny_disk / "cache.sqlite3"))
    store = cache.open_cache(c, FP, seen)
    try:
        first = texts(10, "first")
        store.put_many(first, vectors_of(first))
        for round_no in range(200):
            batch = texts(200, f"round {round_no} ")
            store.put_many(batch, vectors_of(batch))
            if seen.count:
                break
        assert seen.keys == {"embed_cache_unusable": 1} and "SQLITE_FULL" in seen.stream.getvalue()
        assert len(store.get_many(first)) == 10 and store.writes == 10 + 200 * round_no
    finally:
        store.close()  # the tmpfs cannot be unmounted while the file is open


# ---- maintenance verbs -------------------------------------------------------------

def fill(tmp_path: Path) -> None:
    for fingerprint, tag, n in ((FP, "current", 30), ("old-model@abc", "old", 20)):
        store = cache.open_cache(config(tmp_path), fingerprint, warnings())
        store.put_many(texts(n, tag), vectors_of(texts(n, tag)))
        store.close()


def test_cache_stats_reports_entries_per_fingerprint(tmp_path):
    assert cache.cache_stats(config(tmp_path))["entries"] == 0
    fill(tmp_path)
    stats = cache.cache_stats(config(tmp_path))
    assert stats["entries_per_fingerprint"] == {FP: 30, "old-model@abc": 20} and stats["entries"] == 50
    assert stats["current_fingerprint"] == FP and stats["bytes"] > 0
    assert stats["oldest_use"] <= stats["newest_use"] <= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def test_cache_prune_keeps_the_current_model_and_drops_unused_entries(tmp_path):
    fill(tmp_path)
    with contextlib.closing(sqlite3.connect(cache_file(tmp_path))) as db, db:
        db.execute("UPDATE vectors SET last_used = last_used - 40 * 86400 WHERE rowid <= 5")  # 5 of the current
    kept_all = cache.cache_prune(config(tmp_path), keep="all", older_than_days=30)
    assert (kept_all["removed"], kept_all["entries"]) == (5, 45)
    current = cache.cache_prune(config(tmp_path), keep="current")
    assert (current["removed"], current["entries"]) == (20, 25)
    assert {r[1] for r in rows(cache_file(tmp_path))} == {FP}
    assert current["bytes_after"] <= current["bytes_before"]
    with contextlib.closing(sqlite3.connect(cache_file(tmp_path))) as db:
        assert db.execute("SELECT fingerprint FROM models").fetchall() == [(FP,)]


def test_cache_verbs_fail_naming_a_corrupt_file(tmp_path):
    cache_file(tmp_path).parent.mkdir(parents=True)
    cache_file(tmp_path).write_bytes(b"not a database" * 100)
    with pytest.raises(RuntimeFailure, match="embed-cache.sqlite3: SQLITE_NOTADB"):
        cache.cache_stats(config(tmp_path))


def test_cli_verbs_print_key_values_without_importing_torch(tmp_path):
    fill(tmp_path)
    code = ("import sys\nfrom chroma_resume import cli\n"
            "assert cli.main(['cache-stats']) == 0\n"
            "assert cli.main(['cache-prune', '--keep', 'all', '--older-than-days', '1']) == 0\n"
            "print(sorted(m for m in ('torch', 'FlagEmbedding', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "[]"  # the default model's fingerprint reads its files, never torch
    assert "entries=50" in lines and "removed=0" in lines
    assert any(line.startswith("current_fingerprint=bert@") for line in lines)  # the files, not the path


def test_doit_tasks_run_the_verbs(tmp_path):
    fill(tmp_path)
    base = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    stats = subprocess.run([*base, "cache-stats", "--embed-model", FP], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert stats.returncode == 0 and "entries=50" in stats.stdout, stats.stdout + stats.stderr
    prune = subprocess.run([*base, "cache-prune", "--embed-model", FP], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert prune.returncode == 0 and "removed=20" in prune.stdout, prune.stdout + prune.stderr
