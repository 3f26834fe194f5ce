"""Runs a build: plans from manifest + corpus + WAL, then commits in the order of DESIGN §4.

Order inside a run: stale deletes · per document DOC_BEGIN → shared upsert batches →
UPSERT_BATCH_COMMITTED → DOC_COMMITTED → old-generation delete → DELETE_OLD_DONE →
DOC_DONE · final reconcile · RUN_FINISH · manifest · WAL cleared. Only facts Chroma
has accepted are logged, so a crash anywhere leaves a WAL that under-promises.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from typing import TextIO

import msgspec

from . import config as cfg
from . import corpus, embedding, failpoints, state, store, wal
from .chunking import chunk_text
from .config import Config
from .errors import CheckFailed, ChromaResumeError, Interrupted, UsageError, WalCorrupt
from .plan import DocAction, Generation, Plan, ResumeDecision, make_plan, resume_decision
from .reporting import Progress, Warnings


class Summary(msgspec.Struct, kw_only=True):
    docs_current: int = 0
    added: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    docs_processed: int = 0
    docs_resumed_skipped: int = 0
    chunks_embedded: int = 0
    chunks_upserted: int = 0
    chunks_deleted: int = 0
    expected_chunks: int = 0
    collection_count: int = 0
    elapsed_sec: float = 0.0


class _Chunk(msgspec.Struct):
    id: str
    text: str
    metadata: dict
    doc: "_OpenDoc"


class _OpenDoc(msgspec.Struct):
    action: DocAction
    n_chunks: int
    remaining: int


def build(c: Config, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Summary:
    """Build or resume the index; raises a ChromaResumeError subclass carrying the exit code."""
    started = time.monotonic()
    warn = Warnings(stream=err)
    # Read the corpus before taking the lock: bad input is exit 2 before anything is created.
    docs = [msgspec.structs.replace(d, text="") for d in corpus.scan(c, warn)]
    p = state.paths(c)
    with state.WriterLock(p["state_dir"], run_id=uuid.uuid4().hex[:12]), _StopOnSignal() as stop:
        run = _Run(c, p, cfg.schema_hash(c), out, err, stop, warn)
        return run.execute(docs, started)


class _Run:
    """One build's working state; lives only inside build()."""

    def __init__(self, c: Config, p: dict, schema: str, out: TextIO, err: TextIO, stop: "_StopOnSignal",
                 warn: Warnings):
        self.c, self.p, self.schema, self.out, self.stop, self.warn = c, p, schema, out, stop, warn
        self.summary = Summary()
        self.embedder = None
        self.writer: wal.Writer | None = None
        self.batch_no = 0
        self.upserted_total = 0
        self.committed: dict[str, tuple[str, str, int]] = {}  # uri -> (doc_id, sha, n_chunks) in Chroma
        self.refs: dict[str, corpus.Document] = {}  # uri -> the corpus document (without text)
        self.progress = Progress(0, mode="off")
        self.err = err

    # ---- the run ---------------------------------------------------------------------
    def execute(self, docs: list[corpus.Document], started: float) -> Summary:
        c, p = self.c, self.p
        manifest = state.load_manifest(p["manifest"])
        replay = wal.read(p["wal"])
        decision = resume_decision(replay, mode=c.resume, schema_hash=self.schema, collection=c.collection,
                                   db=cfg.db_identity(c), manifest_run_id=manifest.last_build.get("run_id") if manifest else None)
        if c.resume == "force" and not decision.active:
            raise WalCorrupt(f"--resume force: cannot resume ({decision.reason}) from {p['wal']}")
        latest = state.read_latest(p["collection_dir"])
        schema_changed = latest is not None and latest != self.schema
        if schema_changed and c.schema_change == "fail":
            raise UsageError(f"schema changed: LATEST is {latest}, this configuration is {self.schema} "
                             f"(--schema-change fail); use --schema-change reset to rebuild")
        if schema_changed:  # the collection holds another schema's vectors: rebuild, never resume
            manifest = None
            if decision.active:
                decision = ResumeDecision(False, f"latest_schema_is_{latest}")
        self.refs = {d.uri: d for d in docs}
        plan = make_plan(docs, manifest.documents if manifest else {},
                         replay if decision.active else None, c.sync_mode)
        self._stage_line(decision, replay)
        if plan.to_embed:
            self.embedder = embedding.load(c)  # exit 2 before anything is written
        db = store.open_store(c)
        if schema_changed:
            db = db.reset()
            self.warn("schema_reset", collection=c.collection, old=latest, new=self.schema)
        elif manifest is None and not decision.active and db.count() > 0:
            db = self._missing_state(db)
        if latest != self.schema:
            state.write_latest(p["collection_dir"], self.schema)
        self.db = db
        self._open_wal(replay, decision)
        try:
            return self._run_plan(plan, manifest, started)
        except Exception as exc:
            reason = {Interrupted: "interrupted", CheckFailed: "strict_sync_mismatch"}.get(type(exc), "error")
            self._finish_quietly(reason)
            raise

    def _missing_state(self, db: store.Store) -> store.Store:
        c = self.c
        if c.on_missing_state == "fail":
            raise UsageError(f"manifest {self.p['manifest']} is missing but collection {c.collection!r} holds "
                             f"{db.count()} chunks (--on-missing-state fail); use reset or full-upsert")
        if c.on_missing_state == "reset":
            self.warn("missing_state_reset", collection=c.collection, chunks=db.count())
            return db.reset()
        return db  # full-upsert: embed everything; the reconcile removes what the corpus lacks

    def _run_plan(self, plan: Plan, manifest: state.Manifest | None, started: float) -> Summary:
        c, s = self.c, self.summary
        s.added, s.changed, s.deleted, s.unchanged = plan.added, plan.changed, plan.deleted, plan.unchanged
        s.docs_current = len(plan.docs)
        self._delete_stale(plan.stale)
        for action in plan.docs:
            if action.action == "unchanged":
                self._delete_old(action)
                self.committed[action.uri] = (action.doc_id, action.content_sha256, action.n_chunks)
        embed = plan.to_embed + self._check_resumed(plan.resumed)
        self._commit_group()
        self._embed(embed, manifest)
        self._reconcile(plan, manifest)
        s.expected_chunks = sum(n for _, _, n in self.committed.values())
        s.collection_count = self.db.count()
        if c.strict_sync:
            actual, expected = self.db.all_ids(), self._expected_ids()
            if actual != expected:
                raise CheckFailed(f"strict sync: collection holds {len(actual)} chunks, expected {len(expected)} "
                                  f"({len(expected - actual)} missing, {len(actual - expected)} orphans); "
                                  f"WAL kept at {self.p['wal']}")
        self._finish(True, "ok")
        s.elapsed_sec = round(time.monotonic() - started, 3)
        self._write_manifest(plan, manifest)
        self._clear_wal()
        return s

    # ---- WAL -------------------------------------------------------------------------
    def _open_wal(self, replay: wal.Replay | None, decision) -> None:
        c, path, resuming = self.c, self.p["wal"], decision.active
        if replay is not None and not resuming:
            self._retire_wal(replay, decision.reason)
        if not c.wal:
            return
        if resuming:
            if replay.truncated_tail:
                wal.drop_torn_tail(path, replay.good_size)
            self.writer = wal.Writer(path, replay.start.run_id, policy=c.wal_fsync,
                                     interval=c.wal_fsync_interval, next_seq=replay.last_seq + 1)
            self.batch_no, self.upserted_total = replay.committed_batches, replay.chunks_upserted_total
            self.writer.append(wal.RunResume(pid=os.getpid(), host=socket.gethostname()))
        else:
            self.writer = wal.Writer(path, uuid.uuid4().hex[:12], policy=c.wal_fsync, interval=c.wal_fsync_interval)
            self.writer.append(wal.RunStart(
                wal_version=wal.WAL_VERSION, schema_hash=self.schema, collection=c.collection,
                db=cfg.db_identity(c), sync_mode=c.sync_mode, config=cfg.snapshot(c),
                pid=os.getpid(), host=socket.gethostname()))

    def _retire_wal(self, replay: wal.Replay, decision_reason: str) -> None:
        """A finished WAL is stale: remove it. An unfinished one we will not resume: set it aside."""
        if decision_reason == "wal_finished_ok":
            os.unlink(replay.path)
            return
        run_id = replay.start.run_id if replay.start else "unknown"
        aside = f"{replay.path}.abandoned-{run_id}"
        os.replace(replay.path, aside)
        self.warn("wal_abandoned", path=aside, run_id=run_id)

    def _log(self, event: wal.Event) -> None:
        if self.writer is not None:
            self.writer.append(event)

    def _commit_group(self) -> None:
        if self.writer is not None:
            self.writer.commit_group()
        if self.stop.requested:
            raise Interrupted("interrupted: the in-flight batch was committed and logged; rerun to resume")

    def _finish(self, ok: bool, reason: str) -> None:
        s = self.summary
        self._log(wal.RunFinish(
            ok=ok, reason=reason, expected_chunks=s.expected_chunks, collection_count=s.collection_count,
            delta=s.collection_count - s.expected_chunks, docs_processed=s.docs_processed,
            docs_resumed_skipped=s.docs_resumed_skipped, committed_batches=self.batch_no,
            chunks_upserted_total=self.upserted_total, warn_count=self.warn.count,
            warn_functional_count=self.warn.functional, warn_keys=dict(self.warn.keys)))

    def _finish_quietly(self, reason: str) -> None:
        try:
            self._finish(False, reason)
        except ChromaResumeError:
            pass  # the disk or WAL may be what failed; the original error is the one to report

    def _clear_wal(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        path = self.p["wal"]
        if self.c.keep_wal:
            os.replace(path, f"{path}.{self.writer.run_id}.done")
        else:
            os.unlink(path)

    # ---- deletes ---------------------------------------------------------------------
    def _delete_stale(self, stale: list[Generation]) -> None:
        for g in stale:
            self.db.delete(state.generation_ids(g.doc_id, g.content_sha256, g.n_chunks), self.c.delete_batch)
            self.summary.chunks_deleted += g.n_chunks
            self._log(wal.DeleteStaleDone(uri=g.uri, doc_id=g.doc_id, old_content_sha256=g.content_sha256,
                                          deleted_chunks=g.n_chunks))
            self._commit_group()

    def _delete_old(self, action: DocAction) -> None:
        if failpoints.enabled("bug.skip_old_delete"):
            return
        for g in action.old_generations:
            self.db.delete(state.generation_ids(g.doc_id, g.content_sha256, g.n_chunks), self.c.delete_batch)
            self.summary.chunks_deleted += g.n_chunks
            self._log(wal.DeleteOldDone(uri=g.uri, doc_id=g.doc_id, old_content_sha256=g.content_sha256,
                                        deleted_chunks=g.n_chunks))

    # ---- resume: trust but verify ----------------------------------------------------
    def _check_resumed(self, resumed: list[DocAction]) -> list[DocAction]:
        """Skip documents the WAL says are committed, after one batched check that Chroma has them."""
        wanted = [i for a in resumed for i in state.generation_ids(a.doc_id, a.content_sha256, a.n_chunks)]
        present = self.db.existing(wanted) if wanted else set()
        again: list[DocAction] = []
        for a in resumed:
            ids = state.generation_ids(a.doc_id, a.content_sha256, a.n_chunks)
            missing = [i for i in ids if i not in present]
            if missing:
                self.warn("wal_ahead_of_db", uri=a.uri, missing_chunks=len(missing))
                again.append(msgspec.structs.replace(a, action="embed"))
                continue
            self.summary.docs_resumed_skipped += 1
            self.committed[a.uri] = (a.doc_id, a.content_sha256, a.n_chunks)
            self._delete_old(a)
            self._log(wal.DocDone(uri=a.uri, doc_id=a.doc_id, content_sha256=a.content_sha256))
        if again and self.embedder is None:
            self.embedder = embedding.load(self.c)
        return again

    # ---- embedding pipeline ----------------------------------------------------------
    def _embed(self, actions: list[DocAction], manifest: state.Manifest | None) -> None:
        if not actions:
            return
        c = self.c
        by_uri = {a.uri: a for a in actions}
        self.progress = progress = Progress(len(actions), mode=c.progress, stream=self.err)
        buffer: deque[_Chunk] = deque()
        for doc in corpus.scan(c, _already_warned, only=set(by_uri)):
            action = self._current(by_uri.pop(doc.uri), doc)
            texts = chunk_text(doc.text, c.chunk_chars, c.overlap_chars, c.min_chunk_chars)
            self._log(wal.DocBegin(uri=doc.uri, doc_id=doc.doc_id, content_sha256=doc.content_sha256,
                                   old_content_sha256=action.old_content_sha256, n_chunks=len(texts),
                                   kind=action.kind))
            opened = _OpenDoc(action, len(texts), len(texts))
            if not texts:
                self._doc_committed(opened)
            for i, text in enumerate(texts):
                meta = {**doc.metadata, "doc_id": doc.doc_id, "source_uri": doc.uri,
                        "content_sha256": doc.content_sha256, "chunk_index": i, "n_chunks": len(texts),
                        "source_type": doc.source_type}
                buffer.append(_Chunk(state.chunk_id(doc.doc_id, doc.content_sha256, i), text, meta, opened))
            while len(buffer) >= c.upsert_batch:
                self._flush(buffer, c.upsert_batch, progress)
        while buffer:
            self._flush(buffer, c.upsert_batch, progress)
        self._commit_group()
        progress.close()
        for uri in by_uri:  # planned but unreadable now: keep what the manifest had
            self.warn("vanished_during_build", path=uri)
            known = manifest.documents.get(uri) if manifest else None
            if known:
                self.committed[uri] = (known.doc_id, known.content_sha256, known.n_chunks)

    def _current(self, action: DocAction, doc: corpus.Document) -> DocAction:
        """The document may have been edited since planning: embed what we read now."""
        if doc.content_sha256 == action.content_sha256:
            return action
        olds = [g for g in action.old_generations if g.content_sha256 != doc.content_sha256]
        return msgspec.structs.replace(action, content_sha256=doc.content_sha256, old_generations=olds)

    def _flush(self, buffer: deque, size: int, progress: Progress) -> None:
        batch = [buffer.popleft() for _ in range(min(size, len(buffer)))]
        texts = [ch.text for ch in batch]
        vectors = self.embedder.encode(texts)
        self.summary.chunks_embedded += len(batch)
        self._embed_log(batch)
        ids = [ch.id for ch in batch]
        if failpoints.enabled("bug.commit_before_upsert"):
            self._account(batch)
        self.db.upsert(ids, vectors, texts, [ch.metadata for ch in batch])
        self.batch_no += 1
        self.upserted_total += len(batch)
        self.summary.chunks_upserted += len(batch)
        self._log(wal.UpsertBatchCommitted(batch_no=self.batch_no, batch_size=len(batch),
                                           chunks_upserted_total=self.upserted_total))
        if not failpoints.enabled("bug.commit_before_upsert"):
            self._account(batch)
        progress.advance(chunks=len(batch))
        self._commit_group()

    def _account(self, batch: list[_Chunk]) -> None:
        for ch in batch:
            ch.doc.remaining -= 1
            if ch.doc.remaining == 0:
                self._doc_committed(ch.doc)

    def _doc_committed(self, opened: _OpenDoc) -> None:
        a = opened.action
        self._log(wal.DocCommitted(uri=a.uri, doc_id=a.doc_id, content_sha256=a.content_sha256,
                                   n_chunks=opened.n_chunks, chunks_upserted_total=self.upserted_total))
        self._delete_old(a)
        self._log(wal.DocDone(uri=a.uri, doc_id=a.doc_id, content_sha256=a.content_sha256))
        self.committed[a.uri] = (a.doc_id, a.content_sha256, opened.n_chunks)
        self.summary.docs_processed += 1
        self.progress.advance(docs=1)

    def _embed_log(self, batch: list[_Chunk]) -> None:
        if self.c.embed_log:
            fd = os.open(cfg.path(self.c, self.c.embed_log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(f"{ch.id}\n" for ch in batch).encode())
            finally:
                os.close(fd)

    # ---- final reconcile -------------------------------------------------------------
    def _reconcile(self, plan: Plan, manifest: state.Manifest | None) -> None:
        """Cheap count check; only on a mismatch (or strict sync) compare the id sets and repair."""
        failpoints.fire("build.reconcile")
        expected = sum(n for _, _, n in self.committed.values())
        if self.c.sync_mode == "none" or (self.db.count() == expected and not self.c.strict_sync):
            return
        expected_ids = self._expected_ids()
        actual = self.db.all_ids()
        orphans = sorted(actual - expected_ids)
        if orphans:
            self.db.delete(orphans, self.c.delete_batch)
            self.summary.chunks_deleted += len(orphans)
            self.warn("orphans_deleted", count=len(orphans), first=orphans[0])
        missing_docs = {i.rsplit(":", 2)[0] for i in expected_ids - actual}
        if missing_docs:
            redo = [msgspec.structs.replace(a, action="embed") for a in plan.docs if a.doc_id in missing_docs]
            self.warn("missing_after_build", docs=len(redo), first=redo[0].uri if redo else "")
            if self.embedder is None:
                self.embedder = embedding.load(self.c)
            self._embed(redo, manifest)

    def _expected_ids(self) -> set[str]:
        return {i for doc_id, sha, n in self.committed.values() for i in state.generation_ids(doc_id, sha, n)}

    # ---- outputs ---------------------------------------------------------------------
    def _write_manifest(self, plan: Plan, manifest: state.Manifest | None) -> None:
        if not self.c.write_state:
            return
        documents = {}
        for uri, (doc_id, sha, n) in sorted(self.committed.items()):
            ref = self.refs.get(uri)
            documents[uri] = state.DocEntry(doc_id=doc_id, content_sha256=sha, n_chunks=n,
                                            source_type=ref.source_type if ref else "",
                                            updated_at=ref.updated_at if ref else "")
        dim = self.embedder.dim if self.embedder else (manifest.dim if manifest else None)
        if dim is None and self.summary.expected_chunks:
            dim = self.db.dimension()
        state.write_manifest(self.p["manifest"], state.Manifest(
            schema_hash=self.schema, collection=self.c.collection, db=cfg.db_identity(self.c), dim=dim,
            config=cfg.snapshot(self.c), documents=documents,
            last_build={**msgspec.to_builtins(self.summary), "run_id": self.writer.run_id if self.writer else "",
                        "finished_at": state.now_iso(),
                        "warn_count": self.warn.count}))

    def _stage_line(self, decision, replay: wal.Replay | None) -> None:
        r = replay if decision.active else None
        print(f"[STAGE] resume_active={str(decision.active).lower()} reason={decision.reason} "
              f"wal_version={wal.WAL_VERSION} run_id={r.start.run_id if r else 'new'} "
              f"done_docs={r.docs_committed if r else 0} committed_batches={r.committed_batches if r else 0} "
              f"chunks_upserted_total_last={r.chunks_upserted_total if r else 0} "
              f"truncated_tail_ignored={str(bool(replay and replay.truncated_tail)).lower()} "
              f"wal_fsync={self.c.wal_fsync}", file=self.out, flush=True)


def _already_warned(*args, **fields) -> None:
    """The second read of the corpus: its skips were reported by the first."""


class _StopOnSignal:
    """First SIGINT/SIGTERM: finish and log the in-flight batch, then stop. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"[STOP] {signal.Signals(signum).name}: finishing the in-flight batch "
              f"(again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
