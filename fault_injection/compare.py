"""What a finished folder holds, read back independently, and how it differs from the golden.

Chroma is read with its own client (not the engine's store), the manifest and WAL as
files; `verify` is the engine's CI gate run on the same folder.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .scenarios import COLLECTION, Scenario, engine_config

VECTOR_ATOL = 1e-5  # the real model batches texts differently after a resume: float noise, not drift


@dataclass
class Facts:
    rows: dict[str, tuple]  # id -> (document, metadata, vector)
    documents: dict[str, tuple]  # manifest: uri -> (doc_id, content_sha256, n_chunks)
    wal_present: bool
    verify_ok: bool
    verify_detail: str = ""
    space: str | None = None  # the distance the collection's index really uses
    fingerprint: str | None = None  # the schema_hash the collection's metadata records

    @property
    def stale(self) -> set[str]:
        """Ids held beyond the manifest's generations (what `--sync-mode none` leaves)."""
        from chroma_resume import state

        expected = {i for doc_id, sha, n in self.documents.values() for i in state.generation_ids(doc_id, sha, n)}
        return set(self.rows) - expected


@dataclass
class Diff:
    lost: list[str] = field(default_factory=list)  # golden ids missing
    orphans: list[str] = field(default_factory=list)  # ids the golden lacks
    duplicated: int = 0  # extra ids holding the same (uri, chunk_index), beyond what the golden holds
    mismatched: list[str] = field(default_factory=list)  # same id, other document/metadata/vector
    manifest_ok: bool = True


def read(folder: Path, s: Scenario, final: bool = True) -> Facts:
    """`final`: with the options of the runs after the crash (else those of the first run)."""
    from chroma_resume import state, store
    from chroma_resume.verify import verify

    c = engine_config(folder, s, final)
    with _collection(folder, s, final) as col:
        got = col.get(include=["documents", "metadatas", "embeddings"])
        rows = {i: (d, m, np.asarray(e, dtype=np.float32))
                for i, d, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"])}
        space = ((col.configuration or {}).get("hnsw") or {}).get("space") or (col.metadata or {}).get("hnsw:space")
        fingerprint = (col.metadata or {}).get(store.SCHEMA_KEY)
        with contextlib.redirect_stdout(io.StringIO()):
            result = verify(c)
    paths = state.paths(c)
    manifest = state.load_manifest(paths["manifest"])
    documents = {uri: (e.doc_id, e.content_sha256, e.n_chunks) for uri, e in (manifest.documents if manifest else {}).items()}
    failed = "; ".join(f"{ch.name}: {ch.detail}" for ch in result.checks if not ch.ok)
    return Facts(rows, documents, os.path.exists(paths["wal"]), result.ok, failed, space, fingerprint)


def ids(folder: Path, s: Scenario) -> set[str]:
    """Every id the folder's collection holds now (its --db under the final options)."""
    with _collection(folder, s) as col:
        return set(col.get(include=[])["ids"])


@contextlib.contextmanager
def _collection(folder: Path, s: Scenario, final: bool = True):
    import chromadb
    from chromadb.api.client import SharedSystemClient

    from chroma_resume import chroma_function, config  # noqa: F401  registers the collections' embedding function

    try:
        c = engine_config(folder, s, final)
        yield chromadb.PersistentClient(path=config.path(c, c.db)).get_collection(COLLECTION)
    finally:
        SharedSystemClient.clear_system_cache()  # one client per folder would otherwise pile up


def diff(golden: Facts, got: Facts, may_differ: set[str] = frozenset()) -> Diff:
    """`may_differ`: golden ids whose presence either way is right (neither lost nor orphaned)."""
    d = Diff()
    d.lost = sorted(set(golden.rows) - set(got.rows) - may_differ)
    d.orphans = sorted(set(got.rows) - set(golden.rows))
    held, expected = _positions(got, may_differ), _positions(golden, may_differ)
    d.duplicated = sum(max(0, n - expected.get(key, 1)) for key, n in held.items())
    for i in sorted(set(golden.rows) & set(got.rows)):
        (gd, gm, gv), (d2, m2, v2) = golden.rows[i], got.rows[i]
        if gd != d2 or gm != m2 or gv.shape != v2.shape or not np.allclose(gv, v2, atol=VECTOR_ATOL, rtol=0):
            d.mismatched.append(i)
    d.manifest_ok = golden.documents == got.documents
    return d


def _positions(facts: Facts, leave_out: set[str]) -> Counter:
    return Counter((m.get("source_uri"), m.get("chunk_index")) for i, (_, m, _) in facts.rows.items()
                   if i not in leave_out)
