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


@dataclass
class Diff:
    lost: list[str] = field(default_factory=list)  # golden ids missing
    orphans: list[str] = field(default_factory=list)  # ids the golden lacks
    duplicated: int = 0  # extra ids holding the same (uri, chunk_index), beyond what the golden holds
    mismatched: list[str] = field(default_factory=list)  # same id, other document/metadata/vector
    manifest_ok: bool = True


def read(folder: Path, s: Scenario) -> Facts:
    import chromadb
    from chromadb.api.client import SharedSystemClient
    from chroma_resume import state, verify

    c = engine_config(folder, s)
    try:
        client = chromadb.PersistentClient(path=str(folder / "db"))
        got = client.get_collection(COLLECTION).get(include=["documents", "metadatas", "embeddings"])
        rows = {i: (d, m, np.asarray(e, dtype=np.float32))
                for i, d, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"])}
        with contextlib.redirect_stdout(io.StringIO()):
            result = verify.verify(c)
    finally:
        SharedSystemClient.clear_system_cache()  # one client per folder would otherwise pile up
    paths = state.paths(c)
    manifest = state.load_manifest(paths["manifest"])
    documents = {uri: (e.doc_id, e.content_sha256, e.n_chunks) for uri, e in (manifest.documents if manifest else {}).items()}
    failed = "; ".join(f"{ch.name}: {ch.detail}" for ch in result.checks if not ch.ok)
    return Facts(rows, documents, os.path.exists(paths["wal"]), result.ok, failed)


def diff(golden: Facts, got: Facts) -> Diff:
    d = Diff()
    d.lost = sorted(set(golden.rows) - set(got.rows))
    d.orphans = sorted(set(got.rows) - set(golden.rows))
    held, expected = _positions(got), _positions(golden)
    d.duplicated = sum(max(0, n - expected.get(key, 1)) for key, n in held.items())
    for i in sorted(set(golden.rows) & set(got.rows)):
        (gd, gm, gv), (d2, m2, v2) = golden.rows[i], got.rows[i]
        if gd != d2 or gm != m2 or gv.shape != v2.shape or not np.allclose(gv, v2, atol=VECTOR_ATOL, rtol=0):
            d.mismatched.append(i)
    d.manifest_ok = golden.documents == got.documents
    return d


def _positions(facts: Facts) -> Counter:
    return Counter((m.get("source_uri"), m.get("chunk_index")) for _, m, _ in facts.rows.values())
