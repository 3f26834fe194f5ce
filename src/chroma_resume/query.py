"""`chroma-resume query "text"`: the nearest chunks of an index, for a quick look without writing code.

The question is embedded with the index's own model, pooling and maximum length (and a BGE model's query
instruction, as `verify --queries` asks), then Chroma's index is searched as any client would search it.
Opens the collection read-only: a missing one is an error, never a new empty one.
"""
from __future__ import annotations

import msgspec

from . import embedders, models, store
from .config import Config
from .errors import UsageError

SNIPPET_CHARS = 160


class Hit(msgspec.Struct, frozen=True):
    source: str  # the document's source_uri
    chunk_id: str
    chunk_index: int
    distance: float  # in the collection's space (cosine: 1 - cosine similarity)
    text: str


def nearest(c: Config, text: str, top_k: int = 5) -> list[Hit]:
    if top_k < 1:
        raise UsageError(f"--top-k {top_k}: at least 1")
    if not text.strip():
        raise UsageError("query: give the text to search for")
    # A client creates its folder and chroma.sqlite3 on opening: a typo in --db must not leave one behind
    db = None if store.embedded_store_missing(c) else store.open_store(c)
    if db is None or db.count() == 0:
        raise UsageError(f"collection {c.collection!r} is missing or empty: build it first (chroma-resume build)")
    vector = embedders.load(c).encode([models.query_instruction(c.embed_model) + text])[0]
    return [Hit(meta.get("source_uri", "?"), chunk_id, meta.get("chunk_index", 0), distance, document or "")
            for chunk_id, distance, document, meta in db.search(vector, min(top_k, db.count()))]

def lines(hits: list[Hit]) -> list[str]:
    """`1. 0.123  guide/resume.md#2  the first words of the chunk…`, nearest first."""
    out = []
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(hit.text.split())
        snippet = snippet if len(snippet) <= SNIPPET_CHARS else snippet[:SNIPPET_CHARS - 1] + "…"
        out.append(f"{rank}. distance={hit.distance:.4f}  {hit.source}#{hit.chunk_index}  {snippet}")
    return out
