"""Every build option once: its name, kind and help, and how a true/false value is read.

The CLI (cli.py), the pyproject tables (indexes.py) and the doit tasks all read this table, so every
face agrees; it lives apart from the CLI so that indexes.py does not import the CLI that imports it.
"""
from __future__ import annotations

from .errors import UsageError

# (option, kind, help). kind: str | int | "bool" (true/false value) | a tuple of choices.
OPTIONS: list[tuple[str, object, str]] = [
    ("root", str, "base folder; relative paths resolve against it (default .)"),
    ("docs", str, "corpus folder (alternative to --units)"),
    ("units", str, "units JSONL: source_uri, text, optional doc_id/source_type/updated_at/metadata"),
    ("include", str, "space-separated globs of files to index (default '*.md *.markdown *.txt *.rst')"),
    ("exclude", str, "space-separated globs to skip"),
    ("db", str, "PersistentClient folder (default .chroma)"),
    ("chroma-host", str, "use a Chroma server (HttpClient) instead of --db"),
    ("chroma-port", int, "Chroma server port (default 8000)"),
    ("chroma-ssl", "bool", "connect to the Chroma server over HTTPS"),
    ("chroma-headers-env", str, "name of an environment variable holding the server's auth headers "
                                "(JSON object) or bearer token; never put secrets on the command line"),
    ("chroma-tenant", str, "Chroma tenant (server)"),
    ("chroma-database", str, "Chroma database (server)"),
    ("chroma-timeout", float, "seconds per Chroma request (default 60)"),
    ("retry-for", float, "seconds to keep retrying an unreachable Chroma before exit 5 (default 60)"),
    ("collection", str, "collection name (default docs)"),
    ("state-root", str, "where manifest, LATEST, WAL and lock live (default .chroma-state)"),
    ("embed-model", str, "FlagEmbedding model id or path; hash:DIM for the stand-in (default: packaged MiniLM)"),
    ("pooling", ("auto", "cls", "mean"), "pooling; auto = mean for MiniLM, cls for BGE"),
    ("device", str, "torch device: cpu, cuda, cuda:N (default cpu)"),
    ("fp16", ("auto", "on", "off"), "reduced precision under --backend auto: auto = fp16 on CUDA, bfloat16 on a CPU "
                                    "with bfloat16 units, each checked against float32 first; off = float32; on = "
                                    "fp16 on CUDA even with --backend torch"),
    ("max-length", int, "tokens per chunk the model sees (default: the model's declared maximum)"),
    ("embed-batch", int, "texts per model forward pass (default 32 on a CPU, 256 on CUDA)"),
    ("embed-cache", str, "embedding cache file, relative to --state-root, or off (default embed-cache.sqlite3)"),
    ("upsert-batch", int, "chunks per upsert and WAL commit group (default 256)"),
    ("chunk-chars", int, "chunk size budget in characters (default 1200)"),
    ("overlap-chars", int, "overlap between chunks (default 150)"),
    ("min-chunk-chars", int, "smallest chunk worth keeping (default 200)"),
    ("hnsw-space", ("cosine", "l2", "ip"), "distance of a new collection (default cosine)"),
    ("sync-mode", ("incremental", "rewrite-all", "none", "delete-stale"),
     "incremental (default): embed added and changed documents, delete the chunks of changed and removed ones; "
     "rewrite-all: the same, and every other chunk written again (vectors from the cache: mends rows Chroma lost "
     "or garbled); none: add and change only, delete nothing (kept for a later run to delete). delete-stale is "
     "the old name of rewrite-all"),
    ("on-missing-state", ("reset", "fail", "full-upsert"), "manifest missing but collection not empty"),
    ("schema-change", ("reset", "fail"), "LATEST differs from this configuration's schema"),
    ("delete-batch", int, "ids per delete call (default 500)"),
    ("strict-sync", "bool", "fail (exit 1) unless the collection holds exactly the expected ids"),
    ("write-state", "bool", "write index_state.json on success (default true)"),
    ("resume", ("auto", "off", "force"), "use an unfinished WAL (default auto)"),
    ("wal", ("on", "off"), "write the WAL (default on)"),
    ("wal-fsync", ("off", "doc", "interval"), "WAL durability policy (default doc)"),
    ("wal-fsync-interval", int, "events between fsyncs with --wal-fsync interval (default 50)"),
    ("keep-wal", "bool", "archive the WAL of a successful run instead of removing it"),
    ("on-read-error", ("skip", "fail"), "unreadable, binary or non-UTF-8 files (default skip)"),
    ("embed-log", str, "append the id of every chunk embedded to this file (audit)"),
    ("progress", ("auto", "on", "off"), "progress display on stderr (default auto)"),
    ("on-store-corrupt", ("rebuild", "fail"), "an unreadable embedded Chroma folder: set it aside and rebuild "
                                              "from the cache, or fail (default rebuild)"),
    ("store-check", ("auto", "deep"), "before a build trusts an embedded store, read every row's vector and check the "
                                      "index against the rows: auto = after an unclean end only (default), deep = always"),
    ("embed-cache-refresh", "bool", "compute every vector this run writes with the model and overwrite its cache "
                                    "entry (the fix verify --deep prints when stored vectors disagree with the model)"),
    ("model-download", "bool", "download a hub model missing from the local cache (default false: fail at once, "
                               "offline)"),
    ("allow-empty", "bool", "let a build whose corpus lists no document delete every document of a non-empty "
                            "index (default false: refused, exit 2)"),
    ("executor", ("local", "ray"), "where the model runs: this process, or actors on a Ray cluster; this process "
                                   "stays the one writer of Chroma, the cache and the WAL (default local)"),
    ("ray-address", str, "auto (the running cluster), local (start one here), HOST:PORT or ray://HOST:PORT "
                         "(default auto)"),
    ("ray-workers", int, "Ray actors, each loading the model once (default 1)"),
    ("ray-cpus-per-worker", float, "CPUs Ray reserves per actor (default 1)"),
    ("ray-gpus-per-worker", float, "GPUs Ray reserves per actor, with --device cuda (default 0)"),
    ("max-batches-in-flight", int, "upsert batches handed to the model and not yet written (default 1 locally, "
                                   "2 per Ray worker); each holds its texts and vectors in memory"),
    ("backend", ("auto", "torch", "onnx", "onnx-int8", "torch-bf16"),
     "runtime of the model: auto = the fastest checked path (fp16 on CUDA; bfloat16 on a CPU with AMX or AVX-512 "
     "BF16 where its check found it faster; else float32, through the ONNX export where one exists, else torch); "
     "torch = float32 torch, "
     "the reference; onnx = an ONNX Runtime export, made once and checked against torch; torch-bf16 = torch in "
     "bfloat16. All of these are one schema (their vectors agree within cosine 0.9999, checked). onnx-int8 = "
     "that export quantized to int8: other vectors, a schema of its own (default auto)"),
]


# --help shows the options by concern; every option of OPTIONS is in exactly one group (tests/test_cli_newcomer.py).
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "corpus": ("root", "docs", "units", "include", "exclude", "on-read-error", "allow-empty"),
    "chunking": ("chunk-chars", "overlap-chars", "min-chunk-chars"),
    "model": ("embed-model", "pooling", "max-length", "backend", "device", "fp16", "embed-batch", "model-download",
              "embed-cache", "embed-cache-refresh", "executor", "ray-address", "ray-workers", "ray-cpus-per-worker",
              "ray-gpus-per-worker", "max-batches-in-flight"),
    "store": ("db", "collection", "hnsw-space", "sync-mode", "strict-sync", "upsert-batch", "delete-batch",
              "on-store-corrupt", "store-check", "chroma-host", "chroma-port", "chroma-ssl", "chroma-headers-env",
              "chroma-tenant", "chroma-database", "chroma-timeout", "retry-for"),
    "recovery": ("state-root", "resume", "wal", "wal-fsync", "wal-fsync-interval", "keep-wal", "write-state",
                 "on-missing-state", "schema-change"),
    "output": ("progress", "embed-log"),
}
KEEP_HELP = ("current (default): keep the entries of every model an index sharing this cache uses, drop the "
             "rest; all: keep every model's entries (with --older-than-days, drop only by age)")
DRY_RUN_HELP = ("list what a build would add, change, delete and resume, by document, and stop: loads no model, "
                "writes nothing")


def parse_bool(value, option: str = "") -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    named = f"--{option}: " if option else ""
    raise UsageError(f"{named}expected true or false, got {value!r}")
