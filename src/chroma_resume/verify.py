"""verify: the CI gate that proves the collection holds what the manifest's generations imply (DESIGN §6).

Ids alone prove little: a chunk can sit under the right id with the wrong text, metadata
or vector. So one pass over the collection checks every stored field of every chunk
against its generation; `--fresh` compares with the corpus as it is now (re-chunked);
`--deep N|all` re-embeds a seeded sample and asks Chroma's index to find each one
(stored is not the same as findable). Every failing check names a few ids and the
build command that repairs it; the strongest of those is the overall fix.
"""
from __future__ import annotations

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
from . import corpus, embedding, state, store, wal
from .chunking import chunk_text
from .config import Config
from .errors import ChromaResumeError, StoreCorrupt, UsageError
from .plan import resume_decision
from .reporting import Progress, Warnings
from .schema import schema_hash

SHOW = 5  # ids named in a failing check's detail
UNIT_SLACK = 1e-2  # the embedders store unit vectors; fp16 rounding stays far inside this
SAME_POINT = 1e-4  # a query distance this small is the query's own point (or an exact duplicate of it)
NEIGHBOURS = 10  # hits asked for per findability query
DEEP_BATCH = 64  # chunks re-embedded and looked up per round trip


def _build(*options: str) -> str:
    extra = "".join(f" {o}" for o in options)
    return f"doit -a build{extra} (or chroma-resume build{extra})"


RESUME = f"resume it: {_build()}; or discard it: doit clean-wal --force (or chroma-resume clean-wal --force)"
RECONCILE = _build("--strict-sync", "true")  # compares id sets: deletes orphans, restores missing chunks
BUILD = _build()  # writes what is missing or stale: manifest, collection, fingerprint, a changed corpus
REWRITE = _build("--sync-mode", "delete-stale")  # re-writes every chunk, vectors from the cache
# The model itself disagrees with the stored vectors (its weights changed in place, same file sizes):
# the cache holds the old model's vectors too, so they are computed again.
REEMBED = _build("--sync-mode", "delete-stale", "--embed-cache", "off")


def _rank(fix: str) -> int:
    """Strongest first: each repair also does what the later ones do; a manual step (-1) comes before all."""
    return next((i for i, head in enumerate((REWRITE, RESUME, RECONCILE, BUILD)) if fix.startswith(head)), -1)


class Check(msgspec.Struct):
    name: str
    ok: bool
    detail: str
    fix: str = ""  # the command that repairs it, when it failed


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
        """The strongest repair any failing check asks for: running it repairs them all."""
        return min((ch.fix for ch in self.checks if not ch.ok), key=_rank, default="")


def _check(name: str, ok: bool, detail: str, fix: str) -> Check:
    return Check(name, ok, detail, "" if ok else fix)


class _Slot(msgspec.Struct, frozen=True):
    """Where an expected chunk id comes from: its document and position in the generation."""
    uri: str
    entry: state.DocEntry
    index: int


def verify(c: Config, *, fresh: bool = False, deep: Deep | None = None, stream: TextIO = sys.stderr) -> VerifyResult:
    """Run every check; raises only for the store itself (RuntimeFailure, exit 5) or bad options."""
    p = state.paths(c)
    schema = schema_hash(c)
    manifest, manifest_check = _manifest_check(p, schema)
    store_check = _store_check(c)
    db = store.open_store(c) if store_check.ok else None
    # The collection a build would write to: a WAL of another incarnation would be set aside.
    incarnation = db.fingerprint()["incarnation"] if db is not None else "none(no readable collection)"
    checks = [manifest_check, _wal_check(c, p["wal"], schema, manifest, incarnation)]
    if manifest is None:
        return VerifyResult(checks)
    checks.append(store_check)
    if not store_check.ok:
        return VerifyResult(checks)
    if db is None:
        checks.append(Check("collection", False, f"collection {c.collection!r} does not exist in "
                                                 f"{cfg.db_identity(c)}", BUILD))
        return VerifyResult(checks)
    checks.append(_fingerprint_check(c, db.fingerprint(), schema, manifest))
    expected = {chunk_id: _Slot(uri, entry, i) for uri, entry in manifest.documents.items()
                for i, chunk_id in enumerate(state.generation_ids(entry.doc_id, entry.content_sha256, entry.n_chunks))}
    rewrite = REWRITE
    audit = _Audit(expected, manifest.dim, rewrite)
    try:
        for row in db.scan(include=("metadatas", "documents", "embeddings")):
            audit.add(row)
    except StoreCorrupt as exc:  # a row Chroma cannot read: the store is broken, not unreachable
        return VerifyResult([*(ch for ch in checks if ch.name != "store"), _broken_store(c, exc)])
    checks += audit.checks(db.count())
    if fresh:
        checks += _fresh_checks(c, manifest, audit.text_sha, rewrite)
    if deep is None:
        return VerifyResult(checks)
    sample = _sample(sorted(audit.text_sha), deep)
    checks += _deep_checks(c, db, sample, deep, rewrite, stream)
    return VerifyResult(checks, deep, sample)


# ---- state: manifest, WAL, collection fingerprint ---------------------------------------

def _manifest_check(p: dict, schema: str) -> tuple[state.Manifest | None, Check]:
    try:
        manifest = state.load_manifest(p["manifest"])
    except ChromaResumeError as exc:
        return None, Check("manifest", False, str(exc), f"restore {p['manifest']} from a backup, or delete it and "
                                                        f"rebuild: {_build('--on-missing-state', 'reset')}")
    if manifest is None:
        return None, Check("manifest", False, f"no manifest at {p['manifest']}", BUILD)
    latest = state.read_latest(p["collection_dir"])
    return manifest, _check("manifest", latest == schema == manifest.schema_hash,
                            f"{p['manifest']} schema={manifest.schema_hash} LATEST={latest} config={schema}", BUILD)


def _wal_check(c: Config, path: str, schema: str, manifest: state.Manifest | None, incarnation: str) -> Check:
    """Describes the WAL as resume-status does: the decision a build would take, with its reason."""
    try:
        replay = wal.read(path)
    except ChromaResumeError as exc:
        return Check("wal", False, f"{exc} (resume_active=false reason=wal_corrupt(build exits 4))",
                     f"inspect it, then discard it: doit clean-wal --force (or chroma-resume clean-wal --force); "
                     f"then {BUILD}")
    recorded = manifest.last_build.get("run_id") if manifest else None
    decision = resume_decision(replay, mode=c.resume, schema_hash=schema, collection=c.collection,
                               db=cfg.db_identity(c), manifest_run_id=recorded, wal_enabled=c.wal,
                               incarnation=incarnation)
    verdict = f"resume_active={str(decision.active).lower()} reason={decision.reason}"
    if decision.reason in ("no_wal", "wal_finished_ok"):
        return Check("wal", True, f"no unfinished run ({verdict})")
    what = "finished but unrecorded" if replay.finished_ok else "unfinished"
    unrecorded = f": the manifest names run {recorded}" if replay.finished_ok else ""
    return Check("wal", False, f"{what} run {replay.start.run_id} in {path}{unrecorded} ({replay.docs_committed} "
                               f"documents committed; {verdict})", RESUME)


def _store_check(c: Config) -> Check:
    """Chroma can read its own files (a power cut can empty its segment files) and its vector index
    holds exactly the rows' ids (a cut can revert the index files): its own check, with its fix."""
    try:
        store.check_index(c)
    except StoreCorrupt as exc:
        return _broken_store(c, exc)
    return Check("store", True, f"{cfg.db_identity(c)} is readable")


def _broken_store(c: Config, exc: StoreCorrupt) -> Check:
    fix = ("repair or restore the server's store" if c.chroma_host else
           "doit repair (or chroma-resume repair): sets the folder aside and rebuilds it from the embedding cache")
    return Check("store", False, str(exc), fix)


def _fingerprint_check(c: Config, found: dict, schema: str, manifest: state.Manifest) -> Check:
    """The collection's own metadata is the truth (DESIGN §1): this schema, this manifest's collection, this space."""
    want = {"schema_hash": schema, "incarnation": manifest.incarnation, "space": c.hnsw_space}
    wrong = [f"{key}={found.get(key)!r} (expected {value!r})" for key, value in want.items() if found.get(key) != value]
    shown = "; ".join(wrong) or " ".join(f"{key}={value}" for key, value in want.items())
    return _check("fingerprint", not wrong, f"collection {c.collection!r}: {shown}", BUILD)


# ---- content: one pass over the collection ---------------------------------------------

class _Audit:
    """Every stored row against the generation its id names; orphans are left to the ids check."""

    def __init__(self, expected: dict[str, _Slot], dim: int | None, rewrite: str):
        self.expected, self.dim, self.rewrite = expected, dim, rewrite
        self.orphans: list[str] = []
        self.text_sha: dict[str, str] = {}  # id -> hash of the stored text, for every expected id present
        self.bad: dict[str, list[str]] = {"metadata": [], "text": [], "dimension": [], "vectors": []}
        self.first_diff = ""

    def add(self, row: dict) -> None:
        chunk_id, slot = row["id"], self.expected.get(row["id"])
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

    def checks(self, count: int) -> list[Check]:
        missing = sorted(set(self.expected) - set(self.text_sha))
        orphans, bad, n = sorted(self.orphans), self.bad, len(self.expected)
        return [
            _check("count", count == n, f"collection has {count} chunks, manifest expects {n}", RECONCILE),
            _check("ids", not missing and not orphans, f"missing={len(missing)} {missing[:SHOW]} "
                                                       f"orphans={len(orphans)} {orphans[:SHOW]}", RECONCILE),
            _check("metadata", not bad["metadata"], f"{len(bad['metadata'])} chunk(s) differ from their generation's "
                                                    f"metadata {bad['metadata'][:SHOW]} {self.first_diff}".rstrip(),
                   self.rewrite),
            _check("text", not bad["text"], f"{len(bad['text'])} stored text(s) do not hash to their text_sha256 "
                                            f"{bad['text'][:SHOW]}", self.rewrite),
            _check("dimension", not bad["dimension"] and (self.dim is not None or not n),
                   f"manifest dim={self.dim}; {len(bad['dimension'])} vector(s) differ {bad['dimension'][:SHOW]}",
                   self.rewrite),
            _check("vectors", not bad["vectors"], f"{len(bad['vectors'])} vector(s) not finite unit length "
                                                  f"{bad['vectors'][:SHOW]}", self.rewrite),
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

def _fresh_checks(c: Config, manifest: state.Manifest, text_sha: dict[str, str], rewrite: str) -> list[Check]:
    """Documents added, changed or removed since the manifest; and, for the unchanged ones,
    whether the chunker still makes the texts Chroma holds."""
    recorded = manifest.documents
    seen: set[str] = set()
    changed: list[str] = []
    stale: list[str] = []
    with open(os.devnull, "w") as quiet:
        for doc in corpus.scan(c, Warnings(stream=quiet)):
            seen.add(doc.uri)
            entry = recorded.get(doc.uri)
            if entry is not None and not _same_generation(doc, entry):
                changed.append(doc.uri)
            elif entry is not None:
                stale += _rechunk_mismatches(c, doc, entry, text_sha)
    added, removed = sorted(seen - set(recorded)), sorted(set(recorded) - seen)
    return [_check("fresh", not (added or changed or removed),
                   f"added={added[:SHOW]} changed={sorted(changed)[:SHOW]} removed={removed[:SHOW]}", BUILD),
            _check("fresh_chunks", not stale, f"{len(stale)} stored chunk(s) differ from what the chunker makes of "
                                              f"the current corpus {stale[:SHOW]}", rewrite)]


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


def _deep_checks(c: Config, db: store.Store, sample: list[str], deep: Deep, rewrite: str,
                 stream: TextIO) -> list[Check]:
    embedder = embedding.load(c) if sample else None
    far: list[str] = []
    lost: list[str] = []
    progress = _DeepProgress(len(sample), mode=c.progress, stream=stream)
    k = min(NEIGHBOURS, db.count())
    for lo in range(0, len(sample), DEEP_BATCH):
        rows = db.held(sample[lo:lo + DEEP_BATCH], include=("documents", "embeddings"))
        ids = list(rows)
        texts = [rows[i]["documents"] or "" for i in ids]
        stored = [np.asarray(rows[i]["embeddings"], dtype=np.float32) for i in ids]
        again = embedder.encode(texts)
        far += [f"{i}(cos={cos:.4f})" for i, cos in zip(ids, map(_cosine, stored, again)) if not cos >= deep.tolerance]
        hits = db.nearest(stored, k) if ids else []
        lost += [i for i, text, found in zip(ids, texts, hits) if not _finds_itself(i, text, found)]
        progress.advance(docs=len(ids))
    progress.close()
    drawn = f"{len(sample)} sampled (seed {deep.seed})" if deep.size else f"all {len(sample)} chunks"
    return [_check("embedding", not far, f"{drawn}: {len(far)} re-embed below cosine {deep.tolerance} {far[:SHOW]}",
                   REEMBED),
            _check("findable", not lost, f"{drawn}: {len(lost)} not found by their own vector {lost[:SHOW]}", rewrite)]


def _cosine(stored: np.ndarray, again) -> float:
    """NaN (a failure) when the shapes differ or a vector is zero."""
    again = np.asarray(again, dtype=np.float64)
    stored = stored.astype(np.float64)
    norms = float(np.linalg.norm(stored) * np.linalg.norm(again))
    return float(stored @ again) / norms if stored.shape == again.shape and norms else math.nan


def _finds_itself(chunk_id: str, text: str, hits: list[tuple[str, float, str | None]]) -> bool:
    """Its own point comes back nearest: itself, or a tie with a chunk of exactly the same text."""
    return any(distance <= SAME_POINT and (hit == chunk_id or document == text) for hit, distance, document in hits)


class _DeepProgress(Progress):
    """Progress's pacing (live on a terminal, a line every few seconds in a log), counting chunks audited."""

    def _draw(self, now: float) -> None:
        rate = self.docs / max(now - self.started, 1e-9)
        eta = f"{(self.total_docs - self.docs) / rate:.0f}s" if rate > 0 else "?"
        line = f"[DEEP] {self.docs}/{self.total_docs} chunks re-embedded and looked up ({rate:.1f}/s, eta {eta})"
        self.stream.write(("\r" + line + "\x1b[K") if self.live else line + "\n")
        self.stream.flush()


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
