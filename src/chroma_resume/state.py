"""Durable state beside the WAL: the manifest, LATEST, and the writer lock.

Manifest and LATEST are replaced atomically (osfs.atomic_write: temp file, fsync, replace, fsync
the directory), so a reader never sees half a file.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import socket

import msgspec

from . import config as cfg
from . import failpoints, osfs, schema
from .errors import ChromaResumeError, LockHeld, NewerState, RuntimeFailure, UsageError

WAL_NAME = "index_state.stage.jsonl"
MANIFEST_NAME = "index_state.json"
LATEST_NAME = "LATEST"
LOCK_NAME = "writer.lock"
MANIFEST_VERSION = 1


class DocEntry(msgspec.Struct, kw_only=True):
    doc_id: str
    content_sha256: str
    n_chunks: int
    source_type: str = ""
    updated_at: str = ""
    metadata: dict = {}  # the document's own metadata (units files), stored on every chunk


class Generation(msgspec.Struct, frozen=True):
    """One content version of a document, as its chunk ids name it."""
    uri: str
    doc_id: str
    content_sha256: str
    n_chunks: int


class Manifest(msgspec.Struct, kw_only=True):
    version: int = MANIFEST_VERSION
    schema_hash: str
    collection: str
    db: str
    dim: int | None = None
    incarnation: str = ""  # the collection this manifest describes (its INCARNATION_KEY metadata)
    config: dict = {}
    documents: dict[str, DocEntry] = {}
    leftovers: list[Generation] = []  # old generations --sync-mode none left in Chroma, for a later sync
    last_build: dict = {}

    @property
    def expected_chunks(self) -> int:
        return sum(d.n_chunks for d in self.documents.values())


def chunk_id(doc_id: str, content_sha256: str, index: int) -> str:
    """A generation's ids: re-upserting it is idempotent, a new generation never overwrites it."""
    return f"{doc_id}:{content_sha256[:12]}:{index}"


def generation_ids(doc_id: str, content_sha256: str, n_chunks: int) -> list[str]:
    return [chunk_id(doc_id, content_sha256, i) for i in range(n_chunks)]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def meta_sha256(metadata: dict, source_type: str) -> str:
    """What a document stores on its chunks besides its text: a change here is a change (DESIGN §1)."""
    blob = json.dumps([metadata, source_type], sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def chunk_metadata(uri: str, doc_id: str, content_sha256: str, source_type: str, metadata: dict,
                   index: int, n_chunks: int, text: str) -> dict:
    """Every key Chroma stores beside a chunk's vector; build writes it, verify expects it."""
    return {**metadata, "doc_id": doc_id, "source_uri": uri, "content_sha256": content_sha256,
            "chunk_index": index, "n_chunks": n_chunks, "source_type": source_type,
            "text_sha256": text_sha256(text)}


CHUNK_KEYS = ("doc_id", "source_uri", "content_sha256", "chunk_index", "n_chunks", "source_type", "text_sha256")


def entry_from_metadata(meta: dict, updated_at: str = "") -> DocEntry:
    """The manifest entry a stored chunk's metadata describes (chunk_metadata's inverse): what a
    document the scan cannot read keeps, taken from what Chroma really holds."""
    return DocEntry(doc_id=meta["doc_id"], content_sha256=meta["content_sha256"], n_chunks=meta["n_chunks"],
                    source_type=meta.get("source_type", ""), updated_at=updated_at,
                    metadata={k: v for k, v in meta.items() if k not in CHUNK_KEYS})


def row_is_chunk(meta: dict | None, document: str | None, uri: str, entry: DocEntry, index: int) -> bool:
    """Whether a stored row is chunk `index` of generation `entry` of `uri` as a build writes it:
    every metadata key with its type, and a text hash that matches the row's own text. Evidence
    that needs neither vectors nor the model (resume checks, audits)."""
    if meta is None or document is None:
        return False
    return same_metadata(meta, chunk_metadata(uri, entry.doc_id, entry.content_sha256, entry.source_type,
                                              entry.metadata, index, entry.n_chunks, document))


def same_metadata(a: dict | None, b: dict | None) -> bool:
    """Equal keys, values and types: in Python 1 == 1.0 == True, but Chroma stores them apart."""
    a, b = a or {}, b or {}
    return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and a[k] == b[k] for k in a)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def paths(c: cfg.Config) -> dict[str, str]:
    """Where this configuration's state lives (DESIGN §2); a --state-root that is a file is exit 2."""
    root = cfg.path(c, c.state_root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise UsageError(f"--state-root {root} is a file, not a folder")
    sdir = schema.state_dir(c)
    return {"state_dir": sdir, "collection_dir": cfg.collection_dir(c),
            "manifest": os.path.join(sdir, MANIFEST_NAME), "wal": os.path.join(sdir, WAL_NAME)}


# ---- manifest and LATEST ---------------------------------------------------------------

def load_manifest(path: str) -> Manifest | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageError(f"{path}: a folder on its path is a file (check --state-root)") from None
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:
        raise UsageError(f"corrupt manifest {path}: {exc}. It is never rebuilt silently: "
                         f"restore it, or delete it and rebuild with --on-missing-state reset") from None
    if manifest.version > MANIFEST_VERSION:  # its fields may mean what this version cannot know
        raise NewerState(f"manifest {path} is version {manifest.version}, written by a newer chroma-resume; this one "
                         f"reads version {MANIFEST_VERSION}: upgrade chroma-resume")
    return manifest


def write_manifest(path: str, manifest: Manifest) -> None:
    data = msgspec.json.format(msgspec.json.encode(manifest), indent=1)
    failpoints.fire("manifest.before_replace")
    osfs.atomic_write(path, data + b"\n")
    failpoints.fire("manifest.after_replace")


def read_latest(collection_dir: str) -> str | None:
    try:
        with open(os.path.join(collection_dir, LATEST_NAME), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageError(f"{collection_dir}: a folder on its path is a file (check --state-root)") from None


def write_latest(collection_dir: str, schema_hash: str) -> None:
    osfs.atomic_write(os.path.join(collection_dir, LATEST_NAME), schema_hash.encode() + b"\n")


# ---- writer lock ----------------------------------------------------------------------

class WriterLock:
    """An exclusive lock on <collection>/writer.lock: one writer per collection whatever its schema
    (a build with other options must never reset a collection under a running one). The OS releases
    the lock when the holder dies, so a crash never wedges; a contender waits osfs.LOCK_GRACE_SEC for
    a holder just killed, then exits 3 naming the holder (from the sidecar writer.lock.holder)."""

    def __init__(self, collection_dir: str, run_id: str, name: str = LOCK_NAME):
        self.path = os.path.join(collection_dir, name)
        self.run_id = run_id
        self._held: contextlib.ExitStack | None = None

    def __enter__(self) -> "WriterLock":
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id, "started_at": now_iso()}
        stack = contextlib.ExitStack()
        try:  # a flaky or full filesystem can fail these too: exit 5 with the cause, never a traceback
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            stack.enter_context(osfs.exclusive_lock(self.path, wait=osfs.LOCK_GRACE_SEC, holder=info))
        except osfs.LockBusy as busy:
            raise LockHeld(f"another writer holds {self.path}: {busy.holder}") from None
        except OSError as exc:  # ENOLCK on some network filesystems: no lock, no safe build
            raise _lock_error(self.path, exc) from None
        self._held = stack
        return self

    def __exit__(self, *exc) -> None:
        if self._held is not None:
            self._held.close()  # releases the lock
            self._held = None


def store_lock(c: cfg.Config, run_id: str) -> "WriterLock | contextlib.nullcontext":
    """A second lock, beside an embedded --db folder: builds with different state roots (two
    checkouts, two CI jobs) sharing one store must not write one collection at once either. A
    server has no folder of ours; its writers share a state root to be told apart."""
    if c.chroma_host:
        return contextlib.nullcontext()
    db = os.path.realpath(cfg.path(c, c.db))  # a symlink to the folder is the same store, so the same lock
    parent = os.path.dirname(db)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UsageError(f"--db {db}: {parent} is a file, not a folder")
    # One name per (folder, collection): a hidden folder (`.chroma`) keeps the name it always had,
    # `.chroma.<collection>.writer.lock`; any other folder's lock has no added dot, so `chroma` and
    # `.chroma` in one folder never share a lock.
    return WriterLock(parent, run_id, name=f"{os.path.basename(db)}.{c.collection}.writer.lock")


def _lock_error(path: str, exc: OSError) -> ChromaResumeError:
    """No retry fixes these: a name too long for the filesystem is the user's to change (exit 2);
    a read-only or lock-less state root is the environment's (exit 5)."""
    if exc.errno == errno.ENAMETOOLONG:
        return UsageError(f"cannot create the writer lock {path}: the collection name is too long for this "
                          f"filesystem ({exc.strerror}); choose a shorter --collection")
    if osfs.beyond_windows_path_limit(path):
        return UsageError(f"cannot create the writer lock {path}: the path is {len(os.path.abspath(path))} "
                          f"characters, over Windows' limit of {osfs.WINDOWS_MAX_PATH - 1} ({exc.strerror or exc}); "
                          f"enable long paths (LongPathsEnabled) or choose a shorter --state-root or --collection")
    return RuntimeFailure(f"cannot lock {path}: {exc.strerror or exc} (the --state-root must be a writable local "
                          f"folder that supports file locks)")

