"""Read-only report: what the state, the manifest and the WAL say, and what a build would do.

Loads no model, imports no chromadb, takes no lock, creates and changes no file. `up_to_date`
(doit's check) also reads the collection's fingerprint: from Chroma's catalogue file for an
embedded store, through the client (so chromadb) for a server.
"""
from __future__ import annotations

import os
import sqlite3

from . import config as cfg
from . import state, store, wal
from .commands import command_line
from .config import Config
from .errors import ChromaResumeError
from .plan import resume_decision
from .schema import schema_hash


def status(c: Config) -> dict:
    p = state.paths(c)
    schema = schema_hash(c)
    report: dict = {
        "db_path": cfg.db_identity(c), "collection": c.collection, "schema_hash": schema,
        "latest_schema_hash": state.read_latest(p["collection_dir"]) or "",
        "state_file": p["manifest"], "state_present": os.path.exists(p["manifest"]),
        "wal_path": p["wal"], "wal_present": os.path.exists(p["wal"]),
    }
    manifest = None
    try:
        manifest = state.load_manifest(p["manifest"])
    except ChromaResumeError as exc:
        report["state_error"] = str(exc)
    report["state_docs"] = len(manifest.documents) if manifest else 0
    report["state_expected_chunks"] = manifest.expected_chunks if manifest else 0
    try:
        replay = wal.read(p["wal"])
    except ChromaResumeError as exc:
        replay = None
        report["wal_error"] = str(exc)
    start = replay.start if replay else None
    report.update({  # None (printed "none", JSON null) where there is no WAL to say it: not "", not false
        "wal_run_id": start.run_id if start else None,
        "wal_version": start.wal_version if start else None,
        "wal_finished_ok": replay.finished_ok if replay else None,
        "wal_last_event": replay.last_event if replay else None,
        "wal_truncated_tail_ignored": bool(replay and replay.truncated_tail),
        "wal_docs_committed": replay.docs_committed if replay else 0,
        "wal_committed_batches": replay.committed_batches if replay else 0,
        "wal_upsert_rows_committed_total": replay.chunks_upserted_total if replay else 0,
        "resume_mode": c.resume,
    })
    if "wal_error" in report:
        report["resume_active"], report["resume_reason"] = False, "wal_corrupt(build exits 4)"
    else:
        decision = next_run(c, replay, manifest)
        report["resume_active"], report["resume_reason"] = decision.active, decision.reason
    damaged = store.damaged_files(c)
    report["store_files_ok"] = not damaged
    if damaged:  # what a power cut leaves: Chroma's segment files emptied (a small index may rebuild them itself)
        report["store_damaged_files"] = damaged[:3]
        report["store_fix"] = (f"{command_line(c, 'verify')} tells whether Chroma can still read them; "
                               f"{command_line(c, 'repair')} sets an unreadable folder aside and rebuilds it from "
                               f"the cache")
    stale = store.stale_index(c)  # a cut can revert Chroma's index files while every file still reads
    report["store_index_ok"] = not stale
    if stale:
        report["store_index_problem"] = stale
        report["store_fix"] = f"{command_line(c, 'repair')}: sets the folder aside and rebuilds it from the cache"
    report["samples"] = _samples(replay, manifest)
    return report


def summary(report: dict) -> list[str]:
    """What a person needs at a glance, before the key=value lines machines read."""
    index = (f"index {report['collection']!r} in {report['db_path']}: " + (
        f"manifest for {report['state_docs']} document(s), {report['state_expected_chunks']} chunk(s)"
        if report["state_present"] else "no manifest (never built with this configuration, or its build never "
                                        "finished)"))
    if "state_error" in report:
        index = f"index {report['collection']!r}: manifest unreadable ({report['state_error']})"
    if "wal_error" in report:
        run = f"WAL corrupt: a build would refuse (exit 4): {report['wal_error']}"
    elif not report["wal_present"]:
        run = "no unfinished run: the next build starts a new one"
    else:
        verdict = "resume it" if report["resume_active"] else "not resume it"
        run = (f"run {report['wal_run_id']} {'finished' if report['wal_finished_ok'] else 'unfinished'}, "
               f"{report['wal_docs_committed']} document(s) committed: a build would {verdict} "
               f"({report['resume_reason']})")
    lines = [f"[STATUS] {index}", f"[STATUS] {run}"]
    if not report["store_files_ok"]:
        lines.append(f"[STATUS] Chroma folder damaged: {report['store_fix']}")
    return lines


def next_run(c: Config, replay: wal.Replay | None, manifest: state.Manifest | None):
    """Whether the next build would resume the WAL's run, and why (plan.ResumeDecision), read without a lock."""
    return resume_decision(replay, mode=c.resume, schema_hash=schema_hash(c), collection=c.collection,
                           db=cfg.db_identity(c), incarnation=_incarnation(c),
                           manifest_run_id=manifest.last_build.get("run_id") if manifest else None,
                           wal_enabled=c.wal)


def _incarnation(c: Config) -> str | None:
    """The collection's incarnation, read from an embedded store's catalogue without chromadb, as a
    build matches its WAL by it (a moved --db keeps its WAL); None when only a client could tell."""
    if c.chroma_host:
        return None
    if store.embedded_store_missing(c):
        return "none(the --db folder is missing)"
    try:
        found = store.catalogue_fingerprint(c)
    except sqlite3.Error:
        return None
    return found["incarnation"] if found and found["incarnation"] else "none(no such collection)"


def _samples(replay: wal.Replay | None, manifest: state.Manifest | None) -> list[dict]:
    """Up to three documents: the WAL's committed ones first, else the manifest's."""
    out: list[dict] = []
    if replay:
        for uri, gens in replay.generations.items():
            for g in gens.values():
                if g.committed and len(out) < 3:
                    out.append({"uri": uri, "doc_id": g.doc_id, "content_sha256": g.content_sha256, "n_chunks": g.n_chunks,
                                "source": "wal"})
    if not out and manifest:
        for uri, d in list(manifest.documents.items())[:3]:
            out.append({"uri": uri, "doc_id": d.doc_id, "content_sha256": d.content_sha256,
                        "n_chunks": d.n_chunks, "source": "manifest"})
    return out


def up_to_date(c: Config) -> tuple[bool, str]:
    """True when a build would have nothing to do: manifest current, no WAL, the collection the
    manifest describes (its fingerprint and incarnation, DESIGN §13), corpus unchanged.

    Costs one read and hash per document and one read of Chroma's catalogue, its ids included (no chromadb
    import for an embedded store; a server is asked through the client), so `doit build` on every push is
    nearly free. A row's metadata or vector changed by hand in place is not seen: only verify reads those."""
    from . import corpus
    from .reporting import Warnings

    p = state.paths(c)
    if os.path.exists(p["wal"]):
        return False, "a WAL is pending"
    if state.read_latest(p["collection_dir"]) != schema_hash(c):
        return False, "LATEST differs from this configuration's schema"
    try:
        manifest = state.load_manifest(p["manifest"])
    except ChromaResumeError as exc:
        return False, str(exc)
    if manifest is None or manifest.db != cfg.db_identity(c):
        return False, "no manifest for this database"
    if store.embedded_store_missing(c):
        return False, "the Chroma folder is missing"
    if store.damaged_files(c):
        return False, "the Chroma folder may be damaged"
    found = store.stored_fingerprint(c)
    if found is None:
        return False, f"collection {c.collection!r} is missing"
    if found["schema_hash"] != manifest.schema_hash or found["incarnation"] != manifest.incarnation:
        return False, (f"collection {c.collection!r} is not the one the manifest describes (reset or recreated: "
                       f"incarnation {found['incarnation']}, manifest {manifest.incarnation})")
    if found["writing"] is not None or found["recorded"] != manifest.last_build.get("run_id"):
        return False, (f"no record covers the collection's last writes (written by run {found['writing'] or 'none'}, "
                       f"recorded by {found['recorded'] or 'none'}, manifest of run "
                       f"{manifest.last_build.get('run_id') or 'none'}): a build audits it")
    if manifest.leftovers and c.sync_mode != "none":
        return False, "old generations left by --sync-mode none are to be deleted"
    held = None if manifest.leftovers else store.catalogue_ids(c)
    if held is not None:
        expected = {chunk for e in manifest.documents.values()
                    for chunk in state.generation_ids(e.doc_id, e.content_sha256, e.n_chunks)}
        if held != expected:
            stray, missing = sorted(held - expected), sorted(expected - held)
            return False, (f"collection {c.collection!r} holds {len(held)} rows, the manifest records "
                           f"{len(expected)}: {len(stray)} not recorded {stray[:3]}, {len(missing)} missing "
                           f"{missing[:3]}")
    with open(os.devnull, "w") as quiet:
        current = {d.uri: (d.doc_id, d.content_sha256, state.meta_sha256(d.metadata, d.source_type))
                   for d in corpus.scan(c, Warnings(stream=quiet))}
    recorded = {uri: (e.doc_id, e.content_sha256, state.meta_sha256(e.metadata, e.source_type))
                for uri, e in manifest.documents.items()}
    if current == recorded:
        return True, "corpus unchanged"
    return False, f"corpus changed: {changed_documents(current, recorded)}"


def changed_documents(current: dict, recorded: dict, shown: int = 3) -> str:
    """`added a.md; changed b.md, c.md (+2 more); removed d.md`: which documents differ, by uri."""
    parts = []
    for verb, uris in (("added", sorted(set(current) - set(recorded))),
                       ("changed", sorted(u for u in set(current) & set(recorded) if current[u] != recorded[u])),
                       ("removed", sorted(set(recorded) - set(current)))):
        if uris:
            more = f" (+{len(uris) - shown} more)" if len(uris) > shown else ""
            parts.append(f"{verb} {', '.join(uris[:shown])}{more}")
    return "; ".join(parts)
