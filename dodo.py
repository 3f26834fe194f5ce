"""doit front door for chroma-resume: `doit list` shows the tasks, `doit help TASK` their options.

Every task resolves the same configuration (built-in defaults < [tool.chroma-resume]
in pyproject.toml < task options) and calls the package; nothing is implemented here.
"""
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chroma_resume import cli  # noqa: E402

DOIT_CONFIG = {
    "default_tasks": ["build"],
    "backend": "sqlite3",
    "dep_file": ".doit.db",
    "verbosity": 2,  # stream progress live instead of capturing it
}


def _params(*extra: dict) -> list[dict]:
    shared = [{"name": name.replace("-", "_"), "long": name, "type": kind if kind in (int, float) else str,
               "default": None, "help": help_text + (f" [{'|'.join(kind)}]" if isinstance(kind, tuple) else "")}
              for name, kind, help_text in cli.OPTIONS]
    return shared + list(extra)


def _flag(name: str, help_text: str) -> dict:
    return {"name": name, "long": name, "type": bool, "default": False, "help": help_text}


def _value(name: str, help_text: str) -> dict:
    return {"name": name, "long": name, "type": str, "default": None, "help": help_text}


def _action(command: str, extra_names: tuple[str, ...] = ()):
    def run(task):
        options = {k: v for k, v in task.options.items() if k not in extra_names}
        extra = SimpleNamespace(**{k: task.options[k] for k in extra_names})
        code = cli.run(command, options, extra)
        if code not in (0, 1):  # doit reports a failed action as its own exit 1: keep 2-5 and 130 for CI
            raise SystemExit(code)
        return code == 0
    return run


def _build_is_current(task, values):
    options = {k: v for k, v in task.options.items()}
    try:
        from chroma_resume.status import up_to_date
        current, _ = up_to_date(cli.resolve_config(options))
    except Exception:  # a bad option or input: let the action run and report it properly
        return False
    return current


def task_build():
    """Build or resume the Chroma index of the corpus (up to date when nothing changed)."""
    return {"actions": [_action("build")], "params": _params(), "uptodate": [_build_is_current]}


def task_resume_status():
    """Read-only report of manifest, WAL and what the next build would resume."""
    return {"basename": "resume-status", "actions": [_action("resume-status", ("json",))],
            "params": _params(_flag("json", "one JSON object instead of key=value lines")),
            "uptodate": [False], "verbosity": 2}


def task_verify():
    """CI gate: fail unless the collection holds exactly what the manifest implies."""
    return {"actions": [_action("verify", ("fresh", "report", "junit", "deep", "seed", "tolerance"))],
            "params": _params(_flag("fresh", "also fail when the corpus changed or re-chunks to other texts"),
                              _value("report", "write the checks as JSON to FILE"),
                              _value("junit", "write the checks as JUnit XML to FILE"),
                              _value("deep", "re-embed N sampled chunks (or all) and check Chroma finds each one"),
                              {"name": "seed", "long": "seed", "type": int, "default": None,
                               "help": "seed of the --deep sample (default 0)"},
                              {"name": "tolerance", "long": "tolerance", "type": float, "default": None,
                               "help": "least cosine of a re-embedded chunk (default 0.999)"}),
            "uptodate": [False]}


def task_clean_wal():
    """Remove or archive the WAL of a finished run (--force for an unfinished one)."""
    return {"basename": "clean-wal", "actions": [_action("clean-wal", ("force", "archive"))],
            "params": _params(_flag("force", "also remove an unfinished run's WAL"),
                              _value("archive", "gzip the WAL into DIR instead of deleting it")),
            "uptodate": [False]}


def task_repair():
    """Set an unreadable embedded Chroma folder aside, rebuild it from the embedding cache, verify."""
    return {"actions": [_action("repair")], "params": _params(), "uptodate": [False]}


def task_cache_stats():
    """What the embedding cache holds, per model fingerprint (loads no model)."""
    return {"basename": "cache-stats", "actions": [_action("cache-stats")], "params": _params(),
            "uptodate": [False], "verbosity": 2}


def task_cache_prune():
    """Drop embedding cache entries of other models (--keep current) or unused for N days, then vacuum."""
    return {"basename": "cache-prune", "actions": [_action("cache-prune", ("keep", "older_than_days"))],
            "params": _params({"name": "keep", "long": "keep", "type": str, "default": "current",
                               "help": "current: only this model fingerprint's entries; all: every model's "
                                       "[current|all]"},
                              {"name": "older_than_days", "long": "older-than-days", "type": float, "default": None,
                               "help": "also drop entries unused for N days"}),
            "uptodate": [False], "verbosity": 2}


def task_crash_matrix():
    """Crash matrix (fault_injection/): kill builds at engine boundaries, recover, compare with a clean build."""
    import shlex
    from doit.action import CmdAction

    def command(scenario, points, workers, report, real_model_rows, seed):
        args = [sys.executable, "-m", "fault_injection", "--workers", str(workers),
                "--real-model-rows", str(real_model_rows), "--seed", str(seed)]
        args += [arg for name in scenario for arg in ("--scenario", name)]
        args += ["--points", points] if points else []
        args += ["--report", report] if report else []
        return shlex.join(args)

    return {"basename": "crash-matrix", "actions": [CmdAction(command)], "uptodate": [False], "verbosity": 2,
            "params": [{"name": "scenario", "long": "scenario", "type": list, "default": [],
                        "help": "run only this scenario (repeatable)"},
                       _value("points", "boundaries per scenario, or all"),
                       {"name": "workers", "long": "workers", "type": int, "default": 2, "help": "parallel workers"},
                       _value("report", "write the rows as JSON to FILE"),
                       {"name": "real_model_rows", "long": "real-model-rows", "type": int, "default": 2,
                        "help": "rows with the packaged model (0 skips)"},
                       {"name": "seed", "long": "seed", "type": int, "default": 0, "help": "corpus and sampling seed"}]}
