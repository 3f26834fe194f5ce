"""`build --dry-run`: what a build would add, change, delete and resume, by document, before it runs.

The build's own plan (plan.make_plan) from the corpus, the manifest and the WAL, read as resume-status
reads them: no model is loaded, no lock taken, no file created or changed. What only the build can find,
it finds when it runs: a collection that no longer matches its manifest (reset, recreated, damaged) is
audited then, and its missing chunks restored; the dry run says when the stored fingerprint disagrees.
"""
from __future__ import annotations

import sqlite3

import msgspec

from . import config as cfg
from . import corpus, state, store, wal
from .build import _refuse_wiping, refuse_schema_change, refuse_unresumable, vouched
from .config import Config
from .plan import FACTS_ONLY, make_plan
from .reporting import Warnings
from .schema import schema_hash


class DryRun(msgspec.Struct, kw_only=True):
    collection: str
    db: str
    added: list[str]
    changed: list[str]
    deleted: list[str]
    resumed: list[str]
    restored: list[str]  # the WAL says their chunks may have been deleted: put back
    rewritten: list[str]  # unchanged, written again (--sync-mode rewrite-all)
    unchanged: int
    kept_unreadable: list[str]
    resume_reason: str  # plan.ResumeDecision.reason: why the WAL's run is (not) resumed
    store_note: str  # "" or why the build will audit the collection first

    def lines(self) -> list[str]:
        """One line in words, then one line per document: `add doc.md`, `change …`, `delete …`, `resume …`."""
        more = "".join(f", {verb} {len(uris)}" for verb, uris in (("restore", self.restored),
                                                                   ("rewrite", self.rewritten)) if uris)
        head = (f"[DRY-RUN] collection {self.collection!r} in {self.db}: a build would add {len(self.added)}, "
                f"change {len(self.changed)}, delete {len(self.deleted)}, resume {len(self.resumed)}{more} and leave "
                f"{self.unchanged} unchanged document(s) (resume: {self.resume_reason}); no model loaded, "
                f"nothing written")
        rows = [f"{verb:<8}{uri}" for verb, uris in (("add", self.added), ("change", self.changed),
                                                      ("delete", self.deleted), ("resume", self.resumed),
                                                      ("restore", self.restored), ("rewrite", self.rewritten),
                                                      ("keep", self.kept_unreadable)) for uri in uris]
        return [head, *rows, *([f"[DRY-RUN] {self.store_note}"] if self.store_note else [])]


def dry_run(c: Config, warn: Warnings | None = None) -> DryRun:
    from .status import next_run
    warn = warn or Warnings()
    p = state.paths(c)
    listing = corpus.Listing()
    docs = [msgspec.structs.replace(d, text="") for d in corpus.scan(c, warn, listing=listing)]
    # The build's own refusals, by the build's own functions: a preview of a run that will not happen,
    # or of deletions the build refuses, must end as that build does (its exit code and message).
    if not docs and not (listing.files or listing.dirs) and not c.allow_empty:
        _refuse_wiping(c, p)
    fingerprint = _stored_fingerprint(c)
    if fingerprint and store.catalogue_rows(c) and \
            (fingerprint["schema_hash"], fingerprint["space"]) != (schema_hash(c), c.hnsw_space):
        refuse_schema_change(c, fingerprint, schema_hash(c))
    manifest = state.load_manifest(p["manifest"]) if state.read_latest(p["collection_dir"]) == schema_hash(c) \
        else None  # another configuration's index: a build starts this one afresh
    replay = wal.read(p["wal"])
    decision = next_run(c, replay, manifest)
    refuse_unresumable(c, p, decision)
    wal_run = replay.start.run_id if replay and replay.start and (decision.active or decision.reason in FACTS_ONLY) \
        else None
    facts = replay if decision.active or decision.reason in FACTS_ONLY else None
    plan = make_plan(docs, manifest.documents if manifest else {}, facts, c.sync_mode, listing,
                     trust_commits=decision.active, leftovers=manifest.leftovers if manifest else [])
    by_kind: dict[str, list[str]] = {}
    for d in plan.docs:
        by_kind.setdefault("resumed" if d.action == "resumed" else d.kind, []).append(d.uri)
    present = {d.uri for d in docs}
    deleted = sorted(uri for uri in (manifest.documents if manifest else {}) if uri not in present
                     and not listing.unread(uri)) if c.sync_mode != "none" else []
    return DryRun(collection=c.collection, db=cfg.db_identity(c), added=sorted(by_kind.get("added", [])),
                  changed=sorted({*by_kind.get("changed", []), *by_kind.get("meta", [])}),
                  deleted=deleted, resumed=sorted(by_kind.get("resumed", [])),
                  restored=sorted(by_kind.get("restore", [])), rewritten=sorted(by_kind.get("refresh", [])),
                  unchanged=len(by_kind.get("unchanged", [])), kept_unreadable=sorted(by_kind.get("kept", [])),
                  resume_reason=decision.reason, store_note=_store_note(c, manifest, wal_run))


def _stored_fingerprint(c: Config) -> dict | None:
    """The collection's fingerprint from an embedded store's catalogue; None for a server, a missing
    store or collection, or a catalogue that cannot be read (the build's store check then decides)."""
    if c.chroma_host or store.embedded_store_missing(c):
        return None
    try:
        return store.catalogue_fingerprint(c)
    except sqlite3.Error:
        return None


def _store_note(c: Config, manifest: state.Manifest | None, wal_run: str | None) -> str:
    """Why the build will audit the collection before it plans (it then restores what is missing):
    the build's own trust decision (build.vouched) over the catalogue's fingerprint."""
    if manifest is None or c.chroma_host:
        return ""
    if store.embedded_store_missing(c):
        return "the Chroma folder is missing: the build creates it and writes every document"
    try:
        found = store.catalogue_fingerprint(c)
    except sqlite3.Error:  # an unreadable catalogue: the build's store check says what it is
        return "Chroma's catalogue could not be read: the build checks the store first"
    if not found or found.get("incarnation") != manifest.incarnation:
        return f"collection {c.collection!r} is not the one the manifest describes: the build audits it first"
    if not vouched(found, manifest, wal_run):
        return (f"no record covers the collection's last writes (written by run {found['writing'] or 'none'}, "
                f"recorded by {found['recorded'] or 'none'}, manifest of run "
                f"{manifest.last_build.get('run_id') or 'none'}, a restored backup or state folder): the build "
                f"audits it first and rewrites what it holds in another version")
    return ""
