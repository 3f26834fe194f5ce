"""dodo.py, the doit face: same options as the CLI, defaults from ./pyproject.toml, an up-to-date build."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chroma_resume import config as cfg
from chroma_resume import schema
from conftest import REPO, run_shell, summary, write_corpus
from test_verify import printed_fix

pytestmark = pytest.mark.timeout(120)

PYPROJECT = """\
[tool.chroma-resume]
docs = "corpus"
collection = "test"
embed-model = "hash:32"
progress = "off"
upsert-batch = 16
"""


def doit(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`doit -d root ...`: doit chdirs to root, so the tasks read root/pyproject.toml and keep .doit.db there."""
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root), *args],
                          cwd=root, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)


def chroma(root: Path, code: str) -> str:
    """Run chromadb code against root/.chroma in a fresh process (a client kept here would go stale)."""
    script = "import sys, json, chromadb\nclient = chromadb.PersistentClient(path=sys.argv[1])\n" + code
    done = subprocess.run([sys.executable, "-c", script, str(root / ".chroma")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def collection_counts(root: Path) -> dict[str, int]:
    return json.loads(chroma(root, "print(json.dumps({c.name: c.count() for c in client.list_collections()}))"))


def delete_one_chunk(root: Path) -> str:
    state = Path(schema.state_dir(cfg.make_config(root=str(root), docs="corpus", collection="test", embed_model="hash:32")))
    entry = json.loads((state / "index_state.json").read_text())["documents"]["doc0005.md"]
    victim = f"{entry['doc_id']}:{entry['content_sha256'][:12]}:0"
    chroma(root, f"client.get_collection('test').delete(ids=[{victim!r}])")
    return victim


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus", 12)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    return tmp_path


@pytest.fixture
def built(project: Path) -> Path:
    result = doit(project)
    assert result.returncode == 0, result.stdout + result.stderr
    return project


def task_docstrings() -> dict[str, str]:
    tree = ast.parse((REPO / "src" / "chroma_resume" / "doit_tasks.py").read_text())
    return {node.name[5:].replace("_", "-"): ast.get_docstring(node).splitlines()[0]
            for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("task_")}


def test_list_shows_the_four_tasks_with_their_docstrings(project):
    result = doit(project, "list")
    assert result.returncode == 0, result.stderr
    shown = {line.split(None, 1)[0]: line.split(None, 1)[1].strip() for line in result.stdout.splitlines() if line}
    assert shown == task_docstrings()
    assert {"build", "resume-status", "verify", "clean-wal"} <= set(shown)


def test_default_task_builds_then_is_up_to_date_until_a_file_changes(project):
    first = doit(project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert ".  build" in first.stdout
    assert summary(first.stdout)["docs_processed"] == "12"
    assert (project / ".doit.db").exists()
    assert collection_counts(project) == {"test": int(summary(first.stdout)["expected_chunks"])}

    second = doit(project)
    assert second.returncode == 0, second.stderr
    assert "-- build" in second.stdout and "[STAGE]" not in second.stdout

    (project / "corpus" / "doc0006.md").write_text("one edited document\n")
    third = doit(project, "build")
    assert third.returncode == 0, third.stdout + third.stderr
    assert ".  build" in third.stdout
    got = summary(third.stdout)
    assert (got["docs_processed"], got["changed"], got["added"]) == ("1", "1", "0")

    assert "-- build" in doit(project, "build").stdout


def test_verify_passes_after_a_build_and_fails_after_damage(built):
    ok = doit(built, "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verify: ok" in ok.stdout

    victim = delete_one_chunk(built)
    bad = doit(built, "verify", "--report", "r.json")
    assert bad.returncode != 0
    assert "[FAIL] ids" in bad.stdout and victim in bad.stdout
    report = json.loads((built / "r.json").read_text())
    assert (report["ok"], report["exit_code"], report["indexes"]["default"]["exit_code"]) == (False, 1, 1)
    assert {ch["name"] for ch in report["indexes"]["default"]["checks"] if not ch["ok"]} == {"count", "ids"}


def test_the_fix_doit_verify_prints_runs_as_printed(built):
    """The fix names the options in effect (here from pyproject), so it repairs this index from a shell."""
    delete_one_chunk(built)
    failing = doit(built, "verify")
    fix = printed_fix(failing)
    assert fix.startswith("chroma-resume build ") and "--strict-sync=true" in fix
    assert "-- build" not in doit(built, "build").stdout  # the up-to-date check counts the rows (catalogue)
    assert run_shell(fix, cwd=built).returncode == 0
    assert doit(built, "verify").returncode == 0


def test_doit_tells_a_failed_gate_from_an_index_it_could_not_check(built):
    """doit ends a failed check with 1 and a task that could not check (unreachable store, bad option) with 2;
    the JSON report keeps the CLI's exact code for each index (5: unreachable, 2: usage)."""
    report = built / "report.json"
    unreachable = doit(built, "verify", "--chroma-host", "127.0.0.1", "--chroma-port", "1", "--retry-for", "0",
                       "--report", str(report))
    assert unreachable.returncode == 2
    assert [e["exit_code"] for e in json.loads(report.read_text())["indexes"].values()] == [5]
    assert doit(built, "verify", "--chroma-port", "0").returncode == 2
    delete_one_chunk(built)
    assert doit(built, "verify").returncode == 1


def test_help_build_lists_the_options(project):
    result = doit(project, "help", "build")
    assert result.returncode == 0, result.stderr
    for option in ("--embed-model", "--wal-fsync", "--wal-fsync-interval", "--collection", "--state-root"):
        assert option + "=" in result.stdout
    assert "[off|doc|interval]" in result.stdout


def test_task_options_override_pyproject(project):
    result = doit(project, "build", "--collection", "other")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "collection=other" in result.stdout
    assert collection_counts(project) == {"other": int(summary(result.stdout)["expected_chunks"])}
    assert (project / ".chroma-state" / "other").is_dir() and not (project / ".chroma-state" / "test").exists()
    # the pyproject default is still what a plain run uses, and it is a separate index
    plain = doit(project, "build")
    assert plain.returncode == 0 and "collection=test" in plain.stdout and ".  build" in plain.stdout


def test_a_bad_option_fails_the_task_with_exit_2s_message(project):
    result = doit(project, "build", "--collection", "a")
    assert result.returncode != 0
    assert "invalid collection name 'a'" in result.stderr
    assert not (project / ".chroma").exists()


def test_a_broken_table_is_a_task_error_naming_the_table_and_key(project):
    (project / "pyproject.toml").write_text(PYPROJECT + "\n[tool.chroma-resume.indexes.docs]\nchunk-chars = 'big'\n")
    listed = doit(project, "list")
    assert listed.returncode == 0 and "build" in listed.stdout  # doit itself still works
    result = doit(project, "build")
    assert result.returncode == 2, result.stdout + result.stderr  # a task error (usage), not a failed check
    assert "[tool.chroma-resume.indexes.docs] chunk-chars: Expected `int`, got `str`" in result.stderr
    assert "build:docs: exit 2 (usage or input error)" in result.stdout + result.stderr  # the sub-task typed, named
    assert not (project / ".chroma").exists()
