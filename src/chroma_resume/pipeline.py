"""The embed → upsert → log pipeline: documents in, facts Chroma accepted out, in WAL order.

Per batch of chunks (a batch spans documents; a document may span batches):
  1. prepare: which ids Chroma already holds, and with what metadata (chunk-level resume);
     vectors for the missing ones from a generation being re-keyed, then the cache; the
     rest go to the executor (texts in, float32 rows out: the model on a worker thread, or
     a pool of Ray actors, see executor.py);
  2. write, once the vectors are back: barrier (the DOC_BEGINs are durable), upsert the
     missing, update changed metadata in place, log, then delete the old generations of
     the documents now complete.
Up to `executor.in_flight(c)` batches are prepared and not yet written (one locally: the
model computes batch N+1 while this thread writes batch N and reads and chunks the
documents after it); they are written strictly in the order they were prepared. Only
this thread touches Chroma, the cache and the WAL, so their order is the order of
DESIGN §4, whatever the model's speed or where it runs.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

import msgspec
import numpy as np

from . import config as cfg
from . import executor, failpoints, models, osfs, state, wal
from .chunking import chunk_text
from .config import Config
from .corpus import Document
from .errors import UsageError
from .plan import DocAction, Generation
from .reporting import Progress, Warnings


UNIT_SLACK = 1e-2  # how far from norm 1 a cached vector may be (half precision stays far inside)


class Counters(msgspec.Struct, kw_only=True):
    chunks_embedded: int = 0  # model calls
    chunks_from_cache: int = 0
    chunks_rekeyed: int = 0  # vectors reused from another doc_id's generation
    chunks_already_held: int = 0  # found in Chroma by chunk-level resume
    chunks_metadata_updated: int = 0
    chunks_upserted: int = 0
    chunks_deleted: int = 0
    docs_processed: int = 0


class OpenDoc(msgspec.Struct):
    action: DocAction
    doc: Document
    n_chunks: int
    remaining: int


class Chunk(msgspec.Struct):
    id: str
    text: str
    metadata: dict
    owner: OpenDoc
    reuse_id: str | None = None


class VectorSource:
    """Vectors for texts: the cache first (`lookup`, `remember`: the build's thread), the executor
    for the rest (`encode`: submitted now, `.result()` later; the model is loaded on the first miss)."""

    def __init__(self, c: Config, warn: Warnings, counters: Counters, declared_dim: int | None = None,
                 should_stop=lambda: False):
        self.c, self.warn, self.counters = c, warn, counters
        self.dim: int | None = None  # of the vectors handed out so far
        fingerprint = models.model_fingerprint(c)
        self.executor = executor.start(c, fingerprint, warn, should_stop)
        self.cache = None
        if c.embed_cache != "off":
            from . import cache
            self.cache = cache.open_cache(c, fingerprint, warn)
        self.declared_dim = declared_dim  # the preflight's, before a vector is in hand

    def lookup(self, texts: list[str]) -> dict[int, np.ndarray]:
        """Cached vectors that can be right: every embedder here returns finite unit vectors of the
        model's dimension, so a row that is not one (a flipped bit, a row of another dimension) is a
        miss, recomputed and overwritten, with a WARN. --embed-cache-refresh reads none (every vector
        is computed and its entry overwritten): the repair for cached vectors that look right but are not."""
        if not self.cache or not texts or self.c.embed_cache_refresh:
            return {}
        found = self.cache.get_many(texts)
        want = self.dim or self.declared_dim
        wrong = {i for i, v in found.items() if want and v.shape != (want,)}
        if wrong:
            self.warn("embed_cache_wrong_dimension", count=len(wrong), expected=want)
        usable = {i: v for i, v in found.items() if i not in wrong
                  and np.all(np.isfinite(v)) and abs(np.linalg.norm(v) - 1) < UNIT_SLACK}
        if len(usable) < len(found) - len(wrong):
            self.warn("embed_cache_bad_vector", count=len(found) - len(wrong) - len(usable))
        self.counters.chunks_from_cache += len(usable)
        return usable

    def encode(self, texts: list[str], on_pass=None):
        """Hand texts to the model; the returned handle's `.result()` is their float32 rows. on_pass(n):
        n more texts embedded (called from the model's thread)."""
        return self.executor.submit(texts, on_pass)

    def remember(self, texts: list[str], vectors: np.ndarray) -> None:
        """Before the upsert of the same rows: a kill after it keeps what the model paid for."""
        self.counters.chunks_embedded += len(texts)
        if self.cache:
            self.cache.put_many(texts, vectors)

    def close(self) -> None:
        self.executor.close()
        if self.cache:
            self.cache.close()


class _Prepared(msgspec.Struct):
    """A batch looked up and handed to the model; written once its vectors are back."""
    batch: list[Chunk]
    todo: list[Chunk]  # to upsert: missing, or held with other text or metadata
    metadatas: list[dict]  # what to send for each (Chroma merges: a key to drop is sent as None)
    vectors: dict[int, np.ndarray]  # index in todo -> vector, from re-keying or the cache
    misses: list[int]  # indexes in todo the model computes
    computing: object | None  # the executor's handle: .result() is the misses' vectors


class Pipeline:
    """Feeds documents through look → vectors → write; calls `committed(opened)` per document
    once all its chunks are in Chroma, after its old generations are deleted."""

    def __init__(self, c: Config, db, log: wal.Writer | wal.NullWriter, source: VectorSource,
                 warn: Warnings, counters: Counters, committed: Callable[[OpenDoc], None],
                 progress: Progress, totals: dict):
        self.c, self.db, self.log, self.source, self.warn = c, db, log, source, warn
        self.counters, self.committed, self.progress, self.totals = counters, committed, progress, totals
        self.buffer: deque[Chunk] = deque()
        if c.embed_log:  # a path that cannot be written fails before the first vector is paid for
            append_embed_log(c, "")
        self.settled: list[OpenDoc] = []  # complete documents whose old generations are to delete
        self.pending: deque[_Prepared] = deque()  # prepared, vectors on their way, written in this order
        self.ahead = executor.in_flight(c)

    def add(self, action: DocAction, doc: Document) -> None:
        c = self.c
        texts = chunk_text(doc.text, c.chunk_chars, c.overlap_chars, c.min_chunk_chars)
        self.log.append(wal.DocBegin(uri=doc.uri, doc_id=doc.doc_id, content_sha256=doc.content_sha256,
                                     old_content_sha256=action.old_content_sha256, n_chunks=len(texts),
                                     kind=action.kind, meta_sha256=action.meta_sha256))
        opened = OpenDoc(action, doc, len(texts), len(texts))
        self.progress.chunked(len(texts))
        reuse = next((g for g in action.reuse if g.n_chunks == len(texts)), None)
        for i, text in enumerate(texts):
            meta = state.chunk_metadata(doc.uri, doc.doc_id, doc.content_sha256, doc.source_type, doc.metadata,
                                        i, len(texts), text)
            self.buffer.append(Chunk(state.chunk_id(doc.doc_id, doc.content_sha256, i), text, meta, opened,
                                     state.chunk_id(reuse.doc_id, reuse.content_sha256, i) if reuse else None))
        if not texts:
            self.settled.append(self._done(opened))
        while len(self.buffer) >= c.upsert_batch:
            self.flush_one()

    def finish(self) -> None:
        while self.buffer:
            self.flush_one()
        while self.pending:
            self._write(self.pending.popleft())
        self.settle()

    def close(self) -> None:
        """After an error: batches not yet written are dropped; their vectors were neither cached nor
        logged, so the rerun computes them (the executor itself is closed with the VectorSource)."""
        self.pending.clear()

    def flush_one(self) -> None:
        """Hand the next batch to the model, then write the oldest ones while it computes, so
        that at most `ahead` batches wait for their vectors (each holds its texts in memory)."""
        batch = [self.buffer.popleft() for _ in range(min(self.c.upsert_batch, len(self.buffer)))]
        self.pending.append(self._prepare(batch))
        while len(self.pending) > self.ahead:
            self._write(self.pending.popleft())

    def _prepare(self, batch: list[Chunk]) -> _Prepared:
        """What to write and where its vectors come from: a row Chroma holds with the same text
        keeps its own vector (only metadata changes: rewritten whole, so no stale key survives),
        a re-keyed row takes the old doc_id's, then the cache, then the model. A refresh
        (--sync-mode rewrite-all) rewrites every row."""
        held = self.db.held([ch.id for ch in batch], include=("metadatas", "documents"))

        def same_text(ch: Chunk) -> bool:
            return ch.id in held and held[ch.id]["documents"] == ch.text and ch.owner.action.kind != "refresh"

        todo = [ch for ch in batch if not (same_text(ch) and state.same_metadata(held[ch.id]["metadatas"], ch.metadata))]
        # Chroma merges an upsert's metadata into the stored one: a stored key we no longer write is removed with None.
        metadatas = [{**{k: None for k in (held[ch.id]["metadatas"] or {}) if k not in ch.metadata}, **ch.metadata}
                     if ch.id in held else ch.metadata for ch in todo]
        self.counters.chunks_already_held += len(batch) - len(todo)
        source_of = {i: ch.id if same_text(ch) else ch.reuse_id for i, ch in enumerate(todo)}
        stored = self.db.held([s for s in source_of.values() if s], include=("embeddings",))
        vectors = {i: np.asarray(stored[s]["embeddings"], dtype=np.float32) for i, s in source_of.items() if s in stored}
        restamped = sum(1 for i in vectors if source_of[i] == todo[i].id)
        self.counters.chunks_metadata_updated += restamped
        self.counters.chunks_rekeyed += len(vectors) - restamped
        rest = [i for i in range(len(todo)) if i not in vectors]
        cached = self.source.lookup([todo[i].text for i in rest])
        vectors.update({rest[k]: v for k, v in cached.items()})
        misses = [i for i in rest if i not in vectors]
        self.progress.ready(len(batch) - len(misses))  # held, re-keyed or cached: no model needed
        computing = self.source.encode([todo[i].text for i in misses], self.progress.ready) if misses else None
        return _Prepared(batch, todo, metadatas, vectors, misses, computing)

    def _write(self, p: _Prepared) -> None:
        if p.computing is not None:
            fresh = p.computing.result()
            self.source.remember([p.todo[i].text for i in p.misses], fresh)
            p.vectors.update(zip(p.misses, fresh))
            self._embed_log([p.todo[i] for i in p.misses])
        self.log.barrier()  # the DOC_BEGINs of these chunks are durable before Chroma sees them
        if failpoints.enabled("bug.commit_before_upsert"):
            self._account(p.batch)
        if p.todo:
            vectors = np.stack([p.vectors[i] for i in range(len(p.todo))])
            self.source.dim = vectors.shape[1]
            self.db.upsert([ch.id for ch in p.todo], vectors, [ch.text for ch in p.todo], p.metadatas)
        written = len(p.todo)
        self.totals["batch_no"] += 1
        self.totals["upserted"] += written
        self.counters.chunks_upserted += written
        self.log.append(wal.UpsertBatchCommitted(batch_no=self.totals["batch_no"], batch_size=written,
                                                 chunks_upserted_total=self.totals["upserted"]))
        if not failpoints.enabled("bug.commit_before_upsert"):
            self._account(p.batch)
        self.settle()

    def _account(self, batch: list[Chunk]) -> None:
        for ch in batch:
            ch.owner.remaining -= 1
            if ch.owner.remaining == 0:
                self.settled.append(self._done(ch.owner))

    def _done(self, opened: OpenDoc) -> OpenDoc:
        a = opened.action
        self.log.append(wal.DocCommitted(uri=a.uri, doc_id=opened.doc.doc_id, content_sha256=opened.doc.content_sha256,
                                         n_chunks=opened.n_chunks, chunks_upserted_total=self.totals["upserted"],
                                         meta_sha256=a.meta_sha256))
        return opened

    def settle(self) -> None:
        """Delete the old generations of every document completed so far, then close the group."""
        settled, self.settled = self.settled, []
        delete_generations(self.db, self.log, [g for o in settled for g in o.action.old_generations], "old",
                           self.c.delete_batch, self.counters)
        for opened in settled:
            self.log.append(wal.DocDone(uri=opened.doc.uri, doc_id=opened.doc.doc_id,
                                        content_sha256=opened.doc.content_sha256))
            self.counters.docs_processed += 1
            self.progress.advance(docs=1)
            self.committed(opened)
        self.log.commit_group()

    def _embed_log(self, chunks: list[Chunk]) -> None:
        if self.c.embed_log and chunks:
            append_embed_log(self.c, "".join(f"{ch.id}\n" for ch in chunks))


def append_embed_log(c: Config, text: str) -> None:
    """Append to --embed-log; a file that cannot be written is the option's fault, named (exit 2), and the
    build records RUN_FINISH reason=error, so the next run resumes."""
    path = cfg.path(c, c.embed_log)
    try:
        osfs.append_bytes(path, text.encode())
    except OSError as exc:
        raise UsageError(f"--embed-log {path}: cannot append: {exc.strerror or exc}") from None


def delete_generations(db, log, gens: list[Generation], reason: str, batch: int, counters: Counters) -> None:
    """Intent records, one barrier, the deletes, then the facts. A delete cannot be redone, so
    the WAL knows it may have happened before Chroma is asked (DESIGN §3)."""
    if not gens or failpoints.enabled("bug.skip_old_delete") and reason == "old":
        return
    for g in gens:
        log.append(wal.DeleteIntent(uri=g.uri, doc_id=g.doc_id, old_content_sha256=g.content_sha256,
                                    n_chunks=g.n_chunks, reason=reason))
    if not failpoints.enabled("bug.delete_before_barrier"):
        log.barrier()
    # One generation may be listed under two uris (a doc_id carried to another source_uri, then audited):
    # Chroma refuses a delete that names an id twice.
    db.delete(list(dict.fromkeys(i for g in gens for i in state.generation_ids(g.doc_id, g.content_sha256,
                                                                                 g.n_chunks))), batch)
    done = wal.DeleteOldDone if reason == "old" else wal.DeleteStaleDone
    for g in gens:
        log.append(done(uri=g.uri, doc_id=g.doc_id, old_content_sha256=g.content_sha256, deleted_chunks=g.n_chunks))
        counters.chunks_deleted += g.n_chunks
