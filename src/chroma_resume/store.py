"""The Chroma side: the only module that imports chromadb.

A call that fails for a reason waiting can fix (the server is down, refuses, times out, answers
5xx) is retried with backoff for up to --retry-for seconds; then the run stops with the cause
(exit 5; the WAL stays intact, so the next run resumes). Anything else (an invalid argument, a
duplicate id) stops it at once: no retry can change the answer.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import sqlite3
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import quote

from . import config as cfg
from . import failpoints, osfs
from .config import Config
from .errors import ChromaResumeError, RuntimeFailure, StoreCorrupt, UsageError

# Retries (see _retry): pauses double from the first to the cap, within --retry-for seconds in all.
RETRY_FIRST_DELAY = 0.25
RETRY_MAX_DELAY = 8.0  # a restarted server is noticed within 8 s
DEFAULT_RETRY_FOR = 60.0  # when `where` is a bare string rather than an Endpoint
API_PATH = "/api/v2"

# Request size. Chroma's server refuses bodies over 40 MB (max_payload_size_bytes, its default in
# rust/frontend; chromadb 1.5.9 answers 413 "Payload too large") and proxies in front of it often
# allow less, so each request stays under 8 MiB by estimate. A vector goes as base64 of float32
# (4 bytes x 4/3 per dimension, 6 with margin); servers without base64 get JSON floats, about 4x
# that, still under 40 MB. Text and metadata are counted as json.dumps writes them (\u escapes
# make that an overestimate for non-ASCII text).
MAX_REQUEST_BYTES = 8 * 1024 * 1024
BYTES_PER_DIMENSION = 6
ROW_OVERHEAD_BYTES = 64  # keys, quotes and commas around each row's fields

SCAN_PAGE = 5000
# The collection's own metadata is the truth about what it holds (DESIGN §1, §4):
SCHEMA_KEY = "chroma_resume:schema_hash"  # the schema_hash the collection was built with
INCARNATION_KEY = "chroma_resume:incarnation"  # random id set at creation: a manifest names the collection it describes
WRITING_KEY = "chroma_resume:writing"  # run id of a build that wrote and has not yet recorded a manifest (DESIGN §13)
RECORDED_KEY = "chroma_resume:recorded"  # run id of the manifest that describes the collection as it is
SPACE_KEY = "hnsw:space"
# Chroma drops hnsw:space from the metadata on the first modify (and refuses it in one), keeping the space
# where only its client can read it; this copy lets the catalogue read (no chromadb) still see it.
SPACE_COPY_KEY = "chroma_resume:space"


class Store:
    """A collection handle plus the batch limit Chroma enforces."""

    def __init__(self, client, collection, where: str):
        self.client, self.collection, self.where = client, collection, where
        self.max_batch = _retry(where, "get_max_batch_size", client.get_max_batch_size)
        self.before_first_write: Callable[[], None] | None = None  # called once, before the first upsert or delete

    # ---- writes --------------------------------------------------------------------
    def _writing(self) -> None:
        if self.before_first_write is not None:
            call, self.before_first_write = self.before_first_write, None
            call()

    def upsert(self, ids: list[str], embeddings, documents: list[str], metadatas: list[dict]) -> None:
        self._writing()
        sizes = [_row_bytes(*row) for row in zip(ids, embeddings, documents, metadatas)]
        for lo, hi in _spans(sizes, self.max_batch):
            _retry(self.where, "upsert", lambda: self.collection.upsert(
                ids=ids[lo:hi], embeddings=embeddings[lo:hi], documents=documents[lo:hi], metadatas=metadatas[lo:hi]))
        failpoints.fire("store.after_upsert")

    def delete(self, ids: Sequence[str], batch: int) -> None:
        if ids:
            self._writing()
        for lo, hi in _spans([len(i) + ROW_OVERHEAD_BYTES for i in ids], min(batch, self.max_batch)):
            _retry(self.where, "delete", lambda: self.collection.delete(ids=list(ids[lo:hi])))
        failpoints.fire("store.after_delete")

    # ---- reads ---------------------------------------------------------------------
    def count(self) -> int:
        return _retry(self.where, "count", self.collection.count)

    def held(self, ids: Sequence[str], include: Sequence[str] = ("metadatas",)) -> dict[str, dict]:
        """Which of `ids` Chroma holds, with the fields asked for (chunk-level resume, re-keying)."""
        found: dict[str, dict] = {}
        for lo, hi in _spans([len(i) + ROW_OVERHEAD_BYTES for i in ids], self.max_batch):
            part = list(ids[lo:hi])
            page = _retry(self.where, "get", lambda: self.collection.get(ids=part, include=list(include)))
            for i, chunk_id in enumerate(page["ids"]):
                found[chunk_id] = {field: page[field][i] for field in include}
        return found

    def find(self, where: dict, include: Sequence[str] = ("metadatas",)) -> dict[str, dict]:
        """Rows whose metadata matches `where` (e.g. every stored chunk of one doc_id), paged."""
        found: dict[str, dict] = {}
        while True:
            page = _retry(self.where, "get", lambda: self.collection.get(
                where=where, include=list(include), limit=SCAN_PAGE, offset=len(found)))
            for i, chunk_id in enumerate(page["ids"]):
                found[chunk_id] = {field: page[field][i] for field in include}
            if len(page["ids"]) < SCAN_PAGE:
                return found

    def scan(self, include: Sequence[str] = ()) -> Iterator[dict]:
        """Page through the whole collection: {'id', 'metadata', 'embedding', 'document'} per row."""
        offset = 0
        while True:
            page = _retry(self.where, "get", lambda: self.collection.get(
                include=list(include), limit=SCAN_PAGE, offset=offset))
            if not page["ids"]:
                return
            for i, chunk_id in enumerate(page["ids"]):
                yield {"id": chunk_id,
                       "metadata": page["metadatas"][i] if "metadatas" in include else None,
                       "embedding": page["embeddings"][i] if "embeddings" in include else None,
                       "document": page["documents"][i] if "documents" in include else None}
            offset += len(page["ids"])

    def all_ids(self) -> set[str]:
        return {row["id"] for row in self.scan()}

    def dimension(self) -> int | None:
        page = _retry(self.where, "get", lambda: self.collection.get(include=["embeddings"], limit=1))
        embeddings = page["embeddings"]
        return None if embeddings is None or len(embeddings) == 0 else len(embeddings[0])

    def fingerprint(self) -> dict:
        """What the collection says it holds (DESIGN §1: the collection is the truth, LATEST a copy)."""
        meta = self.collection.metadata or {}
        config = getattr(self.collection, "configuration_json", None) or {}
        space = (config.get("hnsw") or {}).get("space") or meta.get(SPACE_KEY) or meta.get(SPACE_COPY_KEY)
        return {"schema_hash": meta.get(SCHEMA_KEY), "incarnation": meta.get(INCARNATION_KEY), "space": space,
                "writing": meta.get(WRITING_KEY), "recorded": meta.get(RECORDED_KEY)}

    def mark_writing(self, run_id: str) -> None:
        """Before a run's first write: rows may now differ from what any manifest records."""
        self._set_metadata({WRITING_KEY: run_id})

    def mark_recorded(self, run_id: str) -> None:
        """After the manifest of `run_id` is written: it describes the collection exactly."""
        self._set_metadata({RECORDED_KEY: run_id, WRITING_KEY: None})

    def _set_metadata(self, changes: dict) -> None:
        """Chroma replaces a collection's metadata whole and refuses the hnsw keys in it (the space
        lives in its configuration), so the rest is carried over; a None value drops its key."""
        meta = {k: v for k, v in (self.collection.metadata or {}).items() if not k.startswith("hnsw:")}
        meta.update({SPACE_COPY_KEY: self.fingerprint()["space"], **changes})
        meta = {k: v for k, v in meta.items() if v is not None}
        _retry(self.where, "modify", lambda: self.collection.modify(metadata=meta))

    def recreate(self, c: Config, schema: str) -> "Store":
        """Drop the collection and create it anew with this config's space and fingerprint:
        never the old collection's metadata (it would carry the old schema along)."""
        name = self.collection.name
        _retry(self.where, "delete_collection", lambda: self.client.delete_collection(name))
        return Store(self.client, _create(self.client, self.where, c, schema), self.where)

    def search(self, vector, k: int) -> list[tuple[str, float, str | None, dict]]:
        """The k chunks nearest to one vector as (id, distance, document, metadata): `chroma-resume query`."""
        found = _retry(self.where, "query", lambda: self.collection.query(
            query_embeddings=[vector], n_results=k, include=["distances", "documents", "metadatas"]))
        return list(zip(found["ids"][0], found["distances"][0], found["documents"][0], found["metadatas"][0]))

    def nearest(self, vectors: Sequence, k: int) -> list[list[tuple[str, float, str | None]]]:
        """Per query vector, the k chunks Chroma's index returns as (id, distance, document): what a search finds."""
        found = _retry(self.where, "query", lambda: self.collection.query(
            query_embeddings=list(vectors), n_results=k, include=["distances", "documents"]))
        return [list(zip(*hits)) for hits in zip(found["ids"], found["distances"], found["documents"])]


def probe(c: Config) -> None:
    """Read the collection the way a build will (count, one id, one vector), so damaged files show up
    as StoreCorrupt here, before anything is planned on top of them."""
    db = open_store(c)
    if db is not None:
        db.count()
        _retry(db.where, "get", lambda: db.collection.get(include=["embeddings"], limit=1))


def make_durable(c: Config) -> None:
    """fsync every file and folder of an embedded Chroma: Chroma does not fsync its segment files, so a
    power cut after a build could empty them. Run before the manifest, a manifest on disk then means
    the collection it describes is on disk too. A server's files are the server's to keep."""
    if c.chroma_host:
        return
    root = cfg.path(c, c.db)
    for folder, _, files in os.walk(root):
        for name in files:
            _make_durable(osfs.fsync_file, os.path.join(folder, name))
        _make_durable(osfs.fsync_dir, folder)
    _make_durable(osfs.fsync_dir, os.path.dirname(root))


def _make_durable(sync, path: str) -> None:
    try:
        sync(path)
    except FileNotFoundError:
        return  # Chroma removed a temporary file while we walked
    except OSError as exc:
        raise RuntimeFailure(f"cannot fsync {path}: {exc.strerror}") from None


def set_aside(c: Config) -> str:
    """Rename a broken embedded Chroma folder to `<db>.corrupt-<timestamp>` (never deleted: it may hold
    something a person wants back), after releasing this process's handles on it: Windows cannot
    rename a folder with a file open inside."""
    root = cfg.path(c, c.db)
    aside = f"{root}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    release_files(root)
    try:
        osfs.replace(root, aside)
    except OSError as exc:
        raise RuntimeFailure(f"cannot set the broken Chroma folder {root} aside: {exc.strerror}") from None
    return aside


def release_files(root: str) -> None:
    """Stop the Chroma systems this process opened on folder `root` (closing SQLite and segment
    files) and forget every cached client, so the next client of that path starts afresh."""
    from chromadb.api.client import SharedSystemClient

    where = os.path.realpath(root)
    for system in list(SharedSystemClient._identifier_to_system.values()):  # chromadb keeps no public list
        if os.path.realpath(system.settings.persist_directory or os.sep) == where:
            with contextlib.suppress(Exception):  # a broken store may fail to stop cleanly: still let it go
                system.stop()
    SharedSystemClient.clear_system_cache()
    gc.collect()  # chromadb's Rust bindings close their SQLite and segment files when dropped, not when stopped


# Segment files Chroma always writes with content; an empty one is what a power cut leaves
# (link_lists.bin is legitimately empty in a small index).
_NEVER_EMPTY = ("header.bin", "data_level0.bin", "length.bin", "index_metadata.pickle", "chroma.sqlite3")


def embedded_store_missing(c: Config) -> bool:
    """An embedded --db folder without Chroma's database: a build would create a new collection."""
    return not c.chroma_host and not os.path.exists(os.path.join(cfg.path(c, c.db), "chroma.sqlite3"))


def damaged_files(c: Config) -> list[str]:
    """Files of an embedded Chroma folder that cannot be right, found without opening Chroma
    (for resume-status and doit's up-to-date check, which import no chromadb)."""
    if c.chroma_host:
        return []
    root = cfg.path(c, c.db)
    found = []
    for folder, _, files in os.walk(root):
        found += [os.path.join(folder, n) for n in files if n in _NEVER_EMPTY
                  and os.path.getsize(os.path.join(folder, n)) == 0]
    return sorted(found)


def stored_fingerprint(c: Config) -> dict | None:
    """The collection's fingerprint (as Store.fingerprint gives it), None when it does not exist:
    what doit's up-to-date check compares with the manifest (DESIGN §13, "the store proves itself").

    An embedded store is read straight from Chroma's own sqlite catalogue (read-only, a few ms): the
    check runs on every `doit` and importing chromadb costs more than the whole check. A server, or a
    catalogue this code cannot read (another Chroma version, a locked or damaged file), goes through
    the client, tried once: an unreachable store is the build's to report, not this check's."""
    if not c.chroma_host:
        try:
            return catalogue_fingerprint(c)
        except sqlite3.Error:
            pass
    import msgspec
    db = open_store(msgspec.structs.replace(c, retry_for=0.0))
    return None if db is None else db.fingerprint()


_CATALOGUE = """
SELECT m.key, m.str_value FROM collections AS col
JOIN databases AS d ON d.id = col.database_id
LEFT JOIN collection_metadata AS m ON m.collection_id = col.id
WHERE col.name = ? AND d.name = ? AND d.tenant_id = ?
"""


def catalogue_fingerprint(c: Config) -> dict | None:
    """Chroma 1.x's catalogue tables (collections, databases, collection_metadata), opened read-only,
    without chromadb; raises sqlite3.Error when they cannot be read that way."""
    location = os.path.join(cfg.path(c, c.db), "chroma.sqlite3")
    if not os.path.exists(location):
        return None
    scope = (c.collection, c.chroma_database or "default_database", c.chroma_tenant or "default_tenant")
    with contextlib.closing(sqlite3.connect(f"file:{quote(location)}?mode=ro", uri=True, timeout=1.0)) as db:
        rows = db.execute(_CATALOGUE, scope).fetchall()
    if not rows:
        return None
    meta = {key: value for key, value in rows if key is not None}
    return {"schema_hash": meta.get(SCHEMA_KEY), "incarnation": meta.get(INCARNATION_KEY), "space": meta.get(SPACE_KEY) or meta.get(SPACE_COPY_KEY),
            "writing": meta.get(WRITING_KEY), "recorded": meta.get(RECORDED_KEY)}


_IDS = """
SELECT e.embedding_id FROM embeddings AS e
JOIN segments AS s ON s.id = e.segment_id AND s.scope = 'METADATA'
JOIN collections AS col ON col.id = s.collection
JOIN databases AS d ON d.id = col.database_id
WHERE col.name = ? AND d.name = ? AND d.tenant_id = ?
"""


def catalogue_ids(c: Config) -> set[str] | None:
    """The ids an embedded collection holds, from Chroma's sqlite (read-only, without chromadb): what
    doit's up-to-date check compares with the manifest's ids, so rows replaced by hand (one deleted,
    another added: the same count) are seen. One indexed column read; None for a server, or a
    catalogue this code cannot read."""
    rows = _read_catalogue(c, _IDS)
    return None if rows is None else {row[0] for row in rows}


def _read_catalogue(c: Config, query: str) -> list | None:
    """The rows of `query` over this collection's scope in Chroma's sqlite, opened read-only (creates
    nothing, loads no chromadb); None for a server, a missing database or an unreadable catalogue."""
    location = os.path.join(cfg.path(c, c.db), "chroma.sqlite3")
    if c.chroma_host or not os.path.exists(location):
        return None
    scope = (c.collection, c.chroma_database or "default_database", c.chroma_tenant or "default_tenant")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(location)}?mode=ro", uri=True, timeout=1.0)) as db:
            return db.execute(query, scope).fetchall()
    except sqlite3.Error:
        return None


_ROWS = """
SELECT count(*) FROM embeddings AS e
JOIN segments AS s ON s.id = e.segment_id AND s.scope = 'METADATA'
JOIN collections AS col ON col.id = s.collection
JOIN databases AS d ON d.id = col.database_id
WHERE col.name = ? AND d.name = ? AND d.tenant_id = ?
"""


def catalogue_rows(c: Config) -> int | None:
    """How many rows an embedded collection holds, from Chroma's sqlite (read-only, without chromadb):
    what doit's up-to-date check compares with the manifest, so a row deleted by hand is seen. None
    for a server, or a catalogue this code cannot read."""
    rows = _read_catalogue(c, _ROWS)
    return None if rows is None else rows[0][0]


def rows_held(c: Config) -> int:
    """How many rows the collection holds, 0 when it (or the embedded folder) does not exist; read
    from the catalogue where it can be, else through a client that creates nothing."""
    if embedded_store_missing(c):
        return 0
    rows = catalogue_rows(c)
    if rows is not None:
        return rows
    db = open_store(c)
    return 0 if db is None else db.count()


# ---- the deep check after an unclean end (DESIGN §13) ----------------------------------
# An embedded Chroma keeps each collection's rows in chroma.sqlite3 and its vector index (HNSW)
# in a segment folder it re-writes every `sync_threshold` records, without fsync; the sqlite side
# records how far the index got (max_seq_id) and purges its log up to there. A power cut that
# reverts the index files to an older version while chroma.sqlite3 moved on leaves every file
# readable, yet rows without vectors and vectors of deleted rows: only a check catches it.

HNSW_PERSISTED = "urn:chroma:segment/vector/hnsw-local-persisted"
HNSW_IDS_FILE = "index_metadata.pickle"  # the index's id -> label map, beside its hnswlib files
_ADDS, _DELETE = (0, 2), 3  # chromadb's Operation codes in embeddings_queue: ADD, UPDATE(1), UPSERT, DELETE
SHOW_IDS = 3  # ids named in a message


def check_deep(c: Config) -> int:
    """Prove an embedded store before a build trusts it after an unclean end: the vector index
    holds exactly the rows' ids (`index_disagreement`, read from the files: exact and cheap),
    and Chroma hands back a vector, all of one dimension, for every row (the files may be intact
    and still unreadable to it). Raises StoreCorrupt naming what is wrong; returns
    the rows checked. A server's store is the server's to keep: only probed."""
    if failpoints.enabled("bug.shallow_store_check"):  # planted bug: trust what merely opens
        probe(c)
        return 0
    db = check_index(c)
    if db is None:
        return 0
    rows, dims = 0, set()
    for row in db.scan(include=("embeddings",)):
        rows += 1
        if row["embedding"] is None:
            raise StoreCorrupt(f"Chroma at {db.where}: row {row['id']!r} of collection {c.collection!r} has no vector")
        dims.add(len(row["embedding"]))
    if len(dims) > 1:
        raise StoreCorrupt(f"Chroma at {db.where}: collection {c.collection!r} holds vectors of dimensions "
                           f"{sorted(dims)}")
    return rows


def check_index(c: Config) -> Store | None:
    """probe, then (embedded) that the vector index holds exactly the rows' ids; raises StoreCorrupt.
    The collection, None when there is none or it is a server's."""
    probe(c)
    db = open_store(c)
    if c.chroma_host or db is None:
        return None
    wrong = index_disagreement(cfg.path(c, c.db), str(db.collection.id))
    if wrong:
        raise StoreCorrupt(f"Chroma at {db.where}: the vector index of collection {c.collection!r} disagrees "
                           f"with its rows: {wrong}")
    return db


def stale_index(c: Config) -> str:
    """index_disagreement for the config's collection without opening Chroma (resume-status imports
    no chromadb): the collection found by name in chroma.sqlite3, read-only. "" when they agree,
    when there is no such embedded collection, or when the layout is not one this knows."""
    db_file = os.path.join(cfg.path(c, c.db), "chroma.sqlite3")
    if c.chroma_host or not os.path.exists(db_file):
        return ""
    try:
        with contextlib.closing(_read_only(db_file)) as con:
            found = con.execute("SELECT c.id FROM collections c JOIN databases d ON c.database_id = d.id "
                                "WHERE c.name = ? AND d.name = ? AND d.tenant_id = ?",
                                (c.collection, c.chroma_database or "default_database",
                                 c.chroma_tenant or "default_tenant")).fetchone()
    except sqlite3.OperationalError:
        return ""
    except sqlite3.DatabaseError as exc:
        return f"cannot read {db_file}: {exc}"
    try:
        return index_disagreement(cfg.path(c, c.db), found[0]) if found else ""
    except StoreCorrupt as exc:  # reported, not raised: status only describes
        return str(exc)


def _read_only(db_file: str) -> sqlite3.Connection:
    """A connection that writes nothing (no journal, no -wal) to Chroma's database."""
    return sqlite3.connect(f"file:{urllib.parse.quote(db_file)}?mode=ro", uri=True)


def index_disagreement(root: str, collection_id: str) -> str:
    """What separates the ids the collection's vector index will hold once Chroma has replayed its
    log from the ids of its rows ("" when they agree), read from chroma.sqlite3 (read-only) and
    the index's id map. Chroma replays into each segment the log records past that segment's
    max_seq_id, so both sides are taken from their files and brought forward by the log.
    A layout this chromadb does not write (another segment type, no such tables), or a file SQLite
    cannot read just now, is not judged: the row-by-row read in check_deep still runs."""
    db_file = os.path.join(root, "chroma.sqlite3")
    try:
        with contextlib.closing(_read_only(db_file)) as con:
            segments = con.execute("SELECT id, scope, type FROM segments WHERE collection = ?",
                                   (collection_id,)).fetchall()
            scopes = {scope: (sid, kind) for sid, scope, kind in segments}
            if len(segments) != 2 or scopes.get("VECTOR", ("", ""))[1] != HNSW_PERSISTED or "METADATA" not in scopes:
                return ""
            rows_seg, index_seg = scopes["METADATA"][0], scopes["VECTOR"][0]
            rows = {r for (r,) in con.execute("SELECT embedding_id FROM embeddings WHERE segment_id = ?", (rows_seg,))}
            held = _hnsw_ids(os.path.join(root, index_seg))
            rows, held = (_replayed(con, collection_id, ids, seg) for ids, seg in ((rows, rows_seg), (held, index_seg)))
    except sqlite3.OperationalError:  # no such table, locked, an I/O error: no judgement (never a set-aside)
        return ""
    except sqlite3.DatabaseError as exc:  # malformed, not a database
        raise StoreCorrupt(f"cannot read {db_file}: {exc}") from None
    missing, extra = sorted(rows - held), sorted(held - rows)
    parts = [f"{len(ids)} {what} (e.g. {', '.join(ids[:SHOW_IDS])})"
             for ids, what in ((missing, "rows without a vector"), (extra, "vectors of deleted rows")) if ids]
    if not parts:
        return ""
    return (f"{'; '.join(parts)}; the index holds {len(held)} ids, the rows {len(rows)}: its files in "
            f"{os.path.join(root, index_seg)} are not those chroma.sqlite3 describes (reverted by a power cut?)")


def _replayed(con: sqlite3.Connection, collection_id: str, ids: set[str], segment: str) -> set[str]:
    """`ids` after the log records Chroma replays into `segment` (those past its max_seq_id)."""
    seen = con.execute("SELECT seq_id FROM max_seq_id WHERE segment_id = ?", (segment,)).fetchone()
    since = 0 if seen is None else int.from_bytes(seen[0], "big") if isinstance(seen[0], bytes) else seen[0]
    ids = set(ids)
    for op, chunk_id in con.execute("SELECT operation, id FROM embeddings_queue WHERE topic LIKE ? AND seq_id > ? "
                                    "ORDER BY seq_id", (f"%/{collection_id}", since)):
        if op in _ADDS:
            ids.add(chunk_id)
        elif op == _DELETE:
            ids.discard(chunk_id)
    return ids


class _NoGlobals(pickle.Unpickler):
    """The id map is a dict of str and int (an object of chromadb's PersistentData class in
    databases written by chromadb < 1.0): nothing in it needs code to run, so none is allowed."""

    def find_class(self, module: str, name: str):
        if name == "PersistentData" and module.startswith("chromadb."):
            return _Fields
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")


class _Fields:
    """Stands in for chromadb's PersistentData: keeps its fields, runs nothing."""


def _hnsw_ids(folder: str) -> set[str]:
    """The ids the index folder's files hold: none if Chroma has not written them yet."""
    path = os.path.join(folder, HNSW_IDS_FILE)
    try:
        with open(path, "rb") as fh:
            data = _NoGlobals(fh).load()
    except FileNotFoundError:
        return set()
    except Exception as exc:  # cut short, emptied, or not what chromadb writes
        raise StoreCorrupt(f"cannot read the vector index's id map {path}: {type(exc).__name__}: {exc}") from None
    fields = data if isinstance(data, dict) else vars(data)
    if not isinstance(fields.get("id_to_label"), dict):
        raise StoreCorrupt(f"the vector index's id map {path} holds no id_to_label")
    return set(fields["id_to_label"])


class Endpoint(str):
    """The store's address as messages show it, carrying its retry window: every call site passes
    `self.where` to `_retry` as before, and `_retry` learns from it how long to keep trying."""

    retry_for: float = DEFAULT_RETRY_FOR
    embedded: bool = False  # a local folder: no network between us and it, so nothing to wait for

    def __new__(cls, address: str, retry_for: float, embedded: bool = False) -> "Endpoint":
        self = super().__new__(cls, address)
        self.retry_for, self.embedded = retry_for, embedded
        return self


def client(c: Config):
    """A chromadb client for the config, and the Endpoint its calls are retried against."""
    import chromadb  # imported lazily: status and plan-only paths never need it

    from . import chroma_function  # noqa: F401  registers the index's embedding function (collections name it)

    # tenant and database only when given: chromadb's defaults otherwise
    scope = {k: v for k, v in (("tenant", c.chroma_tenant), ("database", c.chroma_database)) if v}
    if not c.chroma_host:
        where = Endpoint(cfg.db_identity(c), c.retry_for, embedded=True)
        try:  # a folder that cannot be made is the option's fault, not something to retry
            os.makedirs(where, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--db {where}: cannot create the Chroma folder: {exc.strerror or exc}") from None
        return _retry(where, "open", lambda: _persistent_client(chromadb, where, scope)), where
    api_url = _api_url(c)
    where = Endpoint(api_url.removesuffix(API_PATH), c.retry_for)
    headers = request_headers(c)

    def connect():
        # a silent host holds one attempt for its whole timeout: never longer than the retry window
        _probe(api_url, headers, min(c.chroma_timeout, max(c.retry_for, 1.0)))
        # chromadb adds its own keys to the dict it is given: hand it a copy
        chroma = chromadb.HttpClient(host=c.chroma_host, port=c.chroma_port, ssl=c.chroma_ssl,
                                     headers=dict(headers), **scope)
        _set_timeout(chroma, c.chroma_timeout)
        return chroma

    return _retry(where, "connect", connect), where


def _persistent_client(chromadb, where: str, scope: dict):
    """Chroma creating a new folder runs its migrations, and two processes doing so at once fail
    ("table collections already exists"): `doit -n 2` builds two collections into one new --db. The
    creation is serialised by a lock beside the folder; an existing database is opened without one
    (so readers such as verify write nothing). A folder without its database may have been deleted
    since this process opened it (a second build in a notebook after `rm -rf .chroma`): chromadb's
    cached system of that path would write into the deleted files, so it is released first."""
    if os.path.exists(os.path.join(where, "chroma.sqlite3")):
        return chromadb.PersistentClient(path=str(where), **scope)
    release_files(where)
    lock = os.path.join(os.path.dirname(where), f".{os.path.basename(where).lstrip('.')}.create.lock")
    with osfs.exclusive_lock(lock):
        return chromadb.PersistentClient(path=str(where), **scope)


def request_headers(c: Config) -> dict[str, str]:
    """Headers from the variable --chroma-headers-env names: a JSON object of headers, or a bare token
    sent as `Authorization: Bearer <token>`. Messages name the variable, never its value (a secret)."""
    name = c.chroma_headers_env
    if not name:
        return {}
    value = os.environ.get(name)
    if value is None:
        raise UsageError(f"--chroma-headers-env: environment variable {name} is not set")
    value = value.strip()
    if not value.startswith("{"):
        if not value or any(ch.isspace() or not ch.isprintable() for ch in value):
            raise UsageError(f"--chroma-headers-env: {name} must hold a JSON object of headers or one token "
                             "(non-empty, no spaces or control characters)")
        return {"Authorization": f"Bearer {value}"}
    try:
        headers = json.loads(value)
    except json.JSONDecodeError as exc:  # the position helps; the text would leak the secret
        raise UsageError(f"--chroma-headers-env: {name} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not all(isinstance(v, str) for v in headers.values()):
        raise UsageError(f"--chroma-headers-env: {name} must map header names to string values")
    return headers


def _api_url(c: Config) -> str:
    """The URL chromadb's HttpClient talks to, built by chromadb's own rule (full URLs as host, ssl)."""
    from chromadb.api.base_http_client import BaseHTTPClient

    try:
        return BaseHTTPClient.resolve_url(chroma_server_host=c.chroma_host, chroma_server_ssl_enabled=c.chroma_ssl,
                                          default_api_path=API_PATH, chroma_server_http_port=c.chroma_port)
    except ValueError as exc:
        raise UsageError(f"--chroma-host {c.chroma_host!r}: {exc}") from None


def _probe(api_url: str, headers: dict[str, str], timeout: float) -> None:
    """One bounded heartbeat before HttpClient's constructor, whose own first requests (identity,
    tenant, database) run before any timeout can be set: a hung server fails here instead."""
    import httpx

    response = httpx.get(f"{api_url}/heartbeat", headers=headers, timeout=timeout)
    if response.status_code >= 500:
        response.raise_for_status()  # HTTPStatusError: retried; other answers are left to chromadb


def _set_timeout(chroma, seconds: float) -> None:
    """chromadb's HttpClient sends every request with httpx `timeout=None` (wait forever) and has no
    setting for it, so set it on the client's httpx session; refuse to run without it."""
    import httpx

    session = getattr(getattr(chroma, "_server", None), "_session", None)
    if not isinstance(session, httpx.Client):
        raise RuntimeFailure("this chromadb version keeps no httpx session at client._server._session: "
                             "cannot apply --chroma-timeout (chroma-resume is tested with chromadb 1.5)")
    session.timeout = httpx.Timeout(seconds)


def open_store(c: Config, schema: str | None = None) -> Store | None:
    """The collection named by the config. Without `schema`, None if it does not exist (readers
    never create one); with it, a missing collection is created carrying that fingerprint."""
    chroma_client, where = client(c)
    collection = _retry(where, "get_collection", lambda: _get_or_none(chroma_client, c.collection))
    if collection is None:
        if schema is None:
            return None
        collection = _create(chroma_client, where, c, schema)
    return Store(chroma_client, collection, where)


def _get_or_none(chroma_client, name: str):
    """The collection, or None when Chroma says it does not exist (not an error to retry)."""
    try:
        return chroma_client.get_collection(name, embedding_function=None)
    except Exception as exc:
        if type(exc).__name__ == "NotFoundError":
            return None
        raise


def _create(chroma_client, where: str, c: Config, schema: str):
    """A new collection carrying its fingerprint, what made its vectors (metadata any client can read) and the
    index's embedding function (chroma_function.py), so a plain client's text query embeds with its model."""
    from .chroma_function import IndexEmbeddingFunction, describe
    from .models import preflight
    name, space = c.collection, c.hnsw_space
    metadata = {SPACE_KEY: space, SPACE_COPY_KEY: space, SCHEMA_KEY: schema, INCARNATION_KEY: uuid.uuid4().hex[:16],
                **describe(c, preflight(c).dim)}
    function = IndexEmbeddingFunction.for_config(c)
    try:
        return chroma_client.create_collection(name, metadata=metadata, embedding_function=function)
    except ValueError as exc:
        raise UsageError(f"collection {name!r}: {exc}") from None
    except Exception:
        return _retry(where, "create_collection", lambda: chroma_client.get_or_create_collection(
            name, metadata=metadata, embedding_function=function))


# ---- retries -----------------------------------------------------------------------------

def _retry(where: str, what: str, call: Callable):
    """Run `call`. What waiting can fix (see `_transient`) is retried with doubling pauses for up to
    `where.retry_for` seconds, then the run stops with exit 5; anything else stops it at once."""
    window = getattr(where, "retry_for", DEFAULT_RETRY_FOR)
    delay, deadline, attempts = RETRY_FIRST_DELAY, None, 0
    while True:
        attempts += 1
        try:
            return call()
        except ChromaResumeError:
            raise  # already says what happened (e.g. a bad option found while connecting)
        except Exception as exc:
            if _corrupt(exc) or _broken_embedded(where, exc):
                raise StoreCorrupt(f"Chroma at {where} cannot read its own files ({what}: {_describe(exc)})") from None
            if not _transient(exc):
                raise _refused(where, what, exc) from None
            now = time.monotonic()
            if deadline is None:
                deadline = now + window
                if window > 0:  # said once per call: the user sees what the run waits for
                    print(f"[WAIT] Chroma at {where} unreachable ({_describe(exc)}); "
                          f"retrying for up to {window:g}s", file=sys.stderr, flush=True)
            if now >= deadline:
                raise RuntimeFailure(f"Chroma at {where} unreachable: {what} still failing after {attempts} "
                                     f"attempts over {window:g}s: {_describe(exc)}") from None
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, RETRY_MAX_DELAY)


def _transient(exc: BaseException) -> bool:
    """True for what waiting can fix: no connection, a timeout, a connection dropped mid-answer, an
    HTTP 5xx or 429. chromadb reports these as httpx errors, as a bare Exception whose context is an
    httpx.HTTPStatusError, as a ChromaError with a 5xx/429 code, or, from HttpClient's constructor, as
    ValueError("Could not connect to a Chroma server...") whose context is the httpx.ConnectError."""
    import httpx
    from chromadb.errors import ChromaError

    for link in _chain(exc):
        if isinstance(link, httpx.LocalProtocolError):
            return False  # we sent something malformed (e.g. a bad header value): it will not improve
        if isinstance(link, httpx.TransportError):
            return True  # ConnectError, ConnectTimeout, ReadTimeout, ReadError, RemoteProtocolError, ...
        if isinstance(link, httpx.HTTPStatusError):
            return _status_transient(link.response.status_code)
        if isinstance(link, ChromaError):
            return _status_transient(link.code())
        if isinstance(link, ValueError) and str(link).startswith("Could not connect to a Chroma server"):
            return True
    return False


# What chromadb says when its files are damaged (segments emptied or cut short by a power loss,
# a malformed SQLite file), as opposed to a server it cannot reach: waiting never fixes these.
# "Error finding id": a row whose vector the index lacks (index files older than chroma.sqlite3).
_CORRUPT_SIGNS = ("segment reader", "Error deserializing", "Error loading hnsw", "database disk image is malformed",
                  "file is not a database", "Error finding id")


def _corrupt(exc: BaseException) -> bool:
    return any(sign in str(link) for link in _chain(exc) for sign in _CORRUPT_SIGNS)


def _broken_embedded(where: str, exc: BaseException) -> bool:
    """An embedded store that fails a read is broken, not unreachable: there is no server to come back.
    Only a lock held by another process (SQLite's "database is locked") is worth waiting for."""
    return (getattr(where, "embedded", False) and _transient(exc)
            and not any("database is locked" in str(link) for link in _chain(exc)))


def _status_transient(status: int) -> bool:
    return status >= 500 or status == 429


def _refused(where: str, what: str, exc: Exception) -> ChromaResumeError:
    """The error for a failure no retry can fix.

    UsageError (exit 2) when what we sent or named is wrong, so fixing the input or an option is
    the remedy: an invalid argument or dimension, a duplicate id, metadata chromadb rejects (its
    client-side checks raise ValueError/TypeError), bad credentials, a tenant or database (named
    by an option) that does not exist. RuntimeFailure (exit 5) for the rest: the store did
    something no retry fixes here (a collection deleted under the run, a proxy's 413, an unknown
    error) and the input is not known to be at fault."""
    import httpx
    from chromadb import errors as chroma_errors

    usage = (ValueError, TypeError, httpx.LocalProtocolError, chroma_errors.InvalidArgumentError,
             chroma_errors.InvalidDimensionException, chroma_errors.DuplicateIDError,
             chroma_errors.IDAlreadyExistsError, chroma_errors.InvalidUUIDError, chroma_errors.AuthorizationError,
             chroma_errors.ChromaAuthError, chroma_errors.QuotaError)
    named_missing = what in ("connect", "open") and isinstance(exc, chroma_errors.NotFoundError)
    kind = UsageError if isinstance(exc, usage) or named_missing else RuntimeFailure
    return kind(f"Chroma at {where}: {what} refused, not retried: {_describe(exc)}")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """exc and the exceptions it was raised from or while handling (chromadb re-raises inside except)."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _describe(exc: BaseException) -> str:
    """`Type: message` of the error, and of its root cause when that says something more (first
    lines only: httpx appends a documentation link on a second line)."""
    root = list(_chain(exc))[-1]
    first, root_first = (str(e).partition("\n")[0] for e in (exc, root))
    text = f"{type(exc).__name__}: {first}"
    return text if root_first in first else f"{text} <- {type(root).__name__}: {root_first}"


# ---- request sizes -----------------------------------------------------------------------

def _spans(sizes: Sequence[int], max_rows: int, max_bytes: int = MAX_REQUEST_BYTES) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of at most max_rows rows and max_bytes estimated bytes, in order. A row
    larger than max_bytes goes alone: the server, not this estimate, has the last word on it."""
    lo, total = 0, 0
    for i, size in enumerate(sizes):
        if i > lo and (i - lo >= max_rows or total + size > max_bytes):
            yield lo, i
            lo, total = i, 0
        total += size
    if lo < len(sizes):
        yield lo, len(sizes)


def _row_bytes(chunk_id: str, embedding, document: str, metadata: dict) -> int:
    """An upper estimate of one row's share of an upsert request (see MAX_REQUEST_BYTES)."""
    return (len(chunk_id) + BYTES_PER_DIMENSION * len(embedding) + len(json.dumps(document))
            + len(json.dumps(metadata, default=str)) + ROW_OVERHEAD_BYTES)
