"""The Python face, for a notebook or a service that should not shell out:

    import chroma_resume
    summary = chroma_resume.build(docs="corpus", db=".chroma", collection="docs", embed_model="hash:64")
    result = chroma_resume.verify(docs="corpus", collection="docs", embed_model="hash:64")
    hits = chroma_resume.query("how do I resume?", docs="corpus", collection="docs", embed_model="hash:64")

Keywords are the command line's options with underscores for dashes (`embed_model=` for `--embed-model`),
valued as there or as Python values (True, 256, a list of globs), plus `index=` for `--index`. They go
through the CLI's own resolution (defaults < the pyproject tables of `root` < the keywords), so a notebook
and a shell build the same index. Errors raise the project's exceptions (errors.py: UsageError, LockHeld, …),
each carrying the exit code the command line would end with. The run's lines still go to stdout and stderr.
"""
from __future__ import annotations

from types import SimpleNamespace

from . import cli
from .config import unknown_names_error

OPTION_NAMES = [name.replace("-", "_") for name, _, _ in cli.OPTIONS]


def _config(options: dict, index: str | None):
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise unknown_names_error("keyword", unknown, OPTION_NAMES)
    return cli.configured(options, index)


def build(*, index: str | None = None, dry_run: bool = False, **options):
    """Build or resume the index; returns the run's build.Summary (or, with dry_run, the plan.DryRun: what a
    build would add, change, delete and resume, by document, computed without a model and writing nothing)."""
    c = _config(options, index)
    if dry_run:
        from .dryrun import dry_run as plan_only
        return plan_only(c)
    from .build import build as run
    return run(c)


def verify(*, index: str | None = None, fresh: bool = False, deep: str | int | None = None, seed: int | None = None,
           tolerance: float | None = None, queries: str | None = None, top_k: int | None = None,
           min_recall: float | None = None, **options):
    """Every check of `chroma-resume verify` (and the golden questions' retrieval check with `queries`);
    returns the verify.VerifyResult (`.ok`, `.checks`, `.fix`). A failed check is a result, not an exception."""
    c = _config(options, index)
    args = SimpleNamespace(index=index, fresh=fresh, deep=deep, seed=seed, tolerance=tolerance, queries=queries,
                           top_k=top_k, min_recall=min_recall)
    from . import indexes
    indexes.gate_defaults(indexes.find(options.get("root") or ".", index), args)  # the table's golden file
    return cli.checked(c, args)


def query(text: str, *, top_k: int = 5, index: str | None = None, **options):
    """The top_k chunks nearest to `text` (a list of query.Hit: source, chunk id, distance, text), embedded
    with the index's own model."""
    c = _config(options, index)
    from .query import nearest
    return nearest(c, text, top_k)


def status(*, index: str | None = None, **options) -> dict:
    """What `chroma-resume resume-status --json` prints: manifest, WAL, what a build would resume."""
    from .status import status as report
    return report(_config(options, index))
