"""`chroma-resume build|resume-status|verify|clean-wal`: parse options, call the package.

Option values come from three layers, last wins: built-in defaults (Config),
the `[tool.chroma-resume]` table of ./pyproject.toml, the command line. dodo.py
uses the same OPTIONS table and `resolve_config`, so every face agrees.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib

from . import config as cfg
from .errors import ChromaResumeError

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
    ("fp16", ("auto", "on", "off"), "half precision; auto = on for CUDA, off for CPU"),
    ("max-length", int, "tokens per chunk the model sees (default: the model's declared maximum)"),
    ("embed-batch", int, "texts per model forward pass (default 32 on a CPU, 256 on CUDA)"),
    ("embed-cache", str, "embedding cache file, relative to --state-root, or off (default embed-cache.sqlite3)"),
    ("upsert-batch", int, "chunks per upsert and WAL commit group (default 256)"),
    ("chunk-chars", int, "chunk size budget in characters (default 1200)"),
    ("overlap-chars", int, "overlap between chunks (default 150)"),
    ("min-chunk-chars", int, "smallest chunk worth keeping (default 200)"),
    ("hnsw-space", ("cosine", "l2", "ip"), "distance of a new collection (default cosine)"),
    ("sync-mode", ("incremental", "delete-stale", "none"), "what to sync (default incremental)"),
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
    ("backend", ("auto", "torch", "onnx"), "runtime of the model on a CPU: onnx = ONNX Runtime export checked "
                                           "against torch; auto = onnx on a CPU, torch on a GPU (default auto)"),
]


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise cfg.UsageError(f"expected true or false, got {value!r}")


def project_defaults(folder: str = ".") -> dict:
    """The `[tool.chroma-resume]` table of folder/pyproject.toml, if any."""
    location = os.path.join(folder, "pyproject.toml")
    try:
        with open(location, "rb") as fh:
            table = tomllib.load(fh).get("tool", {}).get("chroma-resume", {})
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise cfg.UsageError(f"{location}: {exc}") from None
    known = {name for name, _, _ in OPTIONS}
    unknown = set(table) - known
    if unknown:
        raise cfg.UsageError(f"{location} [tool.chroma-resume]: unknown key(s) {', '.join(sorted(unknown))}")
    return table


def resolve_config(given: dict, folder: str = ".") -> cfg.Config:
    """Defaults < pyproject table < given options (None = not given)."""
    merged = {**project_defaults(folder), **{k.replace("_", "-"): v for k, v in given.items() if v is not None}}
    if "wal" in merged:
        merged["wal"] = parse_bool(merged["wal"])
    for name, kind, _ in OPTIONS:
        if kind == "bool" and name in merged:
            merged[name] = parse_bool(merged[name])
    return cfg.make_config(**merged)


def describe(c: cfg.Config) -> str:
    """The effective configuration, shown at the top of every command."""
    source = c.docs or c.units
    return (f"[CONFIG] corpus={source} db={cfg.db_identity(c)} collection={c.collection} "
            f"state_root={cfg.path(c, c.state_root)} embed_model={c.embed_model} chunk_chars={c.chunk_chars} "
            f"overlap_chars={c.overlap_chars} min_chunk_chars={c.min_chunk_chars} "
            f"max_length={cfg.effective_max_length(c) or 'model default'} schema_hash={cfg.schema_hash(c)}")


# ---- commands ----------------------------------------------------------------------

def cmd_build(c: cfg.Config, args) -> int:
    from .build import build
    summary = build(c)
    for key, value in _fields(summary).items():
        print(f"{key}={value}")
    if summary.store_set_aside:  # a rebuilt store must prove itself before anyone uses it
        return _verified(c)
    if summary.docs_processed == 0 and summary.chunks_deleted == 0:
        print("[BUILD] up to date: nothing embedded, nothing deleted")
    return 0


def cmd_repair(c: cfg.Config, args) -> int:
    """A build that rebuilds an unreadable embedded store (whatever --on-store-corrupt says), then verify."""
    import msgspec

    from .build import build
    summary = build(msgspec.structs.replace(c, on_store_corrupt="rebuild"))
    print(f"[REPAIR] {'store set aside at ' + summary.store_set_aside if summary.store_set_aside else 'store readable'}; "
          f"chunks_embedded={summary.chunks_embedded} chunks_from_cache={summary.chunks_from_cache}")
    return _verified(c)


def _verified(c: cfg.Config) -> int:
    from .verify import verify
    result = verify(c)
    for check in result.checks:
        print(f"[{'PASS' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    if not result.ok:
        print(f"fix: {result.fix}", file=sys.stderr)
    return 0 if result.ok else 1


def cmd_status(c: cfg.Config, args) -> int:
    from .status import status
    report = status(c)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) else value}")
    return 0


def cmd_verify(c: cfg.Config, args) -> int:
    from .verify import deep_options, prepare_output, verify, write_junit, write_report
    deep = deep_options(args.deep, args.seed, args.tolerance)
    given = ((args.report, write_report), (args.junit, write_junit))
    outputs = [(cfg.path(c, target), write) for target, write in given if target]
    for target, _ in outputs:  # a bad path fails now (exit 2), not after the audit
        prepare_output(target)
    result = verify(c, fresh=args.fresh, deep=deep)
    for check in result.checks:
        print(f"[{'PASS' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
        if check.fix:
            print(f"       fix: {check.fix}")
    if result.deep is not None:
        print(f"[DEEP] seed={result.deep.seed} tolerance={result.deep.tolerance} sampled={len(result.sample)} "
              f"ids={' '.join(result.sample) if result.deep.size else 'all'}")
    for target, write in outputs:
        write(result, target)
    if result.ok:
        print("verify: ok")
        return 0
    print(f"verify: FAILED ({', '.join(ch.name for ch in result.checks if not ch.ok)})", file=sys.stderr)
    print(f"fix: {result.fix}", file=sys.stderr)
    return 1


def cmd_clean_wal(c: cfg.Config, args) -> int:
    from .clean import clean_wal
    print(clean_wal(c, force=args.force, archive=args.archive))
    return 0


def cmd_cache_stats(c: cfg.Config, args) -> int:
    from .cache import cache_stats
    for key, value in cache_stats(c).items():
        print(f"{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) else value}")
    return 0


def cmd_cache_prune(c: cfg.Config, args) -> int:
    from .cache import cache_prune
    for key, value in cache_prune(c, keep=args.keep, older_than_days=args.older_than_days).items():
        print(f"{key}={value}")
    return 0


def _fields(struct) -> dict:
    import msgspec
    return msgspec.to_builtins(struct)


COMMANDS = {
    "build": (cmd_build, "build or resume the index"),
    "resume-status": (cmd_status, "read-only report of the state, the WAL and what a build would do"),
    "verify": (cmd_verify, "check that the collection matches the manifest (CI gate)"),
    "clean-wal": (cmd_clean_wal, "remove or archive the WAL of a finished run"),
    "repair": (cmd_repair, "set an unreadable embedded Chroma folder aside, rebuild it from the cache, verify"),
    "cache-stats": (cmd_cache_stats, "what the embedding cache holds, per model fingerprint (loads no model)"),
    "cache-prune": (cmd_cache_prune, "drop embedding cache entries of other models or unused for N days, then vacuum"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="chroma-resume", description=__doc__.splitlines()[0])
    subs = top.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        for option, kind, option_help in OPTIONS:
            dest = option.replace("-", "_")
            if isinstance(kind, tuple):
                sub.add_argument(f"--{option}", dest=dest, choices=kind, help=option_help)
            else:
                sub.add_argument(f"--{option}", dest=dest, type=kind if kind in (int, float) else str,
                                 metavar="true|false" if kind == "bool" else None, help=option_help)
        if name == "resume-status":
            sub.add_argument("--json", action="store_true", help="one JSON object instead of key=value lines")
        if name == "verify":
            sub.add_argument("--fresh", action="store_true",
                             help="also fail when the corpus changed or re-chunks to other texts")
            sub.add_argument("--report", metavar="FILE.json", help="write the checks as JSON")
            sub.add_argument("--junit", metavar="FILE.xml", help="write the checks as JUnit XML")
            sub.add_argument("--deep", metavar="N|all", help="re-embed N sampled chunks (or all), compare with the "
                                                             "stored vectors and check Chroma finds each one")
            sub.add_argument("--seed", type=int, help="seed of the --deep sample (default 0)")
            sub.add_argument("--tolerance", type=float, help="least cosine of a re-embedded chunk (default 0.999)")
        if name == "clean-wal":
            sub.add_argument("--force", action="store_true", help="also remove an unfinished run's WAL")
            sub.add_argument("--archive", metavar="DIR", help="gzip the WAL into DIR instead of deleting it")
        if name == "cache-prune":
            sub.add_argument("--keep", choices=("current", "all"), default="current",
                             help="current: only this model fingerprint's entries (default); all: every model's")
            sub.add_argument("--older-than-days", type=float, metavar="N", help="also drop entries unused for N days")
    return top


def run(command: str, options: dict, extra) -> int:
    """Shared by the CLI and dodo.py: resolve the config, show it, run the command."""
    try:
        c = resolve_config(options)
        machine_output = getattr(extra, "json", False)  # keep stdout one JSON object
        print(describe(c), file=sys.stderr if machine_output else sys.stdout, flush=True)
        return COMMANDS[command][0](c, extra)
    except ChromaResumeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted at once (second signal); the WAL is intact, rerun to resume", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _, _ in OPTIONS}
    return run(args.command, options, args)


if __name__ == "__main__":
    sys.exit(main())
