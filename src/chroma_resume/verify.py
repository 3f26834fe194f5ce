"""verify: the CI gate that proves the collection holds what the manifest's generations imply (DESIGN §6).

Ids alone prove little: a chunk can sit under the right id with the wrong text, metadata
or vector. So one pass over the collection checks every stored field of every chunk
against its generation; `--fresh` compares with the corpus as it is now (re-chunked);
`--deep N|all` re-embeds a seeded sample and compares Chroma's search for each one with
exact search (stored is not the same as findable; see _Findable for what that proves).
Every failing check names a few ids and the command that repairs it, rendered with the
options in effect so it runs as printed; the strongest of those is the overall fix.
Verify creates nothing: a missing database or collection is a failed check.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import random
import sys
import xml.etree.ElementTree as ET
from typing import TextIO

import msgspec
import numpy as np

from . import config as cfg
from . import corpus, embedders, state, store, wal
from .chunking import chunk_text
from .commands import command_line, move_command
from .config import Config
from .errors import ChromaResumeError, NewerState, StoreCorrupt, UsageError
from .plan import resume_decision
from .reporting import Progress, Warnings
from .schema import schema_hash

SHOW = 5  # ids named in a failing check's detail
# The embedders store float32 unit vectors (normalised in float32 even for fp16 and bf16 models: norms
# within ~1e-6 of 1). In ip space a length is a score, so a vector scaled by 1.009 must fail here.
UNIT_SLACK = 1e-3
SAME_POINT = 1e-4  # a query distance this small is the query's own point (or an exact duplicate of it)
NEIGHBOURS = 10  # hits asked for per findability query
TIE = 1e-4  # a returned row within this (relative) margin of the exact k-th distance is a hit: ties, duplicates
RECALL_ROWS = 500  # sampled rows whose recall is measured (exact search is a pass over every vector)
RECALL_FLOOR = 0.5  # least recall@k of Chroma's search against exact search over the sample (see _Findable)
DEEP_BATCH = 64  # chunks re-embedded and looked up per round trip


class Fixes:
    """The command that repairs each kind of failure, rendered from the options verify ran with
    (`commands.command_line`), so a fix pasted into a shell acts on this index. `rank`: strongest
    first; each repair also does what the weaker ones do, and a manual step comes before all."""

    def __init__(self, c: Config, manifest: str, index: str | None = None):
        # A repair writes its manifest, and deletes what verify calls orphans: a fix under --write-state false
        # or --sync-mode none would fail the same checks forever. Nor may it carry an option that refuses
        # the very state it repairs: --on-missing-state fail refuses the missing (set aside) manifest, and
        # --resume force refuses when there is no WAL (auto resumes every WAL that force would).
        repairing = {"write_state": True, **({"sync_mode": "incremental"} if c.sync_mode == "none" else {}),
                     **({"on_missing_state": "reset"} if c.on_missing_state == "fail" else {}),
                     **({"resume": "auto"} if c.resume == "force" else {})}
        self.index = index
        build = functools.partial(command_line, c, "build", index=index, **repairing)
        self.build_excluding = lambda patterns: build(exclude=c.exclude + patterns)  # leaves documents out
        self.build = build()  # writes what is missing or stale: manifest, collection, fingerprint, a changed corpus
        # A corpus that lists nothing: a build deletes every document only when told to. Not ranked: the
        # user's decision comes first, and once made, it leaves nothing for a stronger fix to do.
        self.build_emptying = build(allow_empty=True)
        self.resume = self.build  # a build resumes an unfinished run (clean-wal --force discards it instead)
        self.reconcile = build(strict_sync=True)  # compares id sets: deletes orphans, restores missing chunks
        self.rewrite = build(sync_mode="rewrite-all")  # re-writes every chunk, vectors from the cache
        # The stored vectors disagree with the model: cached vectors may be what is wrong (a flipped bit that is
        # still a unit vector, weights changed in place), so every vector is computed again and the cache corrected.
        self.reembed = build(sync_mode="rewrite-all", embed_cache_refresh=True)
        self.repair = command_line(c, "repair", index=index, **repairing)
        # Chroma's search graph itself is damaged: updating rows in place mends it only partly (measured), a
        # collection created anew and filled from the cache restores it. With the manifest set aside (kept
        # beside it), --on-missing-state reset does exactly that; nothing is embedded that the cache holds.
        aside = move_command(manifest, manifest + ".before-rebuild")
        self.rebuild = f"{aside} && {build(on_missing_state='reset')}"
        self.rebuild_reembed = f"{aside} && {build(on_missing_state='reset', embed_cache_refresh=True)}"
        self.order = [self.rebuild_reembed, self.rebuild, self.reembed, self.rewrite, self.resume, self.reconcile,
                      self.build]

    def rank(self, fix: str) -> int:
        return self.order.index(fix) if fix in self.order else -1


class Check(msgspec.Struct):
    name: str
    ok: bool
    detail: str
    fix: str = ""  # the command that repairs it, when it failed: runs as printed
    rank: int = -1  # of its fix, strongest first (Fixes.rank)


class Deep(msgspec.Struct, frozen=True):
    """`--deep N|all`: how many chunks to re-embed and look up (None: all), drawn with `seed`."""
    size: int | None
    seed: int = 0
    tolerance: float = 0.999  # least cosine between a stored vector and its re-embedding


class VerifyResult(msgspec.Struct):
    checks: list[Check]
    deep: Deep | None = None
    sample: list[str] = []  # the ids --deep re-embedded and looked up
    retrieval: msgspec.Struct | None = None  # `--queries`: retrieval.Retrieval (recall@k, MRR)

    @property
    def ok(self) -> bool:
        return all(ch.ok for ch in self.checks)

    @property
    def fix(self) -> str:
        """The strongest repair any failing check asks for: running it repairs them all. A check
        without a command (retrieval quality) adds nothing to paste."""
        failing = [ch for ch in self.checks if not ch.ok and ch.fix]
        return min(failing, key=lambda ch: ch.rank).fix if failing else ""


def _check(name: str, ok: bool, detail: str, fix: str, fixes: Fixes) -> Check:
    return Check(name, ok, detail, "" if ok else fix, fixes.rank(fix))


class _Slot(msgspec.Struct, frozen=True):
    """Where an expected chunk id comes from: its document and position in the generation."""
    uri: str
    entry: state.DocEntry
    index: int


def verify(c: Config, *, fresh: bool = False, deep: Deep | None = None, stream: TextIO = sys.stderr,
           index: str | None = None) -> VerifyResult:
    """Run every check; raises only for the store itself (RuntimeFailure, exit 5) or bad options.
    Creates nothing: a missing database or collection is a failed check, never a new empty one."""
    p = state.paths(c)
    schema = schema_hash(c)
    fixes = Fixes(c, p["manifest"], index)
    manifest, manifest_check = _manifest_check(c, p, schema, fixes)
    store_check = _store_check(c, fixes)
    db = store.open_store(c) if store_check.ok else None
    # The collection a build would write to: a WAL of another incarnation would be set aside.
    incarnation = db.fingerprint()["incarnation"] if db is not None else "none(no readable collection)"
    checks = [manifest_check, _wal_check(c, p["wal"], schema, manifest, incarnation, fixes)]
    if manifest is None:
        return VerifyResult(checks)
    checks.append(store_check)
    if not store_check.ok:
        return VerifyResult(checks)
    if db is None:
        checks.append(_check("collection", False, f"collection {c.collection!r} does not exist in "
                                                  f"{cfg.db_identity(c)}", fixes.build, fixes))
        return VerifyResult(checks)
    checks.append(_fingerprint_check(c, db.fingerprint(), schema, manifest, fixes))
    try:
        return _audit(c, db, manifest, checks, fixes, fresh, deep, stream)
    except StoreCorrupt as exc:  # a row the probe did not read: the store is broken, a failed check (exit 1)
        broken = _broken_store(c, exc, fixes)
        return VerifyResult([broken if ch.name == "store" else ch for ch in checks])


def _audit(c: Config, db: store.Store, manifest: state.Manifest, checks: list[Check], fixes: Fixes, fresh: bool,
           deep: Deep | None, stream: TextIO) -> VerifyResult:
    """The checks that read every row (and, with --deep, search for them)."""
    expected = {chunk_id: _Slot(uri, entry, i) for uri, entry in manifest.documents.items()
                for i, chunk_id in enumerate(state.generation_ids(entry.doc_id, entry.content_sha256, entry.n_chunks))}
    audit = _Audit(expected, manifest.dim, fixes, keep_vectors=deep is not None)
    try:
        for row in db.scan(include=("metadatas", "documents", "embeddings")):
            audit.add(row)
    except StoreCorrupt as exc:  # a row Chroma cannot read: the store is broken, not unreachable
        return VerifyResult([*(ch for ch in checks if ch.name != "store"), _broken_store(c, exc, fixes)])
    checks = checks + audit.checks(db.count())
    if fresh:
        checks += _fresh_checks(c, manifest, audit.text_sha, fixes)
    if deep is None:
        return VerifyResult(checks)
    sample = _sample(sorted(audit.text_sha), deep)
    checks += _deep_checks(c, db, sample, deep, audit.space(), fixes, stream)
    return VerifyResult(checks, deep, sample)


# ---- state: manifest, WAL, collection fingerprint ---------------------------------------

def _manifest_check(c: Config, p: dict, schema: str, fixes: Fixes) -> tuple[state.Manifest | None, Check]:
    try:
        manifest = state.load_manifest(p["manifest"])
    except NewerState:
        raise
    except ChromaResumeError as exc:
        # Kept beside (restore it from a backup instead if you have one); the build then treats the
        # manifest as missing and --on-missing-state reset rebuilds the collection from the cache.
        aside = move_command(p["manifest"], p["manifest"] + ".corrupt")
        return None, Check("manifest", False, f"{exc} (restore it from a backup, or set it aside and rebuild)",
                           f"{aside} && {fixes.build}")
    if manifest is None:
        return None, _check("manifest", False, f"no manifest at {p['manifest']}{_built_otherwise(c, p, schema)}",
                            fixes.build, fixes)
    latest = state.read_latest(p["collection_dir"])
    return manifest, _check("manifest", latest == schema == manifest.schema_hash,
                            f"{p['manifest']} schema={manifest.schema_hash} LATEST={latest} config={schema}"
                            f"{_built_otherwise(c, p, schema)}", fixes.build, fixes)


def _built_otherwise(c: Config, p: dict, schema: str) -> str:
    """When the last build here had another schema, the options that made the difference: a verify
    that forgot one (`--backend onnx-int8`, `--chunk-chars`) must not read as a lost index, since its
    fix would rebuild the collection under the options given."""
    latest = state.read_latest(p["collection_dir"])
    if not latest or latest == schema:
        return ""
    try:
        other = state.load_manifest(os.path.join(p["collection_dir"], latest, state.MANIFEST_NAME))
    except ChromaResumeError:
        return ""
    if other is None:
        return ""
    now, differ = cfg.snapshot(c), []
    for name, old in sorted(other.config.items()):
        if name == "root" or name not in now or old == now[name] or isinstance(old, (list, dict)):
            continue
        try:  # an option counts when it alone moves this configuration to another schema
            moved = schema_hash(msgspec.structs.replace(c, **{name: old})) != schema
        except Exception:  # noqa: BLE001 - a value this version cannot read is no hint
            continue
        if moved:
            differ.append(f"--{name.replace('_', '-')} {old} (given: {now[name]})")
    with_options = f" with {', '.join(differ)}" if differ else ""
    return (f"; the last build of {c.collection!r} here was schema {latest}{with_options}: give the options it was "
            f"built with, or the fix below rebuilds the collection under these")


def _wal_check(c: Config, path: str, schema: str, manifest: state.Manifest | None, incarnation: str,
               fixes: Fixes) -> Check:
    """Describes the WAL as resume-status does: the decision a build would take, with its reason."""
    discard = command_line(c, "clean-wal", "--force", index=fixes.index)
    try:
        replay = wal.read(path)
    except ChromaResumeError as exc:
        return Check("wal", False, f"{exc} (resume_active=false reason=wal_corrupt(build exits 4); inspect it "
                                   f"before discarding it)", f"{discard} && {fixes.build}")
    recorded = manifest.last_build.get("run_id") if manifest else None
    decision = resume_decision(replay, mode=c.resume, schema_hash=schema, collection=c.collection,
                               db=cfg.db_identity(c), manifest_run_id=recorded, wal_enabled=c.wal,
                               incarnation=incarnation)
    verdict = f"resume_active={str(decision.active).lower()} reason={decision.reason}"
    if decision.reason in ("no_wal", "wal_finished_ok"):
        return Check("wal", True, f"no unfinished run ({verdict})")
    what = "finished but unrecorded" if replay.finished_ok else "unfinished"
    unrecorded = f": the manifest names run {recorded}" if replay.finished_ok else ""
    return _check("wal", False, f"{what} run {replay.start.run_id} in {path}{unrecorded} ({replay.docs_committed} "
                                f"documents committed; {verdict}; the fix resumes it, `{discard}` would discard it)",
                  fixes.resume, fixes)


def _store_check(c: Config, fixes: Fixes) -> Check:
    """Chroma can read its own files (a power cut can empty its segment files) and its vector index
    holds exactly the rows' ids (a cut can revert the index files): its own check, with its fix.
    A missing embedded database fails here, unopened: opening it would create an empty one."""
    if store.embedded_store_missing(c):
        return _check("store", False, f"no Chroma database at {cfg.db_identity(c)} (verify creates none)",
                      fixes.build, fixes)
    if store.damaged_files(c):  # unopened: Chroma would write a new database into an emptied chroma.sqlite3
        return _broken_store(c, StoreCorrupt(f"Chroma cannot read its own files: {store.damaged_files(c)[:3]} are empty"), fixes)
    try:
        store.check_index(c)
    except StoreCorrupt as exc:
        return _broken_store(c, exc, fixes)
    return Check("store", True, f"{cfg.db_identity(c)} is readable")


def _broken_store(c: Config, exc: StoreCorrupt, fixes: Fixes) -> Check:
    if c.chroma_host:  # not ours to set aside: said in words, there is no command to run
        return Check("store", False, f"{exc}; repair or restore the server's store", "")
    return Check("store", False, f"{exc}; the fix sets the folder aside and rebuilds it from the embedding cache",
                 fixes.repair)


def _fingerprint_check(c: Config, found: dict, schema: str, manifest: state.Manifest, fixes: Fixes) -> Check:
    """The collection's own metadata is the truth (DESIGN §1): this schema, this manifest's collection, this space."""
    want = {"schema_hash": schema, "incarnation": manifest.incarnation, "space": c.hnsw_space}
    wrong = [f"{key}={found.get(key)!r} (expected {value!r})" for key, value in want.items() if found.get(key) != value]
    shown = "; ".join(wrong) or " ".join(f"{key}={value}" for key, value in want.items())
    return _check("fingerprint", not wrong, f"collection {c.collection!r}: {shown}", fixes.build, fixes)


# ---- content: one pass over the collection ---------------------------------------------

class _Audit:
    """Every stored row against the generation its id names; orphans are left to the ids check."""

    def __init__(self, expected: dict[str, _Slot], dim: int | None, fixes: Fixes, keep_vectors: bool = False):
        self.expected, self.dim, self.fixes, self.keep_vectors = expected, dim, fixes, keep_vectors
        self.vectors: dict[str, np.ndarray] = {}  # every row Chroma holds, orphans too: what a search can return
        self.orphans: list[str] = []
        self.text_sha: dict[str, str] = {}  # id -> hash of the stored text, for every expected id present
        self.bad: dict[str, list[str]] = {"metadata": [], "text": [], "dimension": [], "vectors": []}
        self.first_diff = ""

    def add(self, row: dict) -> None:
        chunk_id, slot = row["id"], self.expected.get(row["id"])
        if self.keep_vectors:
            self.vectors[chunk_id] = np.asarray(row["embedding"], dtype=np.float32)
        if slot is None:
            self.orphans.append(chunk_id)
            return
        meta, text = row["metadata"] or {}, row["document"]
        self.text_sha[chunk_id] = state.text_sha256(text or "")
        diff = _metadata_diff(meta, slot)
        if diff and not self.first_diff:
            self.first_diff = f"{chunk_id}: {', '.join(diff)}"
        vector = np.asarray(row["embedding"], dtype=np.float64)
        failed = {"metadata": bool(diff),
                  "text": text is None or self.text_sha[chunk_id] != meta.get("text_sha256"),
                  "dimension": vector.shape != (self.dim,),
                  "vectors": not _unit(vector)}
        for name in (name for name, bad in failed.items() if bad):
            self.bad[name].append(chunk_id)

    def space(self) -> "_Space":
        return _Space(list(self.vectors), list(self.vectors.values()))

    def checks(self, count: int) -> list[Check]:
        missing = sorted(set(self.expected) - set(self.text_sha))
        orphans, bad, n, fixes = sorted(self.orphans), self.bad, len(self.expected), self.fixes
        return [
            _check("count", count == n, f"collection has {count} chunks, manifest expects {n}", fixes.reconcile, fixes),
            _check("ids", not missing and not orphans, f"missing={len(missing)} {missing[:SHOW]} "
                                                       f"orphans={len(orphans)} {orphans[:SHOW]}", fixes.reconcile, fixes),
            _check("metadata", not bad["metadata"], f"{len(bad['metadata'])} chunk(s) differ from their generation's "
                                                    f"metadata {bad['metadata'][:SHOW]} {self.first_diff}".rstrip(),
                   fixes.rewrite, fixes),
            _check("text", not bad["text"], f"{len(bad['text'])} stored text(s) do not hash to their text_sha256 "
                                            f"{bad['text'][:SHOW]}", fixes.rewrite, fixes),
            _check("dimension", not bad["dimension"] and (self.dim is not None or not n),
                   f"manifest dim={self.dim}; {len(bad['dimension'])} vector(s) differ {bad['dimension'][:SHOW]}",
                   fixes.rewrite, fixes),
            _check("vectors", not bad["vectors"], f"{len(bad['vectors'])} vector(s) not finite unit length "
                                                  f"{bad['vectors'][:SHOW]}", fixes.rewrite, fixes),
        ]


def _metadata_diff(stored: dict, slot: _Slot) -> list[str]:
    """Keys whose stored value is not what the generation implies (text_sha256 is the text check's)."""
    e = slot.entry
    want = state.chunk_metadata(slot.uri, e.doc_id, e.content_sha256, e.source_type, e.metadata, slot.index,
                                e.n_chunks, "")
    keys = sorted((set(want) | set(stored)) - {"text_sha256"})
    return [f"{k}={stored.get(k)!r} (expected {want.get(k)!r})" for k in keys
            if k not in stored or k not in want or not state.same_metadata({k: stored[k]}, {k: want[k]})]


def _unit(vector: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(vector))) and abs(float(np.linalg.norm(vector)) - 1.0) <= UNIT_SLACK


# ---- --fresh: the corpus as it is now --------------------------------------------------

def _fresh_checks(c: Config, manifest: state.Manifest, text_sha: dict[str, str], fixes: Fixes) -> list[Check]:
    """Documents added, changed or removed since the manifest; and, for the unchanged ones,
    whether the chunker still makes the texts Chroma holds. A document the scan listed but could
    not read is kept by a build (skipped is not deleted), so it is named as unreadable, not removed:
    its fix is to make it readable and build, or to leave it out with --exclude (the printed fix)."""
    recorded = manifest.documents
    seen: set[str] = set()
    changed: list[str] = []
    stale: list[str] = []
    listing = corpus.Listing()
    with open(os.devnull, "w") as quiet:
        for doc in corpus.scan(c, Warnings(stream=quiet), listing=listing):
            seen.add(doc.uri)
            entry = recorded.get(doc.uri)
            if entry is not None and not _same_generation(doc, entry):
                changed.append(doc.uri)
            elif entry is not None:
                stale += _rechunk_mismatches(c, doc, entry, text_sha)
    unreadable = sorted(uri for uri in set(recorded) - seen if listing.unread(uri))
    added, removed = sorted(seen - set(recorded)), sorted(set(recorded) - seen - set(unreadable))
    detail, fix = f"added={added[:SHOW]} changed={sorted(changed)[:SHOW]} removed={removed[:SHOW]}", fixes.build
    if recorded and not (seen or listing.files or listing.dirs):  # what a build refuses without --allow-empty
        detail += (f"; the corpus lists no document at all, so the fix deletes all {len(recorded)} indexed "
                   f"document(s): run it only if that is what you want (a wrong folder or --include is not)")
        fix = fixes.build_emptying
    checks = [_check("fresh", not (added or changed or removed), detail, fix, fixes),
              _check("fresh_chunks", not stale, f"{len(stale)} stored chunk(s) differ from what the chunker makes of "
                                                f"the current corpus {stale[:SHOW]}", fixes.rewrite, fixes)]
    if unreadable:
        left_out = tuple(sorted({_unread_root(uri, listing) for uri in unreadable}))
        checks.append(Check("fresh_unreadable", False,
                            f"{len(unreadable)} indexed document(s) cannot be read now and are kept as they were "
                            f"indexed {unreadable[:SHOW]}: make them readable and run {fixes.build}, or leave them out "
                            f"(the fix)", fixes.build_excluding(left_out)))
    return checks


def _unread_root(uri: str, listing: corpus.Listing) -> str:
    """The exclude pattern that leaves an unreadable document out: itself, or the unreadable folder above it."""
    folder = next((d for d in sorted(listing.dirs) if d != "." and uri.startswith(d + "/")), None)
    return glob.escape(folder or uri)


def _same_generation(doc: corpus.Document, entry: state.DocEntry) -> bool:
    """Same text and same stored extras: metadata and source_type changes are changes too (DESIGN §1)."""
    return (doc.content_sha256, doc.doc_id, state.meta_sha256(doc.metadata, doc.source_type)) == \
        (entry.content_sha256, entry.doc_id, state.meta_sha256(entry.metadata, entry.source_type))


def _rechunk_mismatches(c: Config, doc: corpus.Document, entry: state.DocEntry, text_sha: dict[str, str]) -> list[str]:
    texts = chunk_text(doc.text, c.chunk_chars, c.overlap_chars, c.min_chunk_chars)
    if len(texts) != entry.n_chunks:
        return [f"{doc.uri} ({len(texts)} chunks now, {entry.n_chunks} stored)"]
    ids = state.generation_ids(entry.doc_id, entry.content_sha256, entry.n_chunks)
    return [i for i, text in zip(ids, texts) if i in text_sha and text_sha[i] != state.text_sha256(text)]


# ---- --deep: re-embed and look up a sample ---------------------------------------------

def deep_options(size: str | int | None, seed: int | None = None, tolerance: float | None = None) -> Deep | None:
    """`--deep N|all` with its `--seed` and `--tolerance`, checked once for the CLI and doit."""
    if size is None:
        if seed is not None or tolerance is not None:
            raise UsageError("--seed and --tolerance go with --deep N|all")
        return None
    text = str(size).strip().lower()
    if text != "all" and not (text.isdigit() and int(text) > 0):
        raise UsageError(f"--deep {size!r}: give a number of chunks (at least 1) or all")
    if tolerance is not None and not -1.0 <= tolerance <= 1.0:
        raise UsageError(f"--tolerance {tolerance}: a cosine, between -1 and 1")
    given = {k: v for k, v in (("seed", seed), ("tolerance", tolerance)) if v is not None}
    return Deep(None if text == "all" else int(text), **given)


def _sample(ids: list[str], deep: Deep) -> list[str]:
    """A seeded draw from the sorted ids: the same seed picks the same chunks on every machine."""
    if deep.size is None or deep.size >= len(ids):
        return ids
    return sorted(random.Random(deep.seed).sample(ids, deep.size))


def _deep_checks(c: Config, db: store.Store, sample: list[str], deep: Deep, space: "_Space", fixes: Fixes,
                 stream: TextIO) -> list[Check]:
    embedder = embedders.load(c) if sample else None
    far: list[str] = []
    findable = _Findable(space, c.hnsw_space, min(NEIGHBOURS, db.count()))
    progress = _DeepProgress(len(sample), mode=c.progress, stream=stream)
    for lo in range(0, len(sample), DEEP_BATCH):
        rows = db.held(sample[lo:lo + DEEP_BATCH], include=("documents", "embeddings"))
        ids = list(rows)
        texts = [rows[i]["documents"] or "" for i in ids]
        stored = [np.asarray(rows[i]["embeddings"], dtype=np.float32) for i in ids]
        again = embedder.encode(texts)
        far += [f"{i}(cos={cos:.4f})" for i, cos in zip(ids, map(_cosine, stored, again)) if not cos >= deep.tolerance]
        findable.add(db, ids, stored)
        progress.advance(docs=len(ids))
    progress.close()
    drawn = f"{len(sample)} sampled (seed {deep.seed})" if deep.size else f"all {len(sample)} chunks"
    return [_check("embedding", not far, f"{drawn}: {len(far)} re-embed below cosine {deep.tolerance} {far[:SHOW]}; "
                                         f"the fix also corrects the cached vectors", fixes.reembed, fixes),
            _check("findable", findable.ok, f"{drawn}: {findable.describe()}",
                   fixes.rebuild_reembed if far else fixes.rebuild, fixes)]


class _Space(msgspec.Struct):
    """Every vector the collection holds (orphans too: a search can return them), for exact search."""
    ids: list[str]
    vectors: list[np.ndarray]


class _Findable:
    """What `findable` proves: Chroma's search, as users get it, works over the vectors the collection holds.

    Chroma searches an HNSW graph, approximate by design, and exact duplicate vectors (500 copies of one
    stub page) trap the greedy search or cut other rows off the graph: a freshly built, correct index does
    not return some rows even for their own vector, nor for a search restricted to their id (measured in
    docs/design-notes.md). Demanding each row back would fail healthy indexes, and no build can change it.
    So each sampled row's search is compared with exact search over every stored vector (orphans too):
    a returned row is a hit when its exact distance is within the exact k-th (ties and duplicates count).
    The check fails when recall@k over the sample falls below RECALL_FLOOR (a damaged graph, an index that
    does not search the vectors it returns) or when a row's vector cannot be searched with at all (not
    finite: nothing is ever near it). Rows not returned for their own vector are counted and shown."""

    def __init__(self, space: _Space, metric: str, k: int):
        self.metric, self.k = metric, k
        shapes = [v.shape for v in space.vectors]
        self.shape = max(set(shapes), key=shapes.count) if shapes else (0,)  # a row of another is the dimension check's
        kept = [(i, v) for i, v in zip(space.ids, space.vectors) if v.shape == self.shape]
        space = _Space([i for i, _ in kept], [v for _, v in kept])
        self.position = {chunk_id: n for n, chunk_id in enumerate(space.ids)}
        # float32, as Chroma holds them: 4 bytes x dimension per row in memory, during --deep only
        self.matrix = np.vstack(space.vectors).astype(np.float32) if space.vectors else np.empty((0, 0), np.float32)
        if metric == "cosine" and len(self.matrix):
            norms = np.linalg.norm(self.matrix, axis=1, keepdims=True)
            self.matrix = self.matrix / np.where(norms > 0, norms, 1.0)
        self.lost: list[str] = []  # vectors Chroma cannot search with: not finite, no dimension
        self.not_first_hand = 0  # not returned themselves for their own vector (nor an equal vector)
        self.astray = 0  # of those, rows whose search returned nothing of their exact neighbourhood
        self.hits = self.wanted = self.measured = 0

    def add(self, db: store.Store, ids: list[str], stored: list[np.ndarray]) -> None:
        searchable = [n for n, v in enumerate(stored) if v.shape == self.shape and len(v) and np.all(np.isfinite(v))]
        self.lost += [ids[n] for n in range(len(ids)) if n not in searchable]
        if not searchable or not self.k:
            return
        found = db.nearest([stored[n] for n in searchable], self.k)
        for n, hits in zip(searchable, found):
            first_hand = any(hit == ids[n] or distance <= SAME_POINT for hit, distance, _ in hits)
            measure = self.measured < RECALL_ROWS
            if first_hand and not measure:
                continue  # exact search costs a pass over every vector: spent on the recall rows and the doubtful
            exact = self._distances(stored[n])
            kth = np.partition(exact, self.k - 1)[self.k - 1]
            near = {hit for hit, _, _ in hits if hit in self.position
                    and exact[self.position[hit]] <= kth + TIE * max(1.0, abs(kth))}
            if measure:
                self.measured += 1
                self.hits += len(near)
                self.wanted += self.k
            if not first_hand:
                self.not_first_hand += 1
                self.astray += not near

    def _distances(self, query: np.ndarray) -> np.ndarray:
        """Chroma's distance of the space: cosine 1-cos, l2 squared euclidean, ip 1-dot."""
        q = query.astype(np.float32)
        if self.metric == "l2":
            return np.einsum("ij,ij->i", self.matrix - q, self.matrix - q)
        if self.metric == "cosine":
            q = q / (np.linalg.norm(q) or 1.0)
        return 1.0 - self.matrix @ q

    @property
    def recall(self) -> float:
        return self.hits / self.wanted if self.wanted else 1.0

    @property
    def ok(self) -> bool:
        return not self.lost and self.recall >= RECALL_FLOOR

    def describe(self) -> str:
        return (f"recall@{self.k} against exact search {self.recall:.4f} over {self.measured} rows (floor "
                f"{RECALL_FLOOR}); {len(self.lost)} vector(s) Chroma cannot search with {self.lost[:SHOW]}; "
                f"{self.not_first_hand} row(s) not returned for their own vector, {self.astray} of them with none of "
                f"their exact neighbours (HNSW is approximate; duplicate vectors cut rows off its graph)")


def _cosine(stored: np.ndarray, again) -> float:
    """NaN (a failure) when the shapes differ or a vector is zero."""
    again = np.asarray(again, dtype=np.float64)
    stored = stored.astype(np.float64)
    norms = float(np.linalg.norm(stored) * np.linalg.norm(again))
    return float(stored @ again) / norms if stored.shape == again.shape and norms else math.nan


class _DeepProgress(Progress):
    """Progress's display and pacing, counting the chunks re-embedded and looked up (a known total)."""

    label = "[DEEP]"
    estimated = False

    def counts(self) -> tuple[int, int | None, str]:
        return self.docs, self.total_docs, "re-embedded and looked up"


# ---- reports for CI ----------------------------------------------------------------------

def prepare_output(path: str) -> None:
    """Make the report's folder now, so a bad path fails at once (exit 2), not after a long audit."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write report {path}: {exc.strerror or exc}") from None
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write report {path}: {'a folder' if os.path.isdir(path) else 'folder not writable'}")


def write_report(result: VerifyResult, path: str) -> None:
    body = {"ok": result.ok, "fix": result.fix, "checks": msgspec.to_builtins(result.checks),
            "deep": msgspec.to_builtins(result.deep), "sample": result.sample,
            "retrieval": msgspec.to_builtins(result.retrieval)}
    _write(path, json.dumps(body, indent=1).encode())


def write_junit(result: VerifyResult, path: str) -> None:
    failures = sum(not ch.ok for ch in result.checks)
    suite = ET.Element("testsuite", name="chroma-resume.verify", tests=str(len(result.checks)),
                       failures=str(failures), errors="0")
    for ch in result.checks:
        case = ET.SubElement(suite, "testcase", classname="chroma_resume.verify", name=ch.name)
        if not ch.ok:
            ET.SubElement(case, "failure", message=ch.detail[:200]).text = f"{ch.detail}\nfix: {ch.fix}"
    _write(path, ET.tostring(suite, encoding="utf-8", xml_declaration=True))


def _write(path: str, data: bytes) -> None:
    prepare_output(path)
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise UsageError(f"cannot write report {path}: {exc.strerror or exc}") from None
