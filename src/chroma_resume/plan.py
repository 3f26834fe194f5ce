"""What a build must do, from the manifest, the corpus and the WAL. Pure: no I/O.

The recovery rules of DESIGN §4 in one place. Every generation of a document that
may hold chunks in Chroma (the manifest's, and each one the WAL saw begun, committed
or about to be deleted) is either the document's current generation or an old one,
deleted once the current one is in Chroma. The WAL's facts beat the manifest: a
generation it records as deleted, or as about to be deleted, is not trusted to be
there, so an edit undone or a file restored after a crash is put back.
"""
from __future__ import annotations

from typing import Literal

import msgspec

from . import failpoints
from .corpus import Document, Listing
from .state import DocEntry, Generation, meta_sha256
from .wal import Replay, generation_key


class DocAction(msgspec.Struct, kw_only=True):
    uri: str
    doc_id: str
    content_sha256: str
    meta_sha256: str = ""
    action: Literal["embed", "resumed", "unchanged"]
    kind: Literal["added", "changed", "refresh", "meta", "restore", "unchanged", "kept"]
    old_content_sha256: str | None = None  # the manifest's generation, for DOC_BEGIN
    n_chunks: int = 0  # resumed/unchanged: its chunks; embed: chunks the planned generation may already hold
    old_generations: list[Generation] = []
    reuse: list[Generation] = []  # same text under another doc_id: its vectors can be re-keyed
    entry: DocEntry | None = None  # for a document the scan could not read: what it keeps


class Plan(msgspec.Struct, kw_only=True):
    docs: list[DocAction]
    stale: list[Generation]  # generations of removed documents, and leftovers of --sync-mode none
    leftovers: list[Generation] = []  # --sync-mode none: what a deleting mode would delete, kept for later
    added: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    kept: int = 0  # unreadable now: kept as they were

    @property
    def to_embed(self) -> list[DocAction]:
        return [d for d in self.docs if d.action == "embed"]

    @property
    def resumed(self) -> list[DocAction]:
        return [d for d in self.docs if d.action == "resumed"]


class _Known(msgspec.Struct):
    """One generation of a uri and how sure we are that all its chunks are in Chroma."""
    gen: Generation
    state: Literal["manifest", "committed", "partial"]
    meta_sha256: str = ""


def make_plan(corpus: list[Document], manifest: dict[str, DocEntry], replay: Replay | None,
              sync_mode: str, listing: Listing | None = None, *, trust_commits: bool = True,
              leftovers: list[Generation] = ()) -> Plan:
    """`replay`: the WAL's facts about this collection. `trust_commits` False (--resume off) still
    believes its deletions and doubts, but re-checks what it says is committed."""
    deletes = sync_mode != "none"
    listing = listing or Listing()
    docs: list[DocAction] = []
    counts = {"added": 0, "changed": 0, "unchanged": 0, "kept": 0}
    current_keys = {generation_key(d.doc_id, d.content_sha256) for d in corpus}
    touched = _touched_by_uri(replay)
    for doc in corpus:
        known = manifest.get(doc.uri)
        kind = "added" if known is None else ("unchanged" if _same(known, doc) else "changed")
        counts[kind] += 1
        live = _known(doc.uri, known, replay, trust_commits)
        own = generation_key(doc.doc_id, doc.content_sha256)
        for key in current_keys & set(live) - {own}:
            del live[key]  # another document's current generation now (a doc_id moved to another uri)
        if own in live and touched.get(own, set()) - {doc.uri}:
            live[own].state = "partial"  # written under another uri too: its rows may name that uri
        docs.append(_document(doc, known, live, sync_mode))
    seen = {d.uri for d in corpus}
    stale: list[Generation] = []
    gone = sorted((set(manifest) | set(replay.generations if replay else ())) - seen)
    for uri in gone:
        live = _known(uri, manifest.get(uri), replay, trust_commits)
        if listing.unread(uri):
            kept = _kept(uri, manifest.get(uri), live)
            if kept is not None:
                docs.append(kept)
                counts["kept"] += 1
            continue
        # A generation that is now another uri's current one (a units file moved a doc_id) stays.
        stale.extend(k.gen for k in live.values() if generation_key(k.gen.doc_id, k.gen.content_sha256)
                     not in current_keys)
    deleted = sum(1 for uri in gone if uri in manifest and not listing.unread(uri))
    old = [g for g in leftovers if generation_key(g.doc_id, g.content_sha256) not in current_keys]
    if deletes:
        return Plan(docs=docs, stale=stale + old, deleted=deleted, **counts)
    kept = old + stale + [g for d in docs for g in d.old_generations]
    for d in docs:
        d.old_generations = []
    return Plan(docs=docs, stale=[], leftovers=list(dict.fromkeys(kept)), deleted=deleted, **counts)


def _touched_by_uri(replay: Replay | None) -> dict[str, set[str]]:
    """generation key -> the uris under which the WAL saw it written or deleted. A units file can
    move a doc_id and its text to another uri and back: the rows then carry whichever uri wrote
    them last (or are gone), so a generation touched under another uri is checked row by row."""
    touched: dict[str, set[str]] = {}
    for uri, gens in (replay.generations.items() if replay else ()):
        for key in gens:
            touched.setdefault(key, set()).add(uri)
    return touched


def _same(known: DocEntry, doc: Document) -> bool:
    return known.content_sha256 == doc.content_sha256 and known.doc_id == doc.doc_id


def _document(doc: Document, known: DocEntry | None, live: dict[str, _Known], sync_mode: str) -> DocAction:
    key = generation_key(doc.doc_id, doc.content_sha256)
    meta = meta_sha256(doc.metadata, doc.source_type)
    current = live.get(key)
    olds = [k.gen for other, k in live.items() if other != key]
    base = dict(uri=doc.uri, doc_id=doc.doc_id, content_sha256=doc.content_sha256, meta_sha256=meta,
                old_content_sha256=known.content_sha256 if known and known.content_sha256 != doc.content_sha256 else None,
                old_generations=olds)
    in_place = current is not None and current.state != "partial" and current.meta_sha256 == meta
    if in_place and current.state == "committed":
        return DocAction(**base, action="resumed", kind="changed" if known is None or not _same(known, doc) else "unchanged",
                         n_chunks=current.gen.n_chunks)
    if in_place and sync_mode != "rewrite-all":
        return DocAction(**base, action="unchanged", kind="unchanged", n_chunks=current.gen.n_chunks)
    if known is None:
        kind = "added"
    elif not _same(known, doc):
        kind = "changed"
    elif current is None or current.state == "partial":
        kind = "restore"  # the WAL says its chunks were (maybe) deleted: put them back
    elif current.meta_sha256 != meta:
        kind = "meta"
    else:
        kind = "refresh"
    reuse = [k.gen for other, k in live.items()
             if other != key and k.gen.content_sha256 == doc.content_sha256 and k.state != "partial"]
    return DocAction(**base, action="embed", kind=kind, reuse=reuse, n_chunks=current.gen.n_chunks if current else 0)


def _kept(uri: str, known: DocEntry | None, live: dict[str, _Known]) -> DocAction | None:
    """Skipped is not deleted: an unreadable document keeps a complete generation. Which one is
    the build's to find out from Chroma; the plan only says which it prefers (the WAL's
    committed one is newer than the manifest's) and which others there may be."""
    if not live:
        return None
    ranked = sorted(live.values(), key=lambda k: ("committed", "manifest", "partial").index(k.state))
    g = ranked[0].gen
    entry = known if known is not None and known.content_sha256 == g.content_sha256 and known.doc_id == g.doc_id \
        else None
    return DocAction(uri=uri, doc_id=g.doc_id, content_sha256=g.content_sha256, meta_sha256=ranked[0].meta_sha256,
                     action="unchanged", kind="kept", n_chunks=g.n_chunks,
                     old_generations=[k.gen for k in ranked[1:]], entry=entry)


def _known(uri: str, known: DocEntry | None, replay: Replay | None, trust_commits: bool) -> dict[str, _Known]:
    """Generations of `uri` that may still hold chunks in Chroma, by generation key."""
    found: dict[str, _Known] = {}
    if known is not None:
        gen = Generation(uri, known.doc_id, known.content_sha256, known.n_chunks)
        key = generation_key(known.doc_id, known.content_sha256)
        # The WAL (newer than the manifest) logged these ids under another uri, a doc_id carried over:
        # they may hold that uri's metadata now, or be gone. The manifest's claim is no evidence then.
        moved = replay is not None and any(other != uri for other in replay.uris_of.get(key, ()))
        found[key] = _Known(gen, "partial" if moved else "manifest", meta_sha256(known.metadata, known.source_type))
    wal_gens = replay.generations.get(uri, {}) if replay else {}
    for key, g in wal_gens.items():
        if g.deleted and failpoints.enabled("bug.ignore_wal_deletions"):
            continue
        if g.deleted:
            found.pop(key, None)
            continue
        gen = Generation(uri, g.doc_id, g.content_sha256, max(g.n_chunks, found[key].gen.n_chunks if key in found else 0))
        if g.committed and trust_commits:
            found[key] = _Known(gen, "committed", g.meta_sha256)
        else:
            found[key] = _Known(gen, "partial")
    return found


class ResumeDecision(msgspec.Struct, frozen=True):
    active: bool
    reason: str


def resume_decision(replay: Replay | None, *, mode: str, schema_hash: str, collection: str, db: str,
                    manifest_run_id: str | None, incarnation: str | None = None,
                    wal_enabled: bool = True) -> ResumeDecision:
    """Whether a build would continue the WAL's run, and why (shared by build, status and verify).

    A WAL that finished ok is stale only once the manifest of that run is written: a
    crash between RUN_FINISH and the manifest's replace must not forget the run.
    `incarnation` is the collection's, when known: a WAL of a collection since recreated
    describes chunks that are gone."""
    if replay is None or replay.start is None:
        return ResumeDecision(False, "no_wal")
    if replay.finished_ok and manifest_run_id == replay.start.run_id:
        return ResumeDecision(False, "wal_finished_ok")
    start = replay.start
    # The collection's incarnation says which collection the WAL describes, wherever its folder now is
    # (the manifest is matched the same way); the db path decides only for a WAL that names none.
    by_incarnation = incarnation is not None and bool(start.incarnation)
    for field, ours, theirs in (("schema_hash", schema_hash, start.schema_hash),
                                ("collection", collection, start.collection),
                                ("db", start.db if by_incarnation else db, start.db)):
        if ours != theirs:
            return ResumeDecision(False, f"{field}_mismatch(wal={theirs},now={ours})")
    if incarnation is not None and start.incarnation != incarnation:
        return ResumeDecision(False, f"collection_recreated(wal={start.incarnation or '?'},now={incarnation})")
    # From here the WAL describes this very collection: its facts hold even when its work is redone.
    if mode == "off":
        return ResumeDecision(False, FACTS_ONLY[0])
    if not wal_enabled:
        return ResumeDecision(False, FACTS_ONLY[1])
    return ResumeDecision(True, "wal_resumable")


FACTS_ONLY = ("resume_off", "wal_off")  # decisions that still read the WAL's facts, trusting no commit
