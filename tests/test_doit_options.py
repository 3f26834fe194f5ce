"""Issue 23, items 1-5: what a user types after a doit task name reaches what it names.

A repository with two index tables: every task's options, typed after the group name (`doit clean-wal
--force`) or after one index's sub-task (`doit clean-wal:docs --force`), act on the indexes named; a build
given options runs even when up to date; a broken table is named whatever task is typed; `doit info` says
why a build would run, in words; `resume-status --json` is JSON on stdout.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chroma_resume import config as cfg
from chroma_resume import schema
from conftest import REPO, run_cli, write_corpus

pytestmark = pytest.mark.timeout(240)

PYPROJECT = """\
[tool.chroma-resume]
embed-model = "hash:32"
progress = "off"
upsert-batch = 2

[tool.chroma-resume.indexes.docs]
docs = "docs"

[tool.chroma-resume.indexes.notes]
docs = "notes"
collection = "team-notes"
"""
INDEXES = {"docs": "docs", "notes": "team-notes"}  # index -> collection


def doit(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root), *args],
                          cwd=root, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)


def wal(root: Path, index: str) -> Path:
    c = cfg.make_config(root=str(root), docs=index, collection=INDEXES[index], embed_model="hash:32", upsert_batch=2)
    return Path(schema.state_dir(c)) / "index_state.stage.jsonl"


def ran(result: subprocess.CompletedProcess) -> dict[str, str]:
    """task -> '.' (ran) or '--' (up to date), from doit's marks."""
    return {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()
            if line.startswith((".  ", "-- "))}


def sub_tasks(task: str, *options: str) -> list[str]:
    """`task:docs OPTIONS task:notes OPTIONS`: the options typed after each index's sub-task."""
    return [arg for index in INDEXES for arg in (f"{task}:{index}", *options)]


WAYS = {"group": lambda task, *options: [task, *options], "sub-task": sub_tasks}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "docs", 6)
    write_corpus(tmp_path / "notes", 4, seed=1)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    return tmp_path


@pytest.fixture
def built(project: Path) -> Path:
    result = doit(project, "build")
    assert result.returncode == 0, result.stdout + result.stderr
    return project


@pytest.mark.parametrize("way", WAYS)
def test_resume_status_json_reaches_every_index_as_json_on_stdout(built, way):
    result = doit(built, "--reporter", "zero", *WAYS[way]("resume-status", "--json"))
    assert result.returncode == 0, result.stdout + result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but JSON objects
    assert sorted(r["collection"] for r in reports) == sorted(INDEXES.values())
    assert all(r["state_present"] and not r["wal_present"] for r in reports)


@pytest.mark.parametrize("way", WAYS)
def test_clean_wal_force_reaches_every_index(project, way):
    for index in INDEXES:  # an unfinished run per index: killed after its first committed document
        killed = run_cli(["build", "--index", index], cwd=project,
                         env={"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@1=kill"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert wal(project, index).exists()
    refused = doit(project, *WAYS[way]("clean-wal"))
    assert refused.returncode == 2 and "pass --force" in refused.stderr
    assert all(wal(project, index).exists() for index in INDEXES)
    forced = doit(project, *WAYS[way]("clean-wal", "--force"))
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert not any(wal(project, index).exists() for index in INDEXES)


@pytest.mark.parametrize("way", WAYS)
def test_cache_prune_keep_all_keeps_another_models_entries(built, way):
    other = run_cli(["build", "--index", "docs", "--embed-model", "hash:16", "--collection", "other"], cwd=built)
    assert other.returncode == 0, other.stderr
    kept = doit(built, *WAYS[way]("cache-prune", "--keep", "all", "--older-than-days", "30"))
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert kept.stdout.count("removed=0") == 2, kept.stdout  # every entry is fresh, and all are kept
    dropped = doit(built, "cache-prune")  # --keep current: hash:16's entries go
    assert "removed=0" in dropped.stdout and any(line.startswith("removed=") and line != "removed=0"
                                                 for line in dropped.stdout.splitlines()), dropped.stdout


@pytest.mark.parametrize("way", WAYS)
def test_cache_stats_options_reach_every_index(built, way):
    result = doit(built, *WAYS[way]("cache-stats", "--embed-cache", "elsewhere.sqlite3"))
    assert result.returncode == 0, result.stdout + result.stderr
    paths = [line.split("=", 1)[1] for line in result.stdout.splitlines() if line.startswith("path=")]
    assert paths and all(p.endswith("elsewhere.sqlite3") for p in paths), result.stdout
    if way == "group":  # one cache file, shared by both indexes: its figures once, and a pointer
        assert len(paths) == 1
        assert f"cache-stats:notes: the cache {paths[0]} of cache-stats:docs, shown above" in result.stdout
    else:  # options typed for each sub-task: each shows its own
        assert len(paths) == 2


def test_cache_stats_shows_a_shared_cache_once_and_each_sub_task_still_answers(built):
    both = doit(built, "cache-stats")
    assert [line.startswith("path=") for line in both.stdout.splitlines()].count(True) == 1, both.stdout
    alone = doit(built, "cache-stats:notes")  # the index that shares it: the figures come with it
    assert alone.returncode == 0 and "entries=" in alone.stdout and "shown above" in alone.stdout


@pytest.mark.parametrize("way", WAYS)
def test_a_build_given_options_runs_though_up_to_date(built, way):
    assert ran(doit(built, "build")) == {"build:docs": "--", "build:notes": "--"}
    given = doit(built, *WAYS[way]("build", "--strict-sync", "true"))
    assert given.returncode == 0, given.stdout + given.stderr
    assert ran(given) == {"build:docs": ".", "build:notes": "."}
    assert given.stdout.count("[BUILD] up to date") == 2  # ran, and found nothing to do
    assert ran(doit(built, "build")) == {"build:docs": "--", "build:notes": "--"}


def test_a_broken_table_is_named_whatever_task_is_typed(project):
    (project / "pyproject.toml").write_text(PYPROJECT + 'chunk-chars = "big"\n')  # in the notes table
    for task in ("build:docs", "build:notes", "build", "resume-status:docs", "verify:notes"):
        result = doit(project, task)
        assert result.returncode == 2, (task, result.stdout + result.stderr)
        assert "[tool.chroma-resume.indexes.notes] chunk-chars: Expected `int`, got `str`" in result.stderr, task
        assert "Invalid parameter" not in result.stdout + result.stderr
    assert not (project / ".chroma").exists()


def test_doit_info_says_why_a_build_would_run(project):
    never = doit(project, "info", "build:docs")
    assert "doit holds no record of a successful build of this index" in never.stdout
    assert doit(project, "build").returncode == 0
    assert "status     : up-to-date" in doit(project, "info", "build:docs").stdout
    (project / "docs" / "doc0002.md").write_text("an edited document\n")
    (project / "docs" / "doc0009.md").write_text("a new document\n")
    edited = doit(project, "info", "build:docs")
    assert "corpus changed: added doc0009.md; changed doc0002.md" in edited.stdout
    assert "<function" not in edited.stdout
