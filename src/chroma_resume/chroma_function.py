"""The index's own embedding function, persisted with each collection a build creates, so that any chromadb
client can query it by text:

    import chromadb
    import chroma_resume.chroma_function  # registers it with chromadb (once per process)
    hits = chromadb.PersistentClient(".chroma").get_collection("docs").query(query_texts=["how do I resume?"])

chromadb stores an embedding function's name and `get_config()` in the collection's configuration and
rebuilds it by name from its registry when the collection is opened. Without this module imported the
name is unknown and chromadb refuses the text query (ValueError: "Embedding function chroma_resume not
found"), instead of ranking with its default model as it did before. The config names the model, pooling
and maximum length, and the model is loaded on the first text to embed, exactly as a build loads it
(embedders.load), so query vectors are the index's vectors. `describe(c)` is the same facts as collection
metadata (`chroma_resume:model`, …) for clients that do not run Python. Importing this module imports
chromadb: the package's `import chroma_resume` does not.
"""
from __future__ import annotations

from typing import Any

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

from . import config as cfg
from . import models
from .config import Config

NAME = "chroma_resume"
META_PREFIX = "chroma_resume:"


def _embedding_config(c: Config) -> dict[str, Any]:
    """What loads the index's model anywhere: a local model as an absolute path, anything else as named."""
    model = c.embed_model
    if not (models.is_stand_in(c) or model == cfg.DEFAULT_MODEL) and models.location(c) == cfg.path(c, model):
        model = cfg.path(c, model)
    return {"embed_model": model, "pooling": None if models.is_stand_in(c) else models.pooling(c),
            "max_length": models.effective_max_length(c),
            "backend": c.backend, "normalized": True, "query_instruction": models.query_instruction(c.embed_model)}


def describe(c: Config, dim: int) -> dict[str, Any]:
    """Collection metadata naming how its vectors were made (no None values: Chroma refuses them)."""
    facts = {**_embedding_config(c), "dim": dim}
    return {f"{META_PREFIX}{key}": value for key, value in facts.items() if value is not None}


@register_embedding_function
class IndexEmbeddingFunction(EmbeddingFunction[Documents]):
    """The build's embedder, loaded on first use (opening a collection costs no model load)."""

    def __init__(self, embed_model: str, pooling: str | None = None, max_length: int | None = None, backend: str = "auto",
                 normalized: bool = True, query_instruction: str = ""):
        self.settings = {"embed_model": embed_model, "pooling": pooling, "max_length": max_length,
                         "backend": backend, "normalized": normalized, "query_instruction": query_instruction}
        self._embedder = None

    @classmethod
    def for_config(cls, c: Config) -> "IndexEmbeddingFunction":
        return cls(**_embedding_config(c))

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002  (chromadb's keyword)
        if self._embedder is None:
            from . import embedders
            s = self.settings
            self._embedder = embedders.load(cfg.make_config(embed_model=s["embed_model"], pooling=s["pooling"],
                                                            max_length=s["max_length"], backend=s["backend"],
                                                            progress="off"))
        return [row for row in self._embedder.encode(list(input))]

    def embed_query(self, input: Documents) -> Embeddings:  # noqa: A002
        """A BGE model's query instruction before each query, as `verify --queries` asks."""
        return self([self.settings["query_instruction"] + text for text in input])

    @staticmethod
    def name() -> str:
        return NAME

    def get_config(self) -> dict[str, Any]:
        return dict(self.settings)

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> "IndexEmbeddingFunction":
        return IndexEmbeddingFunction(**config)

    def default_space(self):
        return "cosine"
