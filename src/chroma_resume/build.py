"""Runs a build: decides which collection and WAL to trust, plans, then commits in the order of DESIGN §4.

Order inside a run: stale deletes · per document DOC_BEGIN → shared upsert batches →
UPSERT_BATCH_COMMITTED → DOC_COMMITTED → old-generation delete → DELETE_OLD_DONE →
DOC_DONE · final reconcile · RUN_FINISH · manifest · WAL cleared. Only facts Chroma
has accepted are logged (and intents before every delete), so a crash anywhere
leaves a WAL that under-promises what Chroma holds and never hides a delete.
"""
from __future__ import annotations

import glob
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import TextIO

import msgspec

from . import config as cfg
from . import corpus, embedders, executor, failpoints, models, osfs, schema, state, store, wal
from .audit import audit
from .config import Config
from .errors import CheckFailed, ChromaResumeError, Interrupted, StoreCorrupt, UsageError, WalCorrupt
from .pipeline import Counters, OpenDoc, Pipeline, VectorSource, delete_generations
from .plan import FACTS_ONLY, DocAction, Generation, Plan, ResumeDecision, make_plan, resume_decision
from .reporting import Progress, Warnings


NEW_COLLECTION = "new"  # the incarnation a run will create: no WAL or manifest can describe it

STORE_FIX = ("Run the build with --on-store-corrupt rebuild (the default) or `chroma-resume repair`: it sets the "
             "folder aside and rebuilds the collection from the corpus, with vectors from the embedding cache")


class Summary(msgspec.Struct, kw_only=True):
    docs_current: int = 0
    added: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    kept_unreadable: int = 0
    docs_processed: int = 0
    docs_resumed_skipped: int = 0
    chunks_embedded: int = 0
    chunks_from_cache: int = 0
    chunks_rekeyed: int = 0
    chunks_already_held: int = 0
    chunks_metadata_updated: int = 0
    chunks_upserted: int = 0
    chunks_deleted: int = 0
    expected_chunks: int = 0
    collection_count: int = 0
    store_set_aside: str = ""  # where an unreadable Chroma folder was moved before the rebuild
    elapsed_sec: float = 0.0


def build(c: Config, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Summary:
    """Build or resume the index; raises a ChromaResumeError subclass carrying the exit code."""
    started = time.monotonic()
    warn = Warnings(stream=err)
    # Read the corpus and find the model before taking the lock: bad input is exit 2 before anything is created.
    listing = corpus.Listing()
    docs = [msgspec.structs.replace(d, text="") for d in corpus.scan(c, warn, listing=listing)]
    model = models.preflight(c)  # every refusal about the model, before anything is created
    embedders.prepare(c, warn)  # an export a backend cannot do without, made or refused now
    if embedders.needs_transformers(c):
        models.check_loadable(c)  # and that it loads (config and tokenizer through transformers, no weights)
    executor.connect(c)  # Ray missing (exit 2) or its cluster unreachable (exit 5): before anything is written
    p = state.paths(c)
    if not docs and not (listing.files or listing.dirs) and not c.allow_empty:
        _refuse_wiping(c, p)
    run_id = uuid.uuid4().hex[:12]
    with state.WriterLock(p["collection_dir"], run_id), state.store_lock(c, run_id), _StopOnSignal() as stop:
        failpoints.fire("lock.acquired")
        os.makedirs(p["state_dir"], exist_ok=True)
        _remove_temp_files(p)
        run = _Run(c, p, schema.schema_hash(c), model, out, stop, warn)
        return run.execute(docs, listing, started)


def _refuse_wiping(c: Config, p: dict) -> None:
    """A listing that succeeded and found nothing removes every document: right for a corpus emptied on
    purpose, a disaster for a typo (`--include ''`, the wrong folder). So it asks for --allow-empty.
    The collection's own rows count too: without a state folder (a fresh checkout, another
    --state-root) the manifest lists nothing, yet the build would still empty the collection."""
    manifest = state.load_manifest(p["manifest"])
    if manifest is not None and manifest.documents:
        lost = f"all {len(manifest.documents)} documents"
    elif rows := store.rows_held(c):
        lost = f"all {rows} rows"
    else:
        return
    raise UsageError(f"the corpus {corpus.source_path(c)} lists no document (include: {' '.join(c.include)!r}): "
                     f"this build would delete {lost} of collection {c.collection!r}. Pass --allow-empty true "
                     f"if that is what you want")


def refuse_unresumable(c: Config, p: dict, decision: ResumeDecision) -> None:
    """--resume force refuses a run it cannot continue, before anything changes (also dry run's refusal)."""
    if c.resume == "force" and not decision.active:
        raise WalCorrupt(f"--resume force: cannot resume ({decision.reason}) from {p['wal']}; nothing was "
                         f"changed. Rerun without --resume force to build afresh")


def refuse_schema_change(c: Config, fp: dict, schema_hash: str) -> None:
    """--schema-change fail refuses to reset a collection of another schema (also dry run's refusal)."""
    if c.schema_change == "fail":
        held = f"schema {fp['schema_hash'] or 'unknown (not built by chroma-resume)'}, space {fp['space']}"
        raise UsageError(f"schema changed: collection {c.collection!r} in {cfg.db_identity(c)} holds {held}; "
                         f"this configuration is schema {schema_hash}, space {c.hnsw_space} "
                         f"(--schema-change fail; a changed model, even behind the same name, is a schema "
                         f"change). Use --schema-change reset to rebuild it")


def vouched(fp: dict, manifest: state.Manifest | None, wal_run: str | None) -> bool:
    """Whether records cover every write the collection has seen (DESIGN §13): the collection itself
    says it reached the manifest's run, and nothing wrote since but the run whose WAL this build
    reads (that WAL's facts are checked by content, never trusted). A run id alone proves nothing:
    a resumed run keeps its id, so a manifest naming run R proves that some copy of the store
    finished R, not this one (a backup or copy taken mid-run still says `writing=R`, `recorded`
    the run before). A collection restored from a backup, or a state folder restored to an older
    manifest, fails the same test."""
    manifest_run = manifest.last_build.get("run_id") if manifest is not None else None
    return fp["recorded"] == manifest_run and fp["writing"] in (None, wal_run)


def _remove_temp_files(p: dict) -> None:
    """A kill between writing and renaming a manifest or LATEST leaves its temp file behind."""
    for pattern in (f"{p['manifest']}.tmp.*", os.path.join(p["collection_dir"], f"{state.LATEST_NAME}.tmp.*")):
        for leftover in glob.glob(pattern):
            osfs.unlink(leftover)


class _Run:
    """One build's working state; lives only inside build()."""

    def __init__(self, c: Config, p: dict, schema_hash: str, model: models.ModelInfo, out: TextIO,
                 stop: "_StopOnSignal", warn: Warnings):
        self.c, self.p, self.schema, self.model, self.out, self.stop, self.warn = c, p, schema_hash, model, out, stop, warn
        self.run_id = uuid.uuid4().hex[:12]  # a continued WAL's run keeps its id (_open_wal)
        self.summary = Summary()
        self.counters = Counters()
        self.log: wal.Writer | wal.NullWriter = wal.NullWriter()
        self.totals = {"batch_no": 0, "upserted": 0}
        self.committed: dict[str, state.DocEntry] = {}  # uri -> the generation Chroma holds for it
        self.refs: dict[str, corpus.Document] = {}  # uri -> the corpus document (without text)
        self.source: VectorSource | None = None
        self.recorded_before = True  # whether a manifest described the collection before this run

    # ---- the run ---------------------------------------------------------------------
    def execute(self, docs: list[corpus.Document], listing: corpus.Listing, started: float) -> Summary:
        """Decide everything that can refuse the run, then act: nothing is reset, set aside or
        written before the last check that could refuse has passed (DESIGN §13)."""
        c, p = self.c, self.p
        manifest = state.load_manifest(p["manifest"])
        replay = wal.read(p["wal"])
        if c.resume == "force" and (replay is None or replay.start is None):
            raise WalCorrupt(f"--resume force: cannot resume: there is no WAL at {p['wal']}; nothing was changed. "
                             f"Rerun without --resume force to build afresh")
        missing = store.embedded_store_missing(c)  # not opened: a client would create the folder
        damaged = [] if missing else store.damaged_files(c)  # read before any client opens (and fills) them
        damage = None if missing else self._store_damage(
            damaged, deep=c.store_check == "deep" or self._unclean(manifest, replay, damaged))
        db = None if damage or missing else store.open_store(c)
        fp = db.fingerprint() if db is not None else {}
        held = db.count() if db is not None else 0
        reset = held > 0 and (fp["schema_hash"], fp["space"]) != (self.schema, c.hnsw_space)
        if reset:
            self._check_schema_change(fp)
        elif held:
            self._check_dimension(db)
        recreated = db is None or reset or (fp["schema_hash"], fp["space"]) != (self.schema, c.hnsw_space)
        incarnation = None if recreated else fp["incarnation"]  # None: this run creates the collection anew
        if manifest is not None and manifest.incarnation != incarnation:  # not its path: a moved folder is the same
            if incarnation is not None:
                self.warn("manifest_of_another_collection", manifest=p["manifest"], collection=c.collection)
            manifest = None
        decision = resume_decision(replay, mode=c.resume, schema_hash=self.schema, collection=c.collection,
                                   db=cfg.db_identity(c), incarnation=incarnation or NEW_COLLECTION,
                                   wal_enabled=c.wal,
                                   manifest_run_id=manifest.last_build.get("run_id") if manifest else None)
        refuse_unresumable(c, p, decision)
        self.recorded_before = manifest is not None  # what the next build does after a --wal off interruption
        missing_state = manifest is None and not decision.active and held > 0 and not reset
        if missing_state and c.on_missing_state == "fail":
            raise UsageError(f"manifest {p['manifest']} is missing but collection {c.collection!r} holds "
                             f"{held} chunks (--on-missing-state fail); use reset or full-upsert")
        # ---- from here on the run acts -------------------------------------------------
        models.remember_digests(self.c)  # the next run names the model by stat, without hashing it
        if damage:
            self.summary.store_set_aside = store.set_aside(c)
            self.warn("store_set_aside", path=self.summary.store_set_aside, cause=damage)
        self.db = db = self._collection(db, fp, reset or (missing_state and c.on_missing_state == "reset"), held)
        wal_run = replay.start.run_id if replay and (decision.active or decision.reason in FACTS_ONLY) else None
        if not vouched(db.fingerprint(), manifest, wal_run) and not failpoints.enabled("bug.skip_audit"):
            manifest = self._audited(db, manifest)
        if state.read_latest(p["collection_dir"]) != self.schema:
            state.write_latest(p["collection_dir"], self.schema)
        self.refs = {d.uri: d for d in docs}
        facts = replay if decision.active or decision.reason in FACTS_ONLY else None
        plan = make_plan(docs, manifest.documents if manifest else {}, facts, c.sync_mode, listing,
                         trust_commits=decision.active, leftovers=manifest.leftovers if manifest else [])
        self._stage_line(decision, replay)
        self._open_wal(replay, decision, db.fingerprint()["incarnation"])
        db.before_first_write = lambda: db.mark_writing(self.run_id)
        self.source = VectorSource(c, self.warn, self.counters, self.model.dim, lambda: self.stop.requested)
        try:
            return self._run_plan(plan, manifest, started)
        except Exception as exc:
            reason = {Interrupted: "interrupted", CheckFailed: "strict_sync_mismatch"}.get(type(exc), "error")
            self._finish_quietly(reason)
            raise
        finally:
            self.source.close()

    def _unclean(self, manifest: state.Manifest | None, replay: wal.Replay | None, damaged: list[str]) -> bool:
        """Whether the last run may have ended without its manifest: a WAL whose run wrote none, or a
        collection still marked as being written (--wal off). A power cut then may have left Chroma's
        index files behind its sqlite (store.check_deep)."""
        if replay is not None and not (replay.finished_ok and manifest is not None and replay.start is not None
                                       and manifest.last_build.get("run_id") == replay.start.run_id):
            return True
        if damaged:  # never opened through a client: it would fill an emptied sqlite file
            return True
        try:
            found = store.stored_fingerprint(self.c)
        except ChromaResumeError:
            return True
        return found is not None and found["writing"] is not None

    def _store_damage(self, damaged: list[str], deep: bool) -> str | None:
        """Why an embedded store cannot be read (it is set aside and rebuilt, --on-store-corrupt
        rebuild: the manifest then names a collection that is gone, so every document is planned
        again, and the embedding cache pays for the vectors), or None. A server's store, or
        --on-store-corrupt fail, refuses instead. `deep` after an unclean end: every row's vector
        and the vector index's ids are checked, not only that the store opens."""
        c = self.c
        try:
            if damaged:
                raise StoreCorrupt(f"Chroma cannot read its own files: {damaged[:3]} are empty (a power cut can leave "
                                   f"them so)")
            if deep and not c.chroma_host:
                rows = store.check_deep(c)
                why = "as asked (--store-check deep, or repair)" if c.store_check == "deep" else "after an unclean end"
                print(f"[STORE] checked deeply {why}: {rows} rows, each with its "
                      f"vector, the vector index agrees", file=self.out, flush=True)
            else:
                store.probe(c)
        except StoreCorrupt as exc:
            if c.chroma_host or c.on_store_corrupt == "fail":
                raise StoreCorrupt(f"{exc}. {STORE_FIX if not c.chroma_host else 'Repair or restore the server.'}") \
                    from None
            return str(exc)
        return None

    def _check_schema_change(self, fp: dict) -> None:
        refuse_schema_change(self.c, fp, self.schema)
        self.warn("schema_reset", collection=self.c.collection, old=fp["schema_hash"] or "unknown", new=self.schema)

    def _check_dimension(self, db: store.Store) -> None:
        """Same schema, other dimension: only a collection written by something else gets here."""
        stored = db.dimension()
        if stored is not None and stored != self.model.dim:
            c = self.c
            raise UsageError(f"collection {c.collection!r} in {cfg.db_identity(c)} holds {stored}-dimensional "
                             f"vectors but model {c.embed_model!r} makes {self.model.dim}: rebuild it into another "
                             f"collection (--collection NAME), or delete this one and build again")

    def _collection(self, db: store.Store | None, fp: dict, reset: bool, held: int) -> store.Store:
        """The collection, created or reset so that its fingerprint is this schema (DESIGN §4)."""
        c = self.c
        if db is None:
            return store.open_store(c, schema=self.schema)
        if reset:
            if fp["schema_hash"] == self.schema and fp["space"] == c.hnsw_space:
                self.warn("missing_state_reset", collection=c.collection, chunks=held)
            return db.recreate(c, self.schema)
        if (fp["schema_hash"], fp["space"]) != (self.schema, c.hnsw_space):  # empty: nothing to lose
            return db.recreate(c, self.schema)
        return db

    def _audited(self, db: store.Store, manifest: state.Manifest | None) -> state.Manifest:
        """Rows may have changed where no record says how: rebuild the manifest from what Chroma holds."""
        found = audit(db, manifest)
        fp = db.fingerprint()
        self.warn("audit_unrecorded_writes", writing=fp["writing"] or "none", recorded=fp["recorded"] or "none",
                  manifest_run=manifest.last_build.get("run_id", "none") if manifest else "none",
                  rows=found.rows, docs=len(found.documents), broken_generations=found.broken)
        base = manifest or state.Manifest(schema_hash=self.schema, collection=self.c.collection,
                                          db=cfg.db_identity(self.c))
        return msgspec.structs.replace(base, documents=found.documents, leftovers=found.leftovers)

    def _run_plan(self, plan: Plan, manifest: state.Manifest | None, started: float) -> Summary:
        c, s = self.c, self.summary
        s.added, s.changed, s.deleted, s.unchanged = plan.added, plan.changed, plan.deleted, plan.unchanged
        s.kept_unreadable = plan.kept
        s.docs_current = len(plan.docs) - plan.kept
        for lo in range(0, len(plan.stale), 256):
            delete_generations(self.db, self.log, plan.stale[lo:lo + 256], "stale", c.delete_batch, self.counters)
            self._commit_group()
        for a in plan.docs:
            if a.kind == "kept":
                self._keep_unreadable(a)
        in_place = [a for a in plan.docs if a.action == "unchanged" and a.kind != "kept"]
        for a in in_place:
            self.committed[a.uri] = self._entry(a, a.n_chunks)
        delete_generations(self.db, self.log, [g for a in in_place for g in a.old_generations], "old",
                           c.delete_batch, self.counters)
        embed = plan.to_embed + self._check_resumed(plan.resumed)
        self._commit_group()
        self._embed(embed)
        self._reconcile(plan)
        s.expected_chunks = sum(e.n_chunks for e in self.committed.values())
        s.collection_count = self.db.count()
        if c.strict_sync:
            actual, expected = self.db.all_ids(), self._expected_ids()
            if actual != expected:
                raise CheckFailed(f"strict sync: collection holds {len(actual)} chunks, expected {len(expected)} "
                                  f"({len(expected - actual)} missing, {len(actual - expected)} orphans); "
                                  f"WAL kept at {self.p['wal']}")
        self._tally()
        self._finish(True, "ok")
        s.elapsed_sec = round(time.monotonic() - started, 3)
        if c.write_state:  # the collection says it reached this run before any record says so (_vouched)
            self.db.mark_recorded(self.run_id)
        store.make_durable(c)  # a manifest on disk means the collection it describes is on disk too
        self._write_manifest(manifest, plan.leftovers)
        self._clear_wal()
        return s

    def _entry(self, a: DocAction, n_chunks: int) -> state.DocEntry:
        """What the manifest records for a document the scan read."""
        ref = self.refs[a.uri]
        return state.DocEntry(doc_id=ref.doc_id, content_sha256=a.content_sha256, n_chunks=n_chunks,
                              source_type=ref.source_type, updated_at=ref.updated_at, metadata=ref.metadata)

    def _tally(self) -> None:
        for field in msgspec.structs.fields(Counters):
            if hasattr(self.summary, field.name):
                setattr(self.summary, field.name, getattr(self.counters, field.name))

    # ---- WAL -------------------------------------------------------------------------
    def _open_wal(self, replay: wal.Replay | None, decision: ResumeDecision, incarnation: str) -> None:
        c, path = self.c, self.p["wal"]
        # --resume off redoes the run's work but keeps appending to its WAL: its facts (deletions,
        # doubts) must outlive this run too, or a crash now would forget them.
        continued = decision.active or (decision.reason == "resume_off" and c.wal)
        if replay is not None and not continued:
            self._retire_wal(replay, decision.reason)
        if not c.wal:
            return
        if continued:
            if replay.truncated_tail:
                wal.drop_torn_tail(path, replay.good_size)
            self.run_id = replay.start.run_id
            self.log = wal.Writer(path, self.run_id, policy=c.wal_fsync, interval=c.wal_fsync_interval,
                                  next_seq=replay.last_seq + 1)
            self.totals = {"batch_no": replay.committed_batches, "upserted": replay.chunks_upserted_total}
            self.log.append(wal.RunResume(pid=os.getpid(), host=socket.gethostname()))
        else:
            self.log = wal.Writer(path, self.run_id, policy=c.wal_fsync, interval=c.wal_fsync_interval)
            self.log.append(wal.RunStart(
                wal_version=wal.WAL_VERSION, schema_hash=self.schema, collection=c.collection,
                db=cfg.db_identity(c), incarnation=incarnation, sync_mode=c.sync_mode, config=cfg.snapshot(c),
                pid=os.getpid(), host=socket.gethostname()))

    def _retire_wal(self, replay: wal.Replay, decision_reason: str) -> None:
        """A finished WAL is stale: remove it. An unfinished one we will not resume: set it aside."""
        if decision_reason == "wal_finished_ok":
            osfs.unlink(replay.path)
            return
        run_id = replay.start.run_id if replay.start else "unknown"
        aside = f"{replay.path}.abandoned-{run_id}"
        osfs.replace(replay.path, aside)
        self.warn("wal_abandoned", path=aside, run_id=run_id, reason=decision_reason)

    def _commit_group(self) -> None:
        self.log.commit_group()
        if self.stop.requested:
            if self.c.wal:
                raise Interrupted("interrupted: the in-flight batch was committed and logged; rerun to resume")
            then = ("the next build audits the rows it wrote" if self.recorded_before else
                    f"no manifest records this collection yet, so the next build treats the rows it wrote as "
                    f"--on-missing-state {self.c.on_missing_state} says")
            raise Interrupted(f"interrupted: the in-flight batch was committed, but with --wal off nothing records "
                              f"this run, so nothing can resume it; {then}")

    def _finish(self, ok: bool, reason: str) -> None:
        s = self.summary
        self.log.append(wal.RunFinish(
            ok=ok, reason=reason, expected_chunks=s.expected_chunks, collection_count=s.collection_count,
            delta=s.collection_count - s.expected_chunks, docs_processed=self.counters.docs_processed,
            docs_resumed_skipped=s.docs_resumed_skipped, committed_batches=self.totals["batch_no"],
            chunks_upserted_total=self.totals["upserted"], warn_count=self.warn.count,
            warn_functional_count=self.warn.functional, warn_keys=dict(self.warn.keys)))

    def _finish_quietly(self, reason: str) -> None:
        try:
            self._finish(False, reason)
        except ChromaResumeError:
            pass  # the disk or WAL may be what failed; the original error is the one to report

    def _clear_wal(self) -> None:
        if isinstance(self.log, wal.NullWriter):
            return
        self.log.close()
        path = self.p["wal"]
        if self.c.keep_wal:
            osfs.replace(path, f"{path}.{self.run_id}.done")
        else:
            osfs.unlink(path)

    # ---- resume: trust but verify ----------------------------------------------------
    def _check_resumed(self, resumed: list[DocAction]) -> list[DocAction]:
        """Skip documents the WAL says are committed, after one batched check that Chroma holds every
        row of that generation as this build would write it (metadata, and a text hash that matches
        the stored text): ids alone would pass rows a later, cut-short rewrite left half changed."""
        wanted = [i for a in resumed for i in state.generation_ids(a.doc_id, a.content_sha256, a.n_chunks)]
        rows = self.db.held(wanted, include=("metadatas", "documents")) if wanted else {}
        again: list[DocAction] = []
        skipped: list[DocAction] = []
        for a in resumed:
            entry = self._entry(a, a.n_chunks)
            ids = state.generation_ids(a.doc_id, a.content_sha256, a.n_chunks)
            wrong = [i for n, i in enumerate(ids) if i not in rows or not (failpoints.enabled("bug.resume_ids_only")
                     or state.row_is_chunk(rows[i]["metadatas"], rows[i]["documents"], a.uri, entry, n))]
            if wrong:
                self.warn("wal_ahead_of_db", uri=a.uri, chunks_missing_or_different=len(wrong))
                again.append(msgspec.structs.replace(a, action="embed"))
            else:
                skipped.append(a)
        delete_generations(self.db, self.log, [g for a in skipped for g in a.old_generations], "old",
                           self.c.delete_batch, self.counters)
        for a in skipped:
            self.summary.docs_resumed_skipped += 1
            self.committed[a.uri] = self._entry(a, a.n_chunks)
            self.log.append(wal.DocDone(uri=a.uri, doc_id=a.doc_id, content_sha256=a.content_sha256))
        return again

    # ---- embedding -------------------------------------------------------------------
    def _embed(self, actions: list[DocAction]) -> None:
        if not actions:
            return
        by_uri = {a.uri: a for a in actions}
        progress = Progress(len(actions), mode=self.c.progress, stream=self.warn.stream)
        pipe = Pipeline(self.c, self.db, self.log, self.source, self.warn, self.counters, self._doc_committed,
                        progress, self.totals)
        try:
            for doc in corpus.scan(self.c, _already_warned, only=set(by_uri)):
                pipe.add(_current(by_uri.pop(doc.uri), doc), doc)
                if self.stop.requested:
                    break
            pipe.finish()
        finally:
            pipe.close()
        self._commit_group()
        progress.close()
        for a in by_uri.values():  # planned but unreadable now: skipped is not deleted
            self.warn("vanished_during_build", path=a.uri)
            self.refs.pop(a.uri, None)
            self._keep_unreadable(a)
        self._commit_group()

    def _keep_unreadable(self, a: DocAction) -> None:
        """A document the scan listed but cannot read keeps a complete generation of what Chroma holds
        for its doc_id (asked of Chroma, so it holds even when the WAL that knew was set aside), the
        plan's preferred one first, with that generation's stored metadata; its other generations are
        deleted. Nothing complete: WARN, touch nothing, leave it out of the manifest until readable."""
        metas: dict[str, list[dict]] = {}
        for row in self.db.find({"doc_id": a.doc_id}).values():
            metas.setdefault(row["metadatas"]["content_sha256"], []).append(row["metadatas"])
        complete = [sha for sha, rows in metas.items() if len(rows) == rows[0]["n_chunks"]]
        order = [a.content_sha256, *(g.content_sha256 for g in a.old_generations)]
        chosen = next((sha for sha in order if sha in complete), complete[0] if complete else None)
        if chosen is None:
            if not metas and a.entry is not None and a.entry.n_chunks == 0:
                self.committed[a.uri] = a.entry  # an empty document: nothing to find, nothing lost
            else:
                self.warn("unreadable_document_incomplete", path=a.uri, chunks=sum(map(len, metas.values())))
            return
        self.committed[a.uri] = state.entry_from_metadata(metas[chosen][0], a.entry.updated_at if a.entry else "")
        if self.c.sync_mode != "none":
            others = [Generation(a.uri, a.doc_id, sha, rows[0]["n_chunks"]) for sha, rows in metas.items()
                      if sha != chosen]
            delete_generations(self.db, self.log, others, "old", self.c.delete_batch, self.counters)

    def _doc_committed(self, opened: OpenDoc) -> None:
        doc = opened.doc
        self.refs[doc.uri] = msgspec.structs.replace(doc, text="")
        self.committed[doc.uri] = self._entry(opened.action, opened.n_chunks)

    # ---- final reconcile -------------------------------------------------------------
    def _reconcile(self, plan: Plan) -> None:
        """Compare id sets (never counts: equal counts prove nothing) and each expected row's metadata
        (the same ids rewritten with other metadata, another source_uri or source_type are not the
        rows this build would write; only their text hash is left to the resume and audit checks,
        which read the text). A repair here is a functional WARN: a correct run never needs it."""
        failpoints.fire("build.reconcile")
        expected = self._expected_rows()
        if failpoints.enabled("bug.count_only_reconcile") and self.db.count() == len(expected):
            return
        stored = {row["id"]: row["metadata"] for row in self.db.scan(include=("metadatas",))}
        orphans = sorted(stored.keys() - expected.keys())
        if orphans and self.c.sync_mode != "none":
            self.db.delete(orphans, self.c.delete_batch)
            self.counters.chunks_deleted += len(orphans)
            self.warn("orphans_deleted", count=len(orphans), first=orphans[0])
        missing_docs = {i.rsplit(":", 2)[0] for i in expected.keys() - stored.keys()}
        differing = {uri for i, (uri, meta) in expected.items()
                     if i in stored and not state.same_metadata(_without_text_hash(stored[i]), meta)}
        redo = [msgspec.structs.replace(a, action="embed", old_generations=[])
                for a in plan.docs if (a.doc_id in missing_docs or a.uri in differing) and a.uri in self.refs]
        if differing:
            self.warn("rows_differ_after_build", docs=len(differing), first=sorted(differing)[0])
        lost = [a.uri for a in redo if a.doc_id in missing_docs]
        if lost:
            self.warn("missing_after_build", docs=len(lost), first=lost[0])
        self._embed(redo)

    def _expected_rows(self) -> dict[str, tuple[str, dict]]:
        """chunk id -> (uri, the metadata a build writes on it, less its text hash)."""
        return {state.chunk_id(e.doc_id, e.content_sha256, n): (uri, _without_text_hash(state.chunk_metadata(
                    uri, e.doc_id, e.content_sha256, e.source_type, e.metadata, n, e.n_chunks, "")))
                for uri, e in self.committed.items() for n in range(e.n_chunks)}

    def _expected_ids(self) -> set[str]:
        return {i for e in self.committed.values() for i in state.generation_ids(e.doc_id, e.content_sha256, e.n_chunks)}

    # ---- outputs ---------------------------------------------------------------------
    def _write_manifest(self, manifest: state.Manifest | None, leftovers: list[Generation]) -> None:
        """Not with --write-state false: the collection's mark then stays, and the next build audits
        what this one wrote."""
        if not self.c.write_state:
            return
        dim = self.source.dim or (manifest.dim if manifest else None)
        if dim is None and self.summary.expected_chunks:
            dim = self.db.dimension()
        state.write_manifest(self.p["manifest"], state.Manifest(
            schema_hash=self.schema, collection=self.c.collection, db=cfg.db_identity(self.c), dim=dim,
            incarnation=self.db.fingerprint()["incarnation"], config=cfg.snapshot(self.c),
            documents=dict(sorted(self.committed.items())), leftovers=leftovers,
            last_build={**msgspec.to_builtins(self.summary), "run_id": self.run_id,
                        "finished_at": state.now_iso(), "warn_count": self.warn.count}))

    def _stage_line(self, decision: ResumeDecision, replay: wal.Replay | None) -> None:
        r = replay if decision.active else None
        print(f"[STAGE] resume_active={str(decision.active).lower()} reason={decision.reason} "
              f"wal_version={wal.WAL_VERSION} run_id={r.start.run_id if r else 'new'} "
              f"done_docs={r.docs_committed if r else 0} committed_batches={r.committed_batches if r else 0} "
              f"chunks_upserted_total_last={r.chunks_upserted_total if r else 0} "
              f"truncated_tail_ignored={str(bool(replay and replay.truncated_tail)).lower()} "
              f"wal_fsync={self.c.wal_fsync}", file=self.out, flush=True)


def _current(action: DocAction, doc: corpus.Document) -> DocAction:
    """The document may have been edited since planning: embed what we read now; the planned
    generation, if a crashed run left chunks of it, is an old one now."""
    if doc.content_sha256 == action.content_sha256:
        return action
    planned = [Generation(action.uri, action.doc_id, action.content_sha256, action.n_chunks)] if action.n_chunks else []
    olds = [g for g in action.old_generations + planned if g.content_sha256 != doc.content_sha256]
    return msgspec.structs.replace(action, content_sha256=doc.content_sha256, old_generations=olds, reuse=[])


def _without_text_hash(meta: dict | None) -> dict:
    return {k: v for k, v in (meta or {}).items() if k != "text_sha256"}


def _already_warned(*args, **fields) -> None:
    """The second read of the corpus: its skips were reported by the first."""


def stop_signals() -> list[int]:
    """Ctrl+C (SIGINT), a polite kill (SIGTERM), and on Windows Ctrl+Break or a closed console (SIGBREAK)."""
    return [signal.SIGINT, signal.SIGTERM, *([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])]


class _StopOnSignal:
    """First SIGINT/SIGTERM/SIGBREAK: finish and log the in-flight batch, then stop. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in stop_signals():
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
