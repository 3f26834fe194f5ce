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

import importlib.util
import json
import os
import shlex
import sys
import tempfile
import uuid
from types import SimpleNamespace

from doit import task_params
from doit.exceptions import TaskError, TaskFailed

from . import cli, gate, indexes
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
    "cache-prune": [_param("keep", str, "current: the entries of every index's model that shares this cache; "
                                        "all: every model's [current|all]"),
                    _param("older-than-days", float, "also drop entries unused for N days")],
}


def _params(command: str) -> list[dict]:
    return OPTION_PARAMS + EXTRA_PARAMS.get(command, [])


@task_params(_params("build"))
def task_build(**given):
    """Build or resume the Chroma index of each corpus (up to date when nothing changed)."""
    return _tasks("build", given)


@task_params(_params("resume-status"))
def task_resume_status(**given):
    """Read-only report of manifest, WAL and what the next build would resume."""
    return _tasks("resume-status", given)


@task_params(_params("verify"))
def task_verify(**given):
    """CI gate: fail unless each collection holds exactly what its manifest implies."""
    return _tasks("verify", given, run=uuid.uuid4().hex)


@task_params(_params("clean-wal"))
def task_clean_wal(**given):
    """Remove or archive the WAL of a finished run (--force for an unfinished one)."""
    return _tasks("clean-wal", given)


@task_params(_params("repair"))
def task_repair(**given):
    """Set an unreadable embedded Chroma folder aside, rebuild it from the embedding cache, verify."""
    return _tasks("repair", given)


@task_params(_params("cache-stats"))
def task_cache_stats(**given):
    """What the embedding cache holds, per model fingerprint (loads no model)."""
    return _tasks("cache-stats", given)


@task_params(_params("cache-prune"))
def task_cache_prune(**given):
    """Drop embedding cache entries of models no index uses (--keep current) or unused for N days, then vacuum."""
    return _tasks("cache-prune", given)


def task_crash_matrix():
    """Crash matrix (fault_injection/): kill builds at engine boundaries, recover, compare with a clean build."""
    if importlib.util.find_spec("fault_injection") is None:  # this repository's harness, not in the wheel
        return None
    from doit.action import CmdAction

    def command(scenario, points, workers, report, real_model_rows, seed):
        args = [sys.executable, "-m", "fault_injection", "--workers", str(workers),
                "--real-model-rows", str(real_model_rows), "--seed", str(seed)]
        args += [arg for name in scenario for arg in ("--scenario", name)]
        args += ["--points", points] if points else []
        args += ["--report", report] if report else []
        return shlex.join(args)

    return {"basename": "crash-matrix", "actions": [CmdAction(command)], "uptodate": [False], "verbosity": 2,
            "params": [_param("scenario", list, "run only this scenario (repeatable)", []),
                       _param("points", str, "boundaries per scenario, or all"),
                       _param("workers", int, "parallel workers", 2),
                       _param("report", str, "write the rows as JSON to FILE"),
                       _param("real-model-rows", int, "rows with the packaged model (0 skips)", 2),
                       _param("seed", int, "corpus and sampling seed", 0)]}


# ---- one task, or a sub-task per index -------------------------------------------------------

def _tasks(command: str, given: dict, run: str = ""):
    try:
        found = indexes.load(".")
    except ChromaResumeError as exc:  # a broken table: every task says so when run (doit list still works)
        error = exc
        return {"basename": command, "actions": [lambda: _refused(command, error)], "uptodate": [False],
                "verbosity": 2}
    planned = {index.name or "default": f"{command}:{index.name}" if index.name else command for index in found}
    if found[0].name is None:
        return {"basename": command, **_task(command, found[0], given, (run, planned))}
    return ({"basename": command, "name": index.name, "params": _params(command),
             "doc": f"{command} index {index.name} ({index.table})", **_task(command, index, given, (run, planned))}
            for index in found)


def _task(command: str, index: indexes.Index, given: dict, run: tuple[str, dict]) -> dict:
    if command == "build":
        return {"actions": [_action(command, index, given)], "uptodate": [_current(index, given)],
                "task_dep": list(index.task.get("task-dep", [])), "file_dep": list(index.task.get("file-dep", [])),
                "verbosity": 2}
    action = _verify_action(index, given, run) if command == "verify" else _action(command, index, given)
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


def _action(command: str, index: indexes.Index, given: dict):
    def action(task):
        config_options, extra = _split(command, _options(given, task))
        if command in ("build", "repair") and (shared := indexes.group_refusal(
                index.name, config_options, _split(command, given)[0])):
            return _refused(task.name, shared)
        if command == "cache-prune" and extra.keep is None:
            extra.keep = "current"
        return _outcome(task.name, cli.run(command, config_options, extra, index.name))
    return action


def _verify_action(index: indexes.Index, given: dict, run: tuple[str, dict]):
    """verify, then its result merged into the run's one JSON report and one JUnit file (gate.py).
    run: this doit run's token and every index's task name."""
    def action(task):
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
    return action


def _read(path: str) -> dict | None:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None  # verify stopped before its report (exit 2, 5): the exit code says why


def _current(index: indexes.Index, given: dict):
    """doit's up-to-date check: never true without a successful run recorded by doit (so `doit forget`
    works), and otherwise status.up_to_date, which also checks that the collection is the manifest's."""
    def current(task, values):
        if not values:
            return False
        try:
            from .status import up_to_date
            return up_to_date(indexes.resolve(index, _split("build", _options(given, task))[0]))[0]
        except Exception:  # a bad option or input, an unreachable server: the action reports it properly
            return False
    return current


def _outcome(name: str, code: int):
    """0: success (values doit keeps for the up-to-date check); 1: a failed task; anything else: a task error."""
    if code == 0:
        return {"exit_code": 0}
    text = f"{name}: exit {code} ({gate.MEANING.get(code, 'error')})"
    return TaskFailed(text) if code == 1 else TaskError(text)


def _refused(name: str, exc: ChromaResumeError) -> TaskFailed | TaskError:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return _outcome(name, exc.exit_code)
