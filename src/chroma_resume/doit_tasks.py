"""doit tasks for any repository: a user's dodo.py needs two lines.

    from chroma_resume.doit_tasks import *  # noqa: F403  build, verify, resume-status, clean-wal, ...
    DOIT_CONFIG = {"default_tasks": ["build"]}

`DOIT_CONFIG` stays the user's: without `default_tasks` a bare `doit` runs every task of the file,
maintenance ones included. Nothing runs at import; each task creator reads ./pyproject.toml when doit
loads the tasks. A repository without `[tool.chroma-resume.indexes.<name>]` tables gets plain tasks
(`doit build`); with them every task has a sub-task per index (`doit build:docs`), and the plain name
runs them all (`doit -n 2 build` in parallel: each index has its own collection, lock, WAL and manifest).
Options: `doit build --max-length 256` applies to every index, `doit build:docs --max-length 256` to one;
both override the tables, which override the built-in defaults (one OPTIONS table with the CLI).

Exit status under doit: a failed check (the CLI's exit 1) fails the task (doit exits 1); any other
non-zero exit (usage 2, lock 3, WAL 4, store 5, interrupted 130) is a task *error* (doit exits 2), so
CI tells a failed gate from a gate that could not run; `verify --report` records each index's exact code.
The rest of the package never imports this module (nor doit).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import tempfile
import uuid
from types import SimpleNamespace

from doit import task_params
from doit.exceptions import TaskError, TaskFailed

from . import cli, commands, gate, indexes
from .errors import ChromaResumeError

__all__ = ["task_build", "task_resume_status", "task_verify", "task_clean_wal", "task_repair", "task_cache_stats",
           "task_cache_prune", "task_crash_matrix"]


def _param(name: str, kind, help_text: str, default=None) -> dict:
    return {"name": name.replace("-", "_"), "long": name, "type": kind, "default": default, "help": help_text}


def _flag(name: str, help_text: str) -> dict:
    return _param(name, bool, help_text, False)


OPTION_PARAMS = [_param(name, kind if kind in (int, float) else str,
                        help_text + (f" [{'|'.join(kind)}]" if isinstance(kind, tuple) else ""))
                 for name, kind, help_text in cli.OPTIONS]
EXTRA_PARAMS = {
    "build": [_flag("dry-run", cli.DRY_RUN_HELP),
              _flag("json", "the summary as one JSON object instead of key=value lines")],
    "resume-status": [_flag("json", "one JSON object instead of key=value lines")],
    "verify": [_flag("fresh", "also fail when the corpus changed or re-chunks to other texts"),
               _param("report", str, "write one JSON report for every index verified in this run to FILE"),
               _param("junit", str, "write one JUnit XML file (a test suite per index) to FILE"),
               _param("deep", str, "re-embed N sampled chunks (or all) and check Chroma finds each one"),
               _param("seed", int, "seed of the --deep sample (default 0)"),
               _param("tolerance", float, "least cosine of a re-embedded chunk (default 0.999)"),
               _param("queries", str, "golden questions (JSONL): report recall@k and MRR (default: the index "
                                      "table's queries)"),
               _param("top-k", int, "hits per golden question (default 5)"),
               _param("min-recall", float, "fail when recall@k of the golden questions is below R (default 0)")],
    "clean-wal": [_flag("force", "also remove an unfinished run's WAL"),
                  _param("archive", str, "gzip the WAL into DIR instead of deleting it")],
    "cache-prune": [_param("keep", str, cli.KEEP_HELP + " [current|all]"),
                    _param("older-than-days", float, "also drop entries unused for N days")],
}


def _params(command: str) -> list[dict]:
    return OPTION_PARAMS + EXTRA_PARAMS.get(command, [])


def _creator(command: str):
    """Name the creator's tasks `command` for doit, options included.

    doit names a task after its creator function (`task_resume_status` -> `resume_status`) and hands the
    options typed after a name only to the creator of that name, so `doit resume-status --json` reached no
    creator and was dropped (pydoit/doit#434). An object whose `create_doit_tasks` carries a `basename` is
    named by that basename instead: the name users type, options and all, for every task alike."""
    def named(function):
        function.basename = command
        task_params(_params(command))(function)
        return SimpleNamespace(create_doit_tasks=function)
    return named


@_creator("build")
def task_build(**given):
    """Build or resume the Chroma index of each corpus (up to date when nothing changed)."""
    return _tasks("build", given)


@_creator("resume-status")
def task_resume_status(**given):
    """Read-only report of manifest, WAL and what the next build would resume."""
    return _tasks("resume-status", given)


@_creator("verify")
def task_verify(**given):
    """CI gate: fail unless each collection holds exactly what its manifest implies."""
    return _tasks("verify", given, run=uuid.uuid4().hex)


@_creator("clean-wal")
def task_clean_wal(**given):
    """Remove or archive the WAL of a finished run (--force for an unfinished one)."""
    return _tasks("clean-wal", given)


@_creator("repair")
def task_repair(**given):
    """Set an unreadable embedded Chroma folder aside, rebuild it from the embedding cache, verify."""
    return _tasks("repair", given)


@_creator("cache-stats")
def task_cache_stats(**given):
    """What the embedding cache holds, per model fingerprint (loads no model)."""
    return _tasks("cache-stats", given)


@_creator("cache-prune")
def task_cache_prune(**given):
    """Drop embedding cache entries of models no index uses (--keep current) or unused for N days, then vacuum."""
    return _tasks("cache-prune", given)


def task_crash_matrix():
    """Crash matrix (fault_injection/): kill builds at engine boundaries, recover, compare with a clean build."""
    if importlib.util.find_spec("fault_injection") is None:  # this repository's harness, not in the wheel
        return None
    from doit.action import CmdAction

    return {"basename": "crash-matrix", "actions": [CmdAction(_crash_matrix_command)], "uptodate": [False], "verbosity": 2,
            "params": [_param("scenario", list, "run only this scenario (repeatable)", []),
                       _param("points", str, "boundaries per scenario, or all"),
                       _param("workers", int, "parallel workers", 2),
                       _param("report", str, "write the rows as JSON to FILE"),
                       _param("real-model-rows", int, "rows with the packaged model (0 skips)", 2),
                       _param("seed", int, "corpus and sampling seed", 0)]}


def _crash_matrix_command(scenario, points, workers, report, real_model_rows, seed) -> str:
    args = [sys.executable, "-m", "fault_injection", "--workers", str(workers),
            "--real-model-rows", str(real_model_rows), "--seed", str(seed)]
    args += [arg for name in scenario for arg in ("--scenario", name)]
    args += ["--points", points] if points else []
    args += ["--report", report] if report else []
    return commands.shell_join(args)  # doit runs it through this OS's shell


# ---- one task, or a sub-task per index -------------------------------------------------------
# Actions and up-to-date checks are module-level callables bound with functools.partial, never closures:
# `doit -n 2` pickles each task for its worker processes, and Windows' only start method (spawn) cannot
# pickle a closure.

def _tasks(command: str, given: dict, run: str = ""):
    try:
        found = indexes.load(".")
    except ChromaResumeError as exc:
        return _refusing_tasks(command, exc)
    planned = {index.name or "default": f"{command}:{index.name}" if index.name else command for index in found}
    if found[0].name is None:
        return {"basename": command, **_task(command, found[0], given, (run, planned))}
    shown_by = _first_sharing_cache(found, given) if command == "cache-stats" else {}
    return ({"basename": command, "name": index.name, "params": _params(command),
             "doc": f"{command} index {index.name} ({index.table})",
             **(_shared_cache_task(index.name, given, shown_by[index.name]) if index.name in shown_by
                else _task(command, index, given, (run, planned)))}
            for index in found)


def _first_sharing_cache(found: list[indexes.Index], given: dict) -> dict[str, tuple[str, str]]:
    """index -> (the earlier index whose embedding cache file it shares, that file): one cache's figures are
    shown once, by the first index that uses it."""
    from .cache import cache_path
    first: dict[str, str] = {}
    shared = {}
    for index in found:
        try:
            path = cache_path(indexes.resolve(index, _split("cache-stats", given)[0]))
        except ChromaResumeError:
            continue  # the task itself reports it
        if path in first:
            shared[index.name] = (first[path], path)
        first.setdefault(path, index.name)
    return shared


def _shared_cache_task(name: str, given: dict, shown_by: tuple[str, str]) -> dict:
    """cache-stats of an index whose cache file an earlier index's sub-task shows: that one runs first."""
    return {"actions": [functools.partial(_stats_once, name, given, shown_by)],
            "task_dep": [f"cache-stats:{shown_by[0]}"], "uptodate": [False], "verbosity": 2}


def _stats_once(name: str, given: dict, shown_by: tuple[str, str], task):
    """Points at the figures shown above; options typed for this sub-task alone may name another cache, so
    then its own figures."""
    if any(not _unset(value) for value in (task.options or {}).values()):
        return _run("cache-stats", name, given, task)
    print(f"cache-stats:{name}: the cache {shown_by[1]} of cache-stats:{shown_by[0]}, shown above", flush=True)
    return {"exit_code": 0}


_SHOWN: set[str] = set()  # pyproject errors already shown while doit loaded this run's tasks


def _refusing_tasks(command: str, error: ChromaResumeError):
    """A broken pyproject: each task, and each sub-task its index tables name, refuses when run (exit 2,
    naming file, table and key), so `doit build:docs` says what is wrong instead of doit's
    `Invalid parameter: "build:docs"`. The error is also shown once while doit loads, so a task name no
    table makes any more (or a file too broken to name its tables) still meets the cause; `doit list` works."""
    if str(error) not in _SHOWN:
        _SHOWN.add(str(error))
        print(f"error: {error} (every chroma-resume task refuses until it is fixed)", file=sys.stderr, flush=True)
    names = indexes.table_names(".")
    if not names:
        return {"basename": command, "actions": [functools.partial(_refused, command, error)], "uptodate": [False],
                "verbosity": 2}
    return ({"basename": command, "name": name, "actions": [functools.partial(_refused, f"{command}:{name}", error)],
             "uptodate": [False], "verbosity": 2, "params": _params(command)} for name in names)


def _task(command: str, index: indexes.Index, given: dict, run: tuple[str, dict]) -> dict:
    if command == "build":
        return {"actions": [functools.partial(_run, command, index.name, given)],
                "uptodate": [BuildCurrent(index, given)],
                "task_dep": list(index.task.get("task-dep", [])), "file_dep": list(index.task.get("file-dep", [])),
                "verbosity": 2}
    action = functools.partial(_verify, index, given, run) if command == "verify" else \
        functools.partial(_run, command, index.name, given)
    return {"actions": [action], "uptodate": [False], "verbosity": 2}


def _options(given: dict, task) -> dict:
    """The group task's options (creator params) < the sub-task's own (`doit build:docs --opt`)."""
    mine = task.options or {}
    return {key: given.get(key) if _unset(mine.get(key)) else mine[key] for key in set(given) | set(mine)}


def _unset(value) -> bool:
    """None, or a flag left False; 0 is a value (`--min-recall 0`, `--seed 0`)."""
    return value is None or value is False


def _split(command: str, options: dict) -> tuple[dict, SimpleNamespace]:
    extra = {p["name"] for p in EXTRA_PARAMS.get(command, [])}
    return ({k: v for k, v in options.items() if k not in extra},
            SimpleNamespace(**{k: options.get(k) for k in extra}))


def _run(command: str, index: str | None, given: dict, task):
    """The action of every task but verify: the CLI's command with the options typed for this task."""
    config_options, extra = _split(command, _options(given, task))
    if command in ("build", "repair") and (shared := indexes.group_refusal(
            index, config_options, _split(command, given)[0])):
        return _refused(task.name, shared)
    if command == "cache-prune" and extra.keep is None:
        extra.keep = "current"
    return _outcome(task.name, cli.run(command, config_options, extra, index))


def _verify(index: indexes.Index, given: dict, run: tuple[str, dict], task):
    """verify, then its result merged into the run's one JSON report and one JUnit file (gate.py).
    run: this doit run's token and every index's task name."""
    config_options, extra = _split("verify", _options(given, task))
    indexes.gate_defaults(index, extra)  # the index table's golden file and threshold
    targets = (extra.report, extra.junit)
    try:
        from .verify import prepare_output
        for target in filter(None, targets):
            prepare_output(target)
    except ChromaResumeError as exc:
        return _refused(task.name, exc)
    with tempfile.TemporaryDirectory() as folder:
        extra.report, extra.junit = os.path.join(folder, "verify.json"), None
        code = cli.run("verify", config_options, extra, index.name)
        result = _read(extra.report)
    if any(targets):
        try:
            gate.record(run[0], index.name or "default", code, result, run[1], *targets)
        except ChromaResumeError as exc:
            return _refused(task.name, exc)
    return _outcome(task.name, code)


def _read(path: str) -> dict | None:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None  # verify stopped before its report (exit 2, 5): the exit code says why


class BuildCurrent:
    """doit's up-to-date check of one index's build; as text (what `doit info build:docs` shows) the reason
    in words that it last gave.

    Never up to date without a successful run recorded by doit (so `doit forget` works) or when options
    were typed for the build: `--sync-mode`, `--strict-sync true`, `--embed-cache-refresh true` (the fixes
    verify prints) change what a build does without changing the index's files, so a build given any
    option runs (it finds nothing to do quickly when there is nothing). Otherwise status.up_to_date, which
    also checks that the collection is the manifest's."""

    def __init__(self, index: indexes.Index, given: dict):
        self.index, self.given = index, given
        self.reason = "not checked yet"

    def __call__(self, task, values) -> bool:
        current, self.reason = self._check(_options(self.given, task), values)
        return current

    def _check(self, options: dict, values) -> tuple[bool, str]:
        if not values:
            return False, "doit holds no record of a successful build of this index (never built, or forgotten)"
        typed = sorted(f"--{name.replace('_', '-')}" for name, value in options.items() if not _unset(value))
        if typed:
            return False, f"options given for this build ({' '.join(typed)}): a build given options always runs"
        try:
            from .status import up_to_date
            return up_to_date(indexes.resolve(self.index, _split("build", options)[0]))
        except Exception as exc:  # a bad option or input, an unreachable server: the action reports it properly
            return False, f"could not check ({exc}); the build will say"

    def __str__(self) -> str:
        return self.reason


def _outcome(name: str, code: int):
    """0: success (values doit keeps for the up-to-date check); 1: a failed task; anything else: a task error."""
    if code == 0:
        return {"exit_code": 0}
    text = f"{name}: exit {code} ({gate.MEANING.get(code, 'error')})"
    return TaskFailed(text) if code == 1 else TaskError(text)


def _refused(name: str, exc: ChromaResumeError) -> TaskFailed | TaskError:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return _outcome(name, exc.exit_code)
