"""What a build must do, from the manifest, the corpus and the WAL. Pure: no I/O.

The recovery rules of DESIGN §4 in one place. Every generation of a document
that may be in Chroma (the manifest's, and each one the WAL saw begun or
committed) is either the current one or an old one to delete once the current
one is committed, unless the WAL already recorded its deletion.
"""
from __future__ import annotations

from typing import Literal

import msgspec

from .corpus import Document
from .state import DocEntry
from .wal import Replay


class Generation(msgspec.Struct, frozen=True):
    uri: str
    doc_id: str
    content_sha256: str
    n_chunks: int


class DocAction(msgspec.Struct, kw_only=True):
    uri: str
    doc_id: str
    content_sha256: str
    action: Literal["embed", "resumed", "unchanged"]
    kind: Literal["added", "changed", "refresh", "unchanged"]
    old_content_sha256: str | None = None  # the manifest's generation, for DOC_BEGIN
    n_chunks: int = 0  # known for resumed/unchanged documents
    old_generations: list[Generation] = []


class Plan(msgspec.Struct, kw_only=True):
    docs: list[DocAction]
    stale: list[Generation]  # generations of removed documents
    added: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0

    @property
    def to_embed(self) -> list[DocAction]:
        return [d for d in self.docs if d.action == "embed"]

    @property
    def resumed(self) -> list[DocAction]:
        return [d for d in self.docs if d.action == "resumed"]

    @property
    def nothing_to_do(self) -> bool:
        return not self.stale and all(d.action == "unchanged" and not d.old_generations for d in self.docs)


def make_plan(corpus: list[Document], manifest: dict[str, DocEntry], replay: Replay | None,
              sync_mode: str) -> Plan:
    deletes = sync_mode != "none"
    docs: list[DocAction] = []
    counts = {"added": 0, "changed": 0, "unchanged": 0}
    seen: set[str] = set()
    for doc in corpus:
        seen.add(doc.uri)
        known = manifest.get(doc.uri)
        kind = "added" if known is None else ("unchanged" if known.content_sha256 == doc.content_sha256 else "changed")
        counts[kind] += 1
        olds = [g for g in _live_generations(doc.uri, known, replay) if g.content_sha256 != doc.content_sha256]
        wal_gen = replay.generations.get(doc.uri, {}).get(doc.content_sha256) if replay else None
        if wal_gen is not None and wal_gen.committed:
            action, n_chunks = "resumed", wal_gen.n_chunks
        elif kind == "unchanged" and sync_mode != "delete-stale":
            action, n_chunks = "unchanged", known.n_chunks
        else:
            action, n_chunks = "embed", 0
            kind = "refresh" if kind == "unchanged" else kind
        docs.append(DocAction(
            uri=doc.uri, doc_id=doc.doc_id, content_sha256=doc.content_sha256, action=action, kind=kind,
            old_content_sha256=known.content_sha256 if known and kind == "changed" else None,
            n_chunks=n_chunks, old_generations=olds if deletes else []))
    stale: list[Generation] = []
    removed = sorted((set(manifest) | set(replay.generations if replay else ())) - seen)
    for uri in removed:
        stale.extend(_live_generations(uri, manifest.get(uri), replay))
    deleted = sum(1 for uri in removed if uri in manifest)
    return Plan(docs=docs, stale=stale if deletes else [], deleted=deleted, **counts)


def _live_generations(uri: str, known: DocEntry | None, replay: Replay | None) -> list[Generation]:
    """Generations of `uri` that may still hold chunks in Chroma."""
    wal_gens = replay.generations.get(uri, {}) if replay else {}
    found: dict[str, Generation] = {}
    if known is not None:
        found[known.content_sha256] = Generation(uri, known.doc_id, known.content_sha256, known.n_chunks)
    for sha, g in wal_gens.items():
        found.setdefault(sha, Generation(uri, g.doc_id, sha, g.n_chunks))
    return [g for sha, g in found.items() if not (sha in wal_gens and wal_gens[sha].deleted)]


class ResumeDecision(msgspec.Struct, frozen=True):
    active: bool
    reason: str


def resume_decision(replay: Replay | None, *, mode: str, schema_hash: str, collection: str, db: str,
                    manifest_run_id: str | None) -> ResumeDecision:
    """Whether a build would continue the WAL's run, and why (shared by build and status).

    A WAL that finished ok is stale only once the manifest of that run is written: a
    crash between RUN_FINISH and the manifest's replace must not forget the run."""
    if replay is None or replay.start is None:
        return ResumeDecision(False, "no_wal")
    if replay.finished_ok and manifest_run_id == replay.start.run_id:
        return ResumeDecision(False, "wal_finished_ok")
    if mode == "off":
        return ResumeDecision(False, "resume_off")
    start = replay.start
    for field, ours, theirs in (("schema_hash", schema_hash, start.schema_hash),
                                ("collection", collection, start.collection), ("db", db, start.db)):
        if ours != theirs:
            return ResumeDecision(False, f"{field}_mismatch(wal={theirs},now={ours})")
    return ResumeDecision(True, "wal_resumable")
