"""The embedding cache (DESIGN §11): every vector is paid for once, across runs, collections and rebuilds.

One sqlite3 file per state root, in WAL mode. A row is keyed by sha256(model fingerprint "\\0" chunk
text) and holds the vector as little-endian float32 bytes. The cache only saves work, so it never
fails a build: a locked, full or unreadable file WARNs once per cause and behaves as a miss (reads)
or is skipped (writes); a corrupt file is set aside as `<path>.corrupt-<timestamp>` and a new one
started. This module imports neither torch nor the model.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from . import config as cfg
from . import osfs
from .config import Config
from .errors import RuntimeFailure, UsageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS vectors (
    key BLOB PRIMARY KEY,          -- sha256(fingerprint || '\\0' || text)
    model INTEGER NOT NULL,        -- models.id
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,          -- dim little-endian float32
    created REAL NOT NULL,         -- unix seconds
    last_used REAL NOT NULL
);
"""
IN_CHUNK = 500  # keys per SELECT ... IN (...): well under any sqlite variable limit
TOUCH_AFTER_S = 86400.0  # refresh last_used at most daily, so repeated runs stay read-only
_CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)

Warn = Callable[..., None]


def cache_path(c: Config) -> str:
    return os.path.join(cfg.path(c, c.state_root), os.path.expanduser(c.embed_cache))


def open_cache(c: Config, fingerprint: str, warn: Warn, *, busy_timeout: float = 5.0) -> EmbedCache | None:
    """The cache for this model fingerprint; None when --embed-cache off or the file cannot be used
    (after a WARN). busy_timeout: seconds to wait for another writer before treating it as a miss."""
    if c.embed_cache == "off":
        return None
    cache = EmbedCache(cache_path(c), fingerprint, warn, busy_timeout)
    return cache if cache.db is not None else None


class EmbedCache:
    """Vectors of one model fingerprint. One thread at a time (the build's writer) may use it."""

    def __init__(self, path: str, fingerprint: str, warn: Warn, busy_timeout: float = 5.0):
        self.path, self.fingerprint, self.warn, self.busy_timeout = path, fingerprint, warn, busy_timeout
        self.prefix = hashlib.sha256(fingerprint.encode() + b"\0")
        self.hits = self.misses = self.writes = 0
        self.model_id: int | None = None
        self.warned: set[tuple[str, str]] = set()
        self.db: sqlite3.Connection | None = None
        self._open()

    # ---- the API the build calls ----------------------------------------------------
    def get_many(self, texts: Sequence[str]) -> dict[int, np.ndarray]:
        """index in texts -> cached float32 vector, for the texts the cache holds."""
        keys = [self._key(t) for t in texts]
        rows = self._guard("read", lambda: self._select(keys)) or {}
        found = {i: rows[k] for i, k in enumerate(keys) if k in rows}
        self.hits += len(found)
        self.misses += len(texts) - len(found)
        return found

    def put_many(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store the vectors in one committed transaction: once this returns, a SIGKILL keeps them."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise ValueError(f"put_many: {len(texts)} texts but vectors of shape {vectors.shape}")
        now = time.time()
        rows = [(self._key(t), vectors.shape[1], v.tobytes(), now, now) for t, v in zip(texts, vectors)]
        if rows and self._guard("write", lambda: self._insert(rows)):
            self.writes += len(rows)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # ---- sqlite ----------------------------------------------------------------------
    def _key(self, text: str) -> bytes:
        h = self.prefix.copy()
        h.update(text.encode())
        return h.digest()

    def _open(self, retry: bool = True) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.db = _connect(self.path, self.busy_timeout)
            self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            self.close()
            self._recover("open", exc, retry)

    def _select(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        stale: list[bytes] = []
        now = time.time()
        for lo in range(0, len(keys), IN_CHUNK):
            part = keys[lo:lo + IN_CHUNK]
            query = f"SELECT key, dim, vector, last_used FROM vectors WHERE key IN ({','.join('?' * len(part))})"
            for key, dim, blob, last_used in self.db.execute(query, part):
                if len(blob) != 4 * dim:  # a damaged row: a miss
                    continue
                found[key] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
                if now - last_used > TOUCH_AFTER_S:
                    stale.append(key)
        if stale:
            self._guard("touch", lambda: self._transaction(
                lambda db: db.executemany("UPDATE vectors SET last_used = ? WHERE key = ?", [(now, k) for k in stale])))
        return found

    def _insert(self, rows: list[tuple]) -> bool:
        """True once committed (the guard returns None on failure)."""
        def write(db: sqlite3.Connection) -> None:
            model = self._model_id(db)
            db.executemany("INSERT INTO vectors (key, model, dim, vector, created, last_used) "
                           "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                           "dim = excluded.dim, vector = excluded.vector, last_used = excluded.last_used",
                           [(key, model, *rest) for key, *rest in rows])
        self._transaction(write)
        return True

    def _model_id(self, db: sqlite3.Connection) -> int:
        if self.model_id is None:
            db.execute("INSERT OR IGNORE INTO models (fingerprint) VALUES (?)", (self.fingerprint,))
            self.model_id = db.execute("SELECT id FROM models WHERE fingerprint = ?", (self.fingerprint,)).fetchone()[0]
        return self.model_id

    def _transaction(self, body: Callable[[sqlite3.Connection], None]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            body(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self.model_id = None  # its INSERT may have been rolled back with the rest
            raise

    # ---- failures --------------------------------------------------------------------
    def _guard(self, action: str, work: Callable):
        """Run work against the open cache; on a sqlite or OS error recover and return None (a miss)."""
        if self.db is None:
            return None
        try:
            return work()
        except (sqlite3.Error, OSError) as exc:
            self._recover(action, exc)
            return None

    def _recover(self, action: str, exc: BaseException, retry: bool = True) -> None:
        """A corrupt file is set aside (once) and a new one started; anything else is WARNed and outlived."""
        if retry and _is_corrupt(exc):
            self.close()
            if self._set_aside(exc):
                self._open(retry=False)
        else:
            self._report(action, exc)

    def _report(self, action: str, exc: BaseException) -> None:
        cause = _cause(exc)
        if (action, cause) not in self.warned:
            self.warned.add((action, cause))
            self.warn("embed_cache_unusable", path=self.path, action=action, cause=cause)

    def _set_aside(self, exc: BaseException) -> bool:
        aside = f"{self.path}.corrupt-{datetime.datetime.now().strftime('%Y%m%dT%H%M%S%f')}"
        try:
            for suffix in ("", "-wal", "-shm"):  # a stale -wal must not be replayed into the new file
                if os.path.exists(self.path + suffix):
                    osfs.replace(self.path + suffix, aside + suffix)
        except OSError as failure:
            self._report("set_aside", failure)
            return False
        self.model_id = None
        self.warn("embed_cache_set_aside", path=self.path, moved_to=aside, cause=_cause(exc))
        return True


def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit) in WAL mode. synchronous=FULL: each commit
    fsyncs the cache's -wal file (DESIGN §13, durable at the batch barrier). The build commits once
    per batch, just before the barrier and the upsert of the same rows, so a vector Chroma holds is
    in the cache after a power cut too, and a store rebuilt after the cut pays the model nothing.
    (NORMAL left them to SQLite's next checkpoint: after a cut, none of 1,088 survived.)"""
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error:
        db.close()  # before a corrupt file is renamed
        raise
    return db


def _is_corrupt(exc: BaseException) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _CORRUPT


def _cause(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    return f"{name}: {exc}"


# ---- maintenance verbs (cache-stats, cache-prune) --------------------------------------

def cache_stats(c: Config) -> dict:
    """What the cache holds: entries per model fingerprint, size on disk, oldest and newest use."""
    from .models import model_fingerprint
    path = _existing_path(c)
    report = {"path": path, "current_fingerprint": model_fingerprint(c)}
    if not os.path.exists(path):
        return {**report, "entries": 0, "bytes": 0}
    with _maintenance(path) as db:
        per_model = dict(db.execute("SELECT m.fingerprint, count(*) FROM vectors v JOIN models m ON m.id = v.model "
                                    "GROUP BY v.model ORDER BY m.fingerprint"))
        oldest, newest = db.execute("SELECT min(last_used), max(last_used) FROM vectors").fetchone()
    return {**report, "entries": sum(per_model.values()), "bytes": _bytes_on_disk(path),
            "entries_per_fingerprint": per_model, "oldest_use": _iso(oldest), "newest_use": _iso(newest)}


def cache_prune(c: Config, *, keep: str = "current", older_than_days: float | None = None,
                also_keep: Sequence[str] = ()) -> dict:
    """Drop the entries of other model fingerprints (keep="current") and/or those unused for
    older_than_days, then VACUUM so the file shrinks. also_keep: fingerprints of the other indexes
    that share this cache file (pruning for one index must not empty another's)."""
    from .models import model_fingerprint
    if keep not in ("current", "all"):
        raise UsageError(f"--keep {keep!r}: expected current or all")
    if older_than_days is not None and older_than_days < 0:
        raise UsageError("--older-than-days must be >= 0")
    path = _existing_path(c)
    if not os.path.exists(path):
        return {"path": path, "removed": 0, "entries": 0, "bytes_before": 0, "bytes_after": 0}
    doomed, params = [], []
    if keep == "current":
        kept = sorted({model_fingerprint(c), *also_keep})
        doomed.append(f"model NOT IN (SELECT id FROM models WHERE fingerprint IN ({', '.join('?' * len(kept))}))")
        params += kept
    if older_than_days is not None:
        doomed.append("last_used < ?")
        params.append(time.time() - older_than_days * 86400)
    before = _bytes_on_disk(path)
    with _maintenance(path) as db:
        removed = db.execute(f"DELETE FROM vectors WHERE {' OR '.join(doomed)}", params).rowcount if doomed else 0
        db.execute("DELETE FROM models WHERE id NOT IN (SELECT DISTINCT model FROM vectors)")
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        entries = db.execute("SELECT count(*) FROM vectors").fetchone()[0]
    return {"path": path, "removed": removed, "entries": entries, "bytes_before": before,
            "bytes_after": _bytes_on_disk(path)}


def _existing_path(c: Config) -> str:
    if c.embed_cache == "off":
        raise UsageError("--embed-cache off: there is no embedding cache to inspect")
    return cache_path(c)


@contextlib.contextmanager
def _maintenance(path: str) -> Iterator[sqlite3.Connection]:
    """A connection for the maintenance verbs: unlike a build, they fail (exit 5) naming the file."""
    db = None
    try:
        db = _connect(path, 5.0)
        db.executescript(SCHEMA)
        yield db
    except sqlite3.Error as exc:
        hint = "; the next build sets it aside and starts a new one" if _is_corrupt(exc) else ""
        raise RuntimeFailure(f"embedding cache {path}: {_cause(exc)}{hint}") from None
    finally:
        if db is not None:
            db.close()


def _bytes_on_disk(path: str) -> int:
    return sum(os.path.getsize(path + s) for s in ("", "-wal", "-shm") if os.path.exists(path + s))


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
