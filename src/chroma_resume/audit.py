"""What Chroma holds, read back from its rows, for when no record can vouch for the manifest.

A build trusts "unchanged" from the manifest only while an unbroken chain of records (manifest,
WAL) covers every run that wrote to the collection (DESIGN §13). A run that could leave neither
(`--wal off`, `--write-state false`, a run killed without a WAL) marks the collection before its
first write; the next build that finds such a mark unvouched for audits instead: it reads every
row's metadata and text (no vectors, no model) and rebuilds the manifest from what is really
there. The plan then treats that as the truth: a document whose rows are whole and current is
unchanged, one with half-rewritten or missing rows is written again (chunk-level resume keeps
every stored vector whose text is unchanged), and every other generation is deleted.
"""
from __future__ import annotations

import msgspec

from . import state
from .state import DocEntry, Generation, Manifest


class Audit(msgspec.Struct, kw_only=True):
    documents: dict[str, DocEntry]  # uri -> the whole generation Chroma holds for it
    leftovers: list[Generation]  # every other generation with rows in Chroma: deleted unless current
    rows: int = 0
    broken: int = 0  # generations with missing or inconsistent rows


def audit(db, manifest: Manifest | None) -> Audit:
    """Group the collection's rows by generation and keep, per uri, one whole generation: every chunk
    present and each row exactly as a build writes it (state.row_is_chunk). Among several whole ones
    the manifest's is preferred (the plan deletes the others when they are not current)."""
    groups: dict[tuple[str, str, str], dict[int, tuple[dict, str]]] = {}
    rows = 0
    for row in db.scan(include=("metadatas", "documents")):
        rows += 1
        meta = row["metadata"] or {}
        key = (str(meta.get("source_uri", "")), str(meta.get("doc_id", "")), str(meta.get("content_sha256", "")))
        index = meta.get("chunk_index")
        groups.setdefault(key, {})[index if isinstance(index, int) else -1] = (meta, row["document"])
    known = manifest.documents if manifest is not None else {}
    documents: dict[str, DocEntry] = {}
    leftovers: list[Generation] = []
    broken = 0
    for (uri, doc_id, sha), chunks in sorted(groups.items()):
        entry = _whole(uri, chunks, known.get(uri))
        if entry is None:
            broken += 1
        elif uri not in documents or _is_manifests(entry, known.get(uri)):
            if uri in documents:
                leftovers.append(_generation(uri, documents[uri]))
            documents[uri] = entry
            continue
        leftovers.append(Generation(uri, doc_id, sha, _span(chunks)))
    return Audit(documents=documents, leftovers=leftovers, rows=rows, broken=broken)


def _whole(uri: str, chunks: dict[int, tuple[dict, str]], known: DocEntry | None) -> DocEntry | None:
    first = chunks.get(0)
    if first is None or not isinstance(first[0].get("n_chunks"), int):
        return None
    entry = state.entry_from_metadata(first[0], known.updated_at if known is not None else "")
    if set(chunks) != set(range(entry.n_chunks)):
        return None
    if all(state.row_is_chunk(meta, text, uri, entry, i) for i, (meta, text) in chunks.items()):
        return entry
    return None


def _is_manifests(entry: DocEntry, known: DocEntry | None) -> bool:
    return known is not None and (known.doc_id, known.content_sha256) == (entry.doc_id, entry.content_sha256)


def _generation(uri: str, entry: DocEntry) -> Generation:
    return Generation(uri, entry.doc_id, entry.content_sha256, entry.n_chunks)


def _span(chunks: dict[int, tuple[dict, str]]) -> int:
    """Enough ids to cover every row of a broken generation (delete by generation_ids)."""
    declared = [m.get("n_chunks") for m, _ in chunks.values() if isinstance(m.get("n_chunks"), int)]
    return max([max(chunks) + 1, *declared])
