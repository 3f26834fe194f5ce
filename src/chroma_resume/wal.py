"""The write-ahead log: one CRC-checked msgspec record per line, appended with one os.write.

Each record declares `synced_to`, the file size known to be fsynced when it was
written. That is how a reader tells a torn tail (damage wholly after the last
fsync point: power loss may drop un-fsynced pages in any order) from corruption
(damage inside bytes the writer had already made durable).

The log knows nothing of Chroma or models.
"""
from __future__ import annotations

import os
import time
import zlib
from typing import Union

import msgspec

from . import failpoints, osfs
from .errors import RuntimeFailure, UsageError, WalCorrupt

WAL_VERSION = 1


class Event(msgspec.Struct, tag_field="t", kw_only=True):  # kw_only: subclasses mix optional and required fields
    seq: int = 0
    run_id: str = ""
    ts: float = 0.0
    synced_to: int = 0


class RunStart(Event, kw_only=True, tag="RUN_START"):
    wal_version: int
    schema_hash: str
    collection: str
    db: str
    incarnation: str = ""  # the collection's INCARNATION_KEY: a recreated collection is another one
    sync_mode: str
    config: dict
    pid: int
    host: str


class RunResume(Event, kw_only=True, tag="RUN_RESUME"):
    pid: int
    host: str


class RunFinish(Event, kw_only=True, tag="RUN_FINISH"):
    ok: bool
    reason: str
    expected_chunks: int = 0
    collection_count: int = 0
    delta: int = 0
    docs_processed: int = 0
    docs_resumed_skipped: int = 0
    committed_batches: int = 0
    chunks_upserted_total: int = 0
    warn_count: int = 0
    warn_functional_count: int = 0
    warn_keys: dict[str, int] = {}


class DocBegin(Event, kw_only=True, tag="DOC_BEGIN"):
    uri: str
    doc_id: str
    content_sha256: str
    old_content_sha256: str | None = None
    n_chunks: int
    kind: str
    meta_sha256: str = ""


class UpsertBatchCommitted(Event, kw_only=True, tag="UPSERT_BATCH_COMMITTED"):
    batch_no: int
    batch_size: int
    chunks_upserted_total: int


class DocCommitted(Event, kw_only=True, tag="DOC_COMMITTED"):
    uri: str
    doc_id: str
    content_sha256: str
    n_chunks: int
    chunks_upserted_total: int
    meta_sha256: str = ""  # every chunk of the generation is in Chroma with this metadata


class DeleteIntent(Event, kw_only=True, tag="DELETE_INTENT"):
    """Fsynced before a Chroma delete: a delete cannot be redone, so the WAL must know it may
    have happened even when power loss drops the DELETE_*_DONE that follows."""
    uri: str
    doc_id: str
    old_content_sha256: str
    n_chunks: int
    reason: str  # old | stale


class DeleteOldDone(Event, kw_only=True, tag="DELETE_OLD_DONE"):
    uri: str
    doc_id: str
    old_content_sha256: str
    deleted_chunks: int


class DocDone(Event, kw_only=True, tag="DOC_DONE"):
    uri: str
    doc_id: str
    content_sha256: str


class DeleteStaleDone(Event, kw_only=True, tag="DELETE_STALE_DONE"):
    uri: str
    doc_id: str
    old_content_sha256: str
    deleted_chunks: int


AnyEvent = Union[RunStart, RunResume, RunFinish, DocBegin, UpsertBatchCommitted,
                 DocCommitted, DeleteIntent, DeleteOldDone, DocDone, DeleteStaleDone]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)
_CRC = b',"crc":'


def encode(event: Event) -> bytes:
    """`{...,"crc":N}\\n` where N is the CRC32 of every byte before `,"crc"`."""
    head = _encoder.encode(event)[:-1]
    return head + _CRC + str(zlib.crc32(head)).encode() + b"}\n"


def decode(line: bytes) -> Event | None:
    """The event of one line (without its newline), or None when the line is not intact."""
    at = line.rfind(_CRC)
    if at <= 0 or not line.endswith(b"}"):
        return None
    digits = line[at + len(_CRC):-1]
    if not digits.isdigit() or zlib.crc32(line[:at]) != int(digits):
        return None
    try:
        return _decoder.decode(line[:at] + b"}")
    except msgspec.DecodeError:
        return None


# ---- replay ----------------------------------------------------------------------------

class Generation(msgspec.Struct):
    """One content version of a document that this run touched in Chroma, and what the WAL
    proves about it: begun (some chunks may be there), committed (all are, with meta_sha256),
    deleting (a delete was about to run: some may be gone), deleted (none are)."""
    doc_id: str
    content_sha256: str
    n_chunks: int
    state: str = "begun"
    meta_sha256: str = ""

    @property
    def committed(self) -> bool:
        return self.state == "committed"

    @property
    def deleted(self) -> bool:
        return self.state == "deleted"


def generation_key(doc_id: str, content_sha256: str) -> str:
    """Generations are told apart by their chunk ids' prefix: a doc_id change is a new one."""
    return f"{doc_id}:{content_sha256}"


class Replay(msgspec.Struct, kw_only=True):
    """What the WAL proves Chroma accepted, folded from its events."""
    path: str
    start: RunStart | None = None
    finish: RunFinish | None = None
    last_event: str = ""
    last_seq: int = 0
    good_size: int = 0
    file_size: int = 0
    truncated_tail: bool = False
    resumes: int = 0
    committed_batches: int = 0
    chunks_upserted_total: int = 0
    generations: dict[str, dict[str, Generation]] = {}  # uri -> generation_key -> generation
    uris_of: dict[str, list[str]] = {}  # generation_key -> the uris it was logged under (a doc_id can move)

    @property
    def finished_ok(self) -> bool:
        return self.finish is not None and self.finish.ok and self.last_event == "RUN_FINISH"

    @property
    def docs_committed(self) -> int:
        return sum(any(g.committed for g in gens.values()) for gens in self.generations.values())


def _generation(r: Replay, uri: str, doc_id: str, sha: str, n_chunks: int) -> Generation:
    gens = r.generations.setdefault(uri, {})
    key = generation_key(doc_id, sha)
    if key not in gens:
        gens[key] = Generation(doc_id, sha, n_chunks)
        r.uris_of.setdefault(key, []).append(uri)
    return gens[key]


def _apply(r: Replay, ev: Event) -> None:
    """Fold one event; the last word about a generation wins (an undo re-begins a deleted one)."""
    if isinstance(ev, RunStart):
        r.start = ev
    elif isinstance(ev, RunResume):
        r.resumes += 1
        r.finish = None
    elif isinstance(ev, RunFinish):
        r.finish = ev
    elif isinstance(ev, DocBegin):
        # Over a committed generation too: a rewrite of its rows (metadata, source) may stop half way,
        # so what it holds is known again only from its next DOC_COMMITTED (or by checking the rows).
        # The same ids may be committed under another uri (a doc_id carried to another source_uri):
        # this rewrite changes their source_uri, so that commit is demoted too.
        key = generation_key(ev.doc_id, ev.content_sha256)
        g = _generation(r, ev.uri, ev.doc_id, ev.content_sha256, ev.n_chunks)
        rewritten = [r.generations[uri][key] for uri in r.uris_of[key]]
        for same in [g] + [other for other in rewritten if other is not g and other.committed]:
            if same.committed and failpoints.enabled("bug.begin_keeps_commit"):
                continue
            same.state, same.n_chunks = "begun", max(same.n_chunks, ev.n_chunks)
    elif isinstance(ev, UpsertBatchCommitted):
        r.committed_batches += 1
        r.chunks_upserted_total = ev.chunks_upserted_total
    elif isinstance(ev, DocCommitted):
        g = _generation(r, ev.uri, ev.doc_id, ev.content_sha256, ev.n_chunks)
        g.state, g.n_chunks, g.meta_sha256 = "committed", ev.n_chunks, ev.meta_sha256
    elif isinstance(ev, DeleteIntent):
        g = _generation(r, ev.uri, ev.doc_id, ev.old_content_sha256, ev.n_chunks)
        g.state, g.n_chunks = "deleting", max(g.n_chunks, ev.n_chunks)
    elif isinstance(ev, (DeleteOldDone, DeleteStaleDone)):
        _generation(r, ev.uri, ev.doc_id, ev.old_content_sha256, ev.deleted_chunks).state = "deleted"


def read(path: str) -> Replay | None:
    """Replay the WAL at `path` (None if absent). Never writes; raises WalCorrupt."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageError(f"{path}: a folder on its path is a file (check --state-root)") from None
    r = Replay(path=path)
    damage: tuple[int, int] | None = None  # (line number, byte offset) of the first bad line
    offset = 0
    with fh:
        for lineno, raw in enumerate(fh, 1):
            line_start, offset = offset, offset + len(raw)
            ev = decode(raw[:-1]) if raw.endswith(b"\n") else None
            if ev is None:
                damage = damage or (lineno, line_start)
                continue
            if damage is not None:
                if ev.synced_to > damage[1]:
                    raise WalCorrupt(
                        f"{path}: line {damage[0]} (byte {damage[1]}) is damaged but later records were "
                        f"already fsynced past it (line {lineno}); refusing to resume. "
                        f"Inspect it, or move it aside and rebuild with --resume off")
                continue  # an intact record beyond a hole after the fsync point: a lost tail
            _check_order(r, ev, path, lineno, line_start)
            _apply(r, ev)
            r.last_event, r.last_seq, r.good_size = ev.__struct_config__.tag, ev.seq, offset
        r.file_size = offset
    r.truncated_tail = damage is not None or r.good_size != r.file_size
    return r


def _check_order(r: Replay, ev: Event, path: str, lineno: int, offset: int) -> None:
    where = f"{path}: line {lineno} (byte {offset})"
    if ev.seq != r.last_seq + 1:
        raise WalCorrupt(f"{where}: seq {ev.seq} follows {r.last_seq}; records are missing; refusing to resume")
    if r.start is None and not isinstance(ev, RunStart):
        raise WalCorrupt(f"{where}: the WAL does not begin with RUN_START")
    if isinstance(ev, RunStart) and ev.wal_version > WAL_VERSION:
        raise WalCorrupt(f"{where}: wal_version {ev.wal_version} is newer than this tool's {WAL_VERSION}; "
                         f"upgrade chroma-resume to resume this run")


# ---- writing ---------------------------------------------------------------------------

def drop_torn_tail(path: str, good_size: int) -> None:
    """Cut the file back to its last intact record, durably, before anything is appended."""
    osfs.truncate_durably(path, good_size)


class Writer:
    """Appends events, fsyncing by policy: RUN_* always, `doc` per commit group, `interval` every N."""

    def __init__(self, path: str, run_id: str, *, policy: str, interval: int, next_seq: int = 1):
        self.path, self.run_id, self.policy, self.interval = path, run_id, policy, interval
        self.seq = next_seq
        created = not os.path.exists(path)
        try:
            self.fd = osfs.open_for_write(path, append=True)
            if created:
                osfs.fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise RuntimeFailure(f"cannot open WAL {path}: {exc.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        if not created:
            osfs.fsync(self.fd)  # so the synced_to we declare from now on is true
        self.synced_to = self.size
        self.unsynced_events = 0

    def append(self, event: Event) -> None:
        tag = event.__struct_config__.tag
        event.seq, event.run_id, event.ts, event.synced_to = self.seq, self.run_id, time.time(), self.synced_to
        record = encode(event)
        failpoints.fire("wal.before_append", tag)
        try:
            if failpoints.fire("wal.append", tag) == "torn":
                os.write(self.fd, record[: len(record) // 2])
                failpoints.kill_self()
            written = os.write(self.fd, record)
            if written != len(record):  # only a full disk or quota does this; the retry raises its errno
                os.write(self.fd, record[written:])
        except OSError as exc:
            raise RuntimeFailure(f"cannot append {tag} to WAL {self.path}: {exc.strerror or exc}") from None
        self.seq += 1
        self.size += len(record)
        self.unsynced_events += 1
        if tag.startswith("RUN_") or (self.policy == "interval" and self.unsynced_events >= self.interval):
            self.sync()
        failpoints.fire("wal.after_append", tag)

    def commit_group(self) -> None:
        """End of a group of events that share one upsert: one fsync under policy `doc`."""
        if self.policy == "doc":
            self.sync()

    def barrier(self) -> None:
        """Before a Chroma write the WAL cannot reconstruct (a delete, a new generation's first
        upsert): everything logged so far becomes durable, whatever the policy."""
        self.sync()

    def sync(self) -> None:
        if self.unsynced_events == 0:
            return
        try:
            osfs.fsync(self.fd)
        except OSError as exc:
            raise RuntimeFailure(f"cannot fsync WAL {self.path}: {exc.strerror}") from None
        self.synced_to, self.unsynced_events = self.size, 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NullWriter:
    """`--wal off`: the same calls, nothing written."""
    run_id = ""

    def append(self, event: Event) -> None:
        pass

    def commit_group(self) -> None:
        pass

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass
