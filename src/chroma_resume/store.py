"""The Chroma side: the only module that imports chromadb.

Every call is retried with backoff a bounded number of times; after that the run
stops with the cause (the WAL stays intact, so the next run resumes).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from . import config as cfg
from . import failpoints
from .config import Config
from .errors import RuntimeFailure, UsageError

RETRY_DELAYS = (0.5, 1.0, 2.0)
SCAN_PAGE = 5000
# The collection's own metadata is the truth about what it holds (DESIGN §1, §4):
SCHEMA_KEY = "chroma_resume:schema_hash"  # the schema_hash the collection was built with
INCARNATION_KEY = "chroma_resume:incarnation"  # random id set at creation: a manifest names the collection it describes
SPACE_KEY = "hnsw:space"


class Store:
    """A collection handle plus the batch limit Chroma enforces."""

    def __init__(self, client, collection, where: str):
        self.client, self.collection, self.where = client, collection, where
        self.max_batch = _retry(where, "get_max_batch_size", client.get_max_batch_size)

    # ---- writes --------------------------------------------------------------------
    def upsert(self, ids: list[str], embeddings, documents: list[str], metadatas: list[dict]) -> None:
        for lo in range(0, len(ids), self.max_batch):
            hi = lo + self.max_batch
            _retry(self.where, "upsert", lambda: self.collection.upsert(
                ids=ids[lo:hi], embeddings=embeddings[lo:hi], documents=documents[lo:hi], metadatas=metadatas[lo:hi]))
        failpoints.fire("store.after_upsert")

    def delete(self, ids: Sequence[str], batch: int) -> None:
        step = min(batch, self.max_batch)
        for lo in range(0, len(ids), step):
            _retry(self.where, "delete", lambda: self.collection.delete(ids=list(ids[lo:lo + step])))
        failpoints.fire("store.after_delete")

    # ---- reads ---------------------------------------------------------------------
    def count(self) -> int:
        return _retry(self.where, "count", self.collection.count)

    def existing(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for lo in range(0, len(ids), self.max_batch):
            part = list(ids[lo:lo + self.max_batch])
            found.update(_retry(self.where, "get", lambda: self.collection.get(ids=part, include=[]))["ids"])
        return found

    def scan(self, include: Sequence[str] = ()) -> Iterator[dict]:
        """Page through the whole collection: {'id', 'metadata', 'embedding', 'document'} per row."""
        offset = 0
        while True:
            page = _retry(self.where, "get", lambda: self.collection.get(
                include=list(include), limit=SCAN_PAGE, offset=offset))
            if not page["ids"]:
                return
            for i, chunk_id in enumerate(page["ids"]):
                yield {"id": chunk_id,
                       "metadata": page["metadatas"][i] if "metadatas" in include else None,
                       "embedding": page["embeddings"][i] if "embeddings" in include else None,
                       "document": page["documents"][i] if "documents" in include else None}
            offset += len(page["ids"])

    def all_ids(self) -> set[str]:
        return {row["id"] for row in self.scan()}

    def dimension(self) -> int | None:
        page = _retry(self.where, "get", lambda: self.collection.get(include=["embeddings"], limit=1))
        embeddings = page["embeddings"]
        return None if embeddings is None or len(embeddings) == 0 else len(embeddings[0])

    def reset(self) -> "Store":
        """Drop and recreate the collection (schema change or lost state with --…=reset)."""
        name, metadata = self.collection.name, self.collection.metadata
        _retry(self.where, "delete_collection", lambda: self.client.delete_collection(name))
        collection = _retry(self.where, "create_collection", lambda: self.client.get_or_create_collection(
            name, metadata=metadata, embedding_function=None))
        return Store(self.client, collection, self.where)


def client(c: Config):
    import chromadb  # imported lazily: status and plan-only paths never need it

    where = cfg.db_identity(c)
    if c.chroma_host:
        return _retry(where, "connect", lambda: chromadb.HttpClient(host=c.chroma_host, port=c.chroma_port)), where
    return _retry(where, "open", lambda: chromadb.PersistentClient(path=where)), where


def open_store(c: Config, create: bool = True) -> Store | None:
    """The collection named by the config; None if it does not exist and create is False."""
    chroma_client, where = client(c)
    if not create:
        names = _retry(where, "list_collections", chroma_client.list_collections)
        if c.collection not in {getattr(n, "name", n) for n in names}:
            return None
        collection = _retry(where, "get_collection", lambda: chroma_client.get_collection(c.collection, embedding_function=None))
        return Store(chroma_client, collection, where)
    try:
        collection = chroma_client.get_or_create_collection(
            c.collection, metadata={"hnsw:space": c.hnsw_space}, embedding_function=None)
    except ValueError as exc:
        raise UsageError(f"collection {c.collection!r}: {exc}") from None
    except Exception:
        collection = _retry(where, "get_or_create_collection", lambda: chroma_client.get_or_create_collection(
            c.collection, metadata={"hnsw:space": c.hnsw_space}, embedding_function=None))
    return Store(chroma_client, collection, where)


def _retry(where: str, what: str, call: Callable):
    for attempt, delay in enumerate((*RETRY_DELAYS, None)):
        try:
            return call()
        except TypeError:
            raise  # a programming error: retrying cannot help
        except Exception as exc:  # network, server, disk (chromadb says ValueError for "cannot connect")
            if delay is None:
                raise RuntimeFailure(f"Chroma at {where}: {what} failed after {attempt + 1} attempts: "
                                     f"{type(exc).__name__}: {exc}") from None
            time.sleep(delay)
