"""The index's fingerprint: everything that changes vectors or ids (DESIGN §1, §13).

Its model part is the model's content identity (models.model_fingerprint), the same one the
embedding cache keys on: a model changed behind the same name is a schema change.
"""
from __future__ import annotations

import hashlib
import json
import os

from . import config as cfg
from . import models
from .config import Config
from .errors import ModelLoadError

ID_SCHEME_VERSION = 1


def schema_fields(c: Config) -> dict:
    """The model's dimension is a function of its files, so their identity stands for it. A model
    that cannot be found has no identity: read-only commands still name a schema for it (which no
    index can carry, since a build refuses such a model before writing anything)."""
    try:
        model = models.model_fingerprint(c)
    except ModelLoadError:
        model = f"unresolved:{c.embed_model}"
    return {
        "id_scheme": ID_SCHEME_VERSION,
        "model": model,
        "chunk_chars": c.chunk_chars,
        "overlap_chars": c.overlap_chars,
        "min_chunk_chars": c.min_chunk_chars,
        "hnsw_space": c.hnsw_space,
    }


def schema_hash(c: Config) -> str:
    blob = json.dumps(schema_fields(c), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def state_dir(c: Config, schema: str | None = None) -> str:
    return os.path.join(cfg.collection_dir(c), schema or schema_hash(c))
