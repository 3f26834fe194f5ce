"""`chroma-resume build|resume-status|verify|clean-wal`: parse options, call the package.

Option values come from three layers, last wins: built-in defaults (Config),
the `[tool.chroma-resume]` table of ./pyproject.toml (or an index's table, `--index NAME`),
the command line. The doit tasks (doit_tasks.py) use the same OPTIONS table (options.py) and `resolve_config`,
so every face agrees.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import config as cfg
from . import embedders, indexes, models, schema
from .console import make_output_safe
from .errors import ChromaResumeError, UsageError
from .options import DRY_RUN_HELP, KEEP_HELP, OPTION_GROUPS, OPTIONS


def resolve_config(given: dict, folder: str = ".", index: str | None = None) -> cfg.Config:
    """Defaults < the pyproject table (the index's tables, see indexes.py) < given options (None = not given)."""
    return indexes.resolve(indexes.find(folder, index), given)


def describe(c: cfg.Config) -> str:
    """The effective configuration, shown at the top of every command."""
    source = c.docs or c.units
    return (f"[CONFIG] corpus={source} db={cfg.db_identity(c)} collection={c.collection} "
            f"state_root={cfg.path(c, c.state_root)} embed_model={c.embed_model} backend={c.backend} "
            f"runs={embedders.describe(c)} "
            f"chunk_chars={c.chunk_chars} "
            f"overlap_chars={c.overlap_chars} min_chunk_chars={c.min_chunk_chars} "
            f"max_length={models.effective_max_length(c) or 'model default'} schema_hash={schema.schema_hash(c)}")


# ---- commands ----------------------------------------------------------------------

def cmd_build(c: cfg.Config, args) -> int:
    if getattr(args, "dry_run", False):
        from .dryrun import dry_run
        print("\n".join(dry_run(c).lines()))
        return 0
    from .build import build
    text = sys.stderr if args.json else sys.stdout  # stdout: one JSON object, with --json
    summary = build(c, out=text)
    fields = _fields(summary)
    # One write per summary, headed by its index: under `doit -n 2` two builds' summaries never interleave.
    if args.json:
        print(json.dumps(fields), flush=True)
        print(finished(c, summary, args.index), file=sys.stderr, flush=True)
    else:
        print("\n".join([f"[SUMMARY] index {args.index or c.collection}",
                         *(f"{key}={value}" for key, value in fields.items()), finished(c, summary, args.index)]),
              flush=True)
    if summary.store_set_aside:  # a rebuilt store must prove itself before anyone uses it
        return _verified(c, args.index)
    if summary.docs_processed == 0 and summary.chunks_deleted == 0:
        print("[BUILD] up to date: nothing embedded, nothing deleted", file=text)
    return 0


def finished(c: cfg.Config, summary, index: str | None) -> str:
    """The build's end in words, and the next step: what a person reads; the key=value lines are for scripts."""
    from .commands import command_line
    done = (f"[DONE] collection {c.collection!r} in {cfg.db_identity(c)} holds {summary.docs_current} document(s), "
            f"{summary.expected_chunks} chunk(s); this run embedded {summary.chunks_embedded}, took "
            f"{summary.chunks_from_cache} from the cache and deleted {summary.chunks_deleted} in "
            f"{summary.elapsed_sec:.1f} s.")
    return (f"{done} Next: check it with `{command_line(c, 'verify', index=index)}`, search it with "
            f"`{command_line(c, 'query', 'your question', index=index)}`")


def cmd_repair(c: cfg.Config, args) -> int:
    """A build that checks the embedded store deeply and rebuilds a broken one (whatever
    --on-store-corrupt and --store-check say), then verify."""
    import msgspec

    from .build import build
    summary = build(msgspec.structs.replace(c, on_store_corrupt="rebuild", store_check="deep"))
    verdict = f"store broken: set aside at {summary.store_set_aside}" if summary.store_set_aside else \
        "store sound (checked deeply)"
    print(f"[REPAIR] {verdict}; "
          f"chunks_embedded={summary.chunks_embedded} chunks_from_cache={summary.chunks_from_cache}")
    return _verified(c, args.index)


def _verified(c: cfg.Config, index: str | None) -> int:
    from .verify import verify
    result = verify(c, index=index)
    for check in result.checks:
        print(f"[{'PASS' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    if not result.ok and result.fix:
        print(f"fix: {result.fix}", file=sys.stderr)
    return 0 if result.ok else 1


def cmd_status(c: cfg.Config, args) -> int:
    from .status import status, summary
    report = status(c)
    if args.json:
        print(json.dumps(report))
    else:
        print("\n".join(summary(report)))
        for key, value in report.items():
            shown = "none" if value is None else json.dumps(value) if isinstance(value, (list, dict, bool)) else value
            print(f"{key}={shown}")
    return 0


def cmd_verify(c: cfg.Config, args) -> int:
    from .verify import prepare_output, write_junit, write_report
    given = ((args.report, write_report), (args.junit, write_junit))
    if "" in (args.report, args.junit):
        raise UsageError("--report and --junit need a file name")
    outputs = [(cfg.path(c, target), write) for target, write in given if target]
    for target, _ in outputs:  # a bad path fails now (exit 2), not after the audit
        prepare_output(target)
    result = checked(c, args)
    for target, write in outputs:  # first: CI reads them whatever happens to the console
        write(result, target)
    for check in result.checks:
        print(f"[{'PASS' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
        if check.fix:
            print(f"       fix: {check.fix}")
    if result.deep is not None:
        print(f"[DEEP] seed={result.deep.seed} tolerance={result.deep.tolerance} sampled={len(result.sample)} "
              f"ids={' '.join(result.sample) if result.deep.size else 'all'}")
    if result.ok:
        print("verify: ok")
        return 0
    print(f"verify: FAILED ({', '.join(ch.name for ch in result.checks if not ch.ok)})", file=sys.stderr)
    if result.fix:  # a server's broken store has none to run: its check says what to do
        print(f"fix: {result.fix}", file=sys.stderr)
    return 1


def checked(c: cfg.Config, args):
    """verify's checks, with the golden questions' retrieval check when --queries names them (the CLI,
    doit and the Python API alike). args: fresh, deep, seed, tolerance, queries, top_k, min_recall, index."""
    from .verify import deep_options, verify
    deep = deep_options(args.deep, args.seed, args.tolerance)
    questions = _golden_questions(c, args)
    result = verify(c, fresh=args.fresh, deep=deep, index=args.index)
    if questions:
        from .retrieval import evaluate
        result.retrieval, check = evaluate(c, cfg.path(c, args.queries), questions, args.top_k, args.min_recall,
                                           args.index)
        result.checks.append(check)
    return result


def _golden_questions(c: cfg.Config, args) -> list:
    """verify --queries FILE.jsonl (with --top-k, --min-recall): read and checked before the audit."""
    if getattr(args, "queries", None) is None:
        for name in ("top_k", "min_recall"):
            if getattr(args, name, None) is not None:
                raise cfg.UsageError(f"--{name.replace('_', '-')} goes with --queries FILE.jsonl")
        return []
    from .retrieval import DEFAULT_TOP_K, load_questions
    if args.top_k is None:
        args.top_k = DEFAULT_TOP_K
    if args.min_recall is None:
        args.min_recall = 0.0
    if args.top_k < 1 or not 0.0 <= args.min_recall <= 1.0:
        raise cfg.UsageError("--top-k must be at least 1 and --min-recall between 0 and 1")
    return load_questions(cfg.path(c, args.queries))


def cmd_query(c: cfg.Config, args) -> int:
    from .query import lines, nearest
    hits = nearest(c, args.text, args.top_k)
    if args.json:
        import msgspec
        print(json.dumps(msgspec.to_builtins(hits)))
    else:
        print("\n".join(lines(hits)))
    return 0


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
    from .indexes import fingerprints_sharing_cache
    kept = fingerprints_sharing_cache(c, folder=c.root) if args.keep == "current" else []  # --root: its pyproject
    for key, value in cache_prune(c, keep=args.keep, older_than_days=args.older_than_days, also_keep=kept).items():
        print(f"{key}={value}")
    return 0


def _fields(struct) -> dict:
    import msgspec
    return msgspec.to_builtins(struct)


COMMANDS = {
    "build": (cmd_build, "build or resume the index"),
    "resume-status": (cmd_status, "read-only report of the state, the WAL and what a build would do"),
    "verify": (cmd_verify, "check that the collection matches the manifest (CI gate)"),
    "query": (cmd_query, "the chunks nearest to a text, with source, distance and a snippet (a quick look)"),
    "clean-wal": (cmd_clean_wal, "remove or archive the WAL of a finished run"),
    "repair": (cmd_repair, "set an unreadable embedded Chroma folder aside, rebuild it from the cache, verify"),
    "cache-stats": (cmd_cache_stats, "what the embedding cache holds, per model fingerprint (loads no model)"),
    "cache-prune": (cmd_cache_prune, "drop embedding cache entries of other models or unused for N days, then vacuum"),
}


ABOUT = ("Build and keep a Chroma vector index of a folder of documents (or a JSONL file of units): "
         "incremental (only added and changed documents are embedded, removed ones deleted), resumable after "
         "any crash (a write-ahead log records what Chroma accepted), and checkable (verify is a CI gate).")
EXIT_CODES = ("exit codes: 0 ok, 1 a check failed (verify, --strict-sync), 2 usage or input error, 3 another "
              "writer holds the lock, 4 WAL corrupt, 5 Chroma or the disk failed (unreachable after retries, "
              "unreadable store), 130 interrupted. `chroma-resume COMMAND --help` lists every option.")


def parser() -> argparse.ArgumentParser:
    from .version import __version__
    top = argparse.ArgumentParser(prog="chroma-resume", description=ABOUT, epilog=EXIT_CODES)
    top.add_argument("--version", action="version", version=f"chroma-resume {__version__}")
    subs = top.add_subparsers(dest="command", required=True)
    kinds = {option: (kind, option_help) for option, kind, option_help in OPTIONS}
    for name, (_, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        which = sub.add_argument_group("which index")
        which.add_argument("--index", metavar="NAME", help="which [tool.chroma-resume.indexes.NAME] table to use")
        if name != "query":
            which.add_argument("--all", action="store_true",
                               help="every index of pyproject.toml, one after another (exit: the most serious)")
        for group, names in OPTION_GROUPS.items():
            options = sub.add_argument_group(f"{group} options")
            for option in names:
                kind, option_help = kinds[option]
                dest = option.replace("-", "_")
                if isinstance(kind, tuple):
                    options.add_argument(f"--{option}", dest=dest, choices=kind, help=option_help)
                else:
                    options.add_argument(f"--{option}", dest=dest, type=kind if kind in (int, float) else str,
                                         metavar="true|false" if kind == "bool" else None, help=option_help)
        sub = sub.add_argument_group(f"{name} options")
        if name == "build":
            sub.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
            sub.add_argument("--json", action="store_true", help="the summary as one JSON object instead of key=value "
                                                                 "lines (the sentence in words goes to stderr)")
        if name == "resume-status":
            sub.add_argument("--json", action="store_true", help="one JSON object instead of key=value lines")
        if name == "query":
            sub.add_argument("text", help="what to search for")
            sub.add_argument("--top-k", type=int, default=5, metavar="K", help="chunks to show (default 5)")
            sub.add_argument("--json", action="store_true", help="one JSON list of hits instead of lines")
        if name == "verify":
            sub.add_argument("--fresh", action="store_true",
                             help="also fail when the corpus changed or re-chunks to other texts")
            sub.add_argument("--report", metavar="FILE.json", help="write the checks as JSON")
            sub.add_argument("--junit", metavar="FILE.xml", help="write the checks as JUnit XML")
            sub.add_argument("--deep", metavar="N|all", help="re-embed N sampled chunks (or all), compare with the "
                                                             "stored vectors and check Chroma finds each one")
            sub.add_argument("--seed", type=int, help="seed of the --deep sample (default 0)")
            sub.add_argument("--tolerance", type=float, help="least cosine of a re-embedded chunk (default 0.999)")
            sub.add_argument("--queries", metavar="FILE.jsonl", help="golden questions: report recall@k and MRR")
            sub.add_argument("--top-k", type=int, metavar="K", help="hits per golden question (default 5)")
            sub.add_argument("--min-recall", type=float, metavar="R",
                             help="fail when recall@k of the golden questions is below R (default 0: report only)")
        if name == "clean-wal":
            sub.add_argument("--force", action="store_true", help="also remove an unfinished run's WAL")
            sub.add_argument("--archive", metavar="DIR", help="gzip the WAL into DIR instead of deleting it")
        if name == "cache-prune":
            sub.add_argument("--keep", choices=("current", "all"), default="current", help=KEEP_HELP)
            sub.add_argument("--older-than-days", type=float, metavar="N", help="also drop entries unused for N days")
    return top


def configured(options: dict, index: str | None = None) -> cfg.Config:
    """The Config of given options (None = not given) over the index's tables, the environment set for it."""
    # --root names the project: its pyproject.toml, so a printed fix runs the same from any folder
    c = resolve_config(options, folder=options.get("root") or ".", index=index)
    # The hub library reads this when first imported: downloads only when asked for (models.preflight
    # refuses a hub model missing from the local cache at once, instead of a minute of retries).
    os.environ["HF_HUB_OFFLINE"] = "0" if c.model_download else os.environ.get("HF_HUB_OFFLINE", "1")
    return c


def run(command: str, options: dict, extra, index: str | None = None) -> int:
    """Shared by the CLI and the doit tasks: resolve the config, show it, run the command."""
    make_output_safe()  # a path the console's code page cannot hold must not end the run
    try:
        c = configured(options, index)
        if command in ("build", "repair"):
            _refuse_writing_another_index(index, options)
        machine_output = getattr(extra, "json", False)  # keep stdout one JSON object
        print(describe(c), file=sys.stderr if machine_output else sys.stdout, flush=True)
        extra.index = index  # printed fixes name the index they are about
        return COMMANDS[command][0](c, extra)
    except ChromaResumeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted at once (second signal); the WAL is intact, rerun to resume", file=sys.stderr)
        return 130


def _refuse_writing_another_index(index: str | None, options: dict) -> None:
    """`build --index docs --collection notes` would delete index notes' documents from its
    collection and fill it with docs': the tables' shared-collection check, made on this run's
    options (the other indexes as their tables say), as doit makes it for its sub-tasks."""
    root = options.get("root")
    if shared := indexes.group_refusal(index, options, {"root": root}, root or "."):
        raise shared


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _, _ in OPTIONS}
    if getattr(args, "all", False):
        return _every_index(args, options)
    if args.command == "verify":
        _gate_defaults(args)
    return run(args.command, options, args, args.index)


def _every_index(args, options: dict) -> int:
    """`--all`: the command for each index of pyproject.toml in table order; every index runs, and the exit
    code is the most serious of theirs (an interrupt stops at once)."""
    from types import SimpleNamespace

    from . import indexes
    try:
        if args.index:
            raise UsageError("give --index NAME or --all, not both")
        if getattr(args, "report", None) or getattr(args, "junit", None):
            raise UsageError("--all writes no --report/--junit: `doit verify --report FILE` writes one for every index")
        names = [index.name for index in indexes.load(args.root or ".")]
        if args.command in ("build", "repair") and (shared := indexes.group_refusal(None, {}, options, args.root or ".")):
            raise shared  # `--all --collection X` gives X to every index: each would delete the others' documents
    except ChromaResumeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    codes = []
    for name in names:
        print(f"[INDEX] {name or 'default'}", flush=True)
        each = SimpleNamespace(**vars(args))
        each.index = name
        if args.command == "verify":
            _gate_defaults(each)
        codes.append(run(args.command, dict(options), each, name))
        if codes[-1] == 130:
            break
    return max(codes, key=lambda code: (code == 130, code))


def _gate_defaults(args) -> None:
    """verify's --queries/--top-k/--min-recall default to the index's table (as under doit)."""
    try:
        indexes.gate_defaults(indexes.find(args.root or ".", args.index), args)
    except ChromaResumeError:
        return  # run() reports it with its exit code


if __name__ == "__main__":
    sys.exit(main())
