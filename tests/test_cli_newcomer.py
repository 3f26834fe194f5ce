"""Issue 23, items 19, 21, 22: --all, --version and grouped help; verify before any build creates nothing and
its fixes run as printed; a bad value is blamed on where it came from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import chroma_resume
from chroma_resume import cli
from conftest import files, run_cli, run_shell, write_corpus

pytestmark = pytest.mark.timeout(240)

TABLES = """\
[tool.chroma-resume]
embed-model = "hash:32"
progress = "off"

[tool.chroma-resume.indexes.docs]
docs = "docs"
chunk-chars = 800

[tool.chroma-resume.indexes.notes]
docs = "notes"
"""


@pytest.fixture
def two(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "docs", 5)
    write_corpus(tmp_path / "notes", 3, seed=1)
    (tmp_path / "pyproject.toml").write_text(TABLES)
    return tmp_path


# ---- 19 ---------------------------------------------------------------------------------------

def test_all_runs_every_index_in_table_order(two):
    built = run_cli(["build", "--all"], cwd=two)
    assert built.returncode == 0, built.stderr
    assert [line for line in built.stdout.splitlines() if line.startswith("[INDEX]")] == ["[INDEX] docs",
                                                                                          "[INDEX] notes"]
    assert [line for line in built.stdout.splitlines() if line.startswith("added=")] == ["added=5", "added=3"]
    assert run_cli(["verify", "--all"], cwd=two).returncode == 0
    (two / "notes" / "doc0001.md").write_text("changed\n")
    fresh = run_cli(["verify", "--all", "--fresh"], cwd=two)
    assert fresh.returncode == 1 and fresh.stdout.count("verify: ok") == 1  # docs passed, notes failed
    both = run_cli(["build", "--all", "--index", "docs"], cwd=two)
    assert both.returncode == 2 and "not both" in both.stderr


def test_version_and_help_grouped_by_concern():
    version = run_cli(["--version"], cwd=Path("."))
    assert version.returncode == 0 and version.stdout.strip() == f"chroma-resume {chroma_resume.__version__}"
    grouped = [name for names in cli.OPTION_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(name for name, _, _ in cli.OPTIONS)  # each option in exactly one group
    shown = run_cli(["build", "--help"], cwd=Path(".")).stdout
    titles = [line.rstrip(":") for line in shown.splitlines() if line.endswith(" options:") or line == "which index:"]
    assert titles == ["which index", "corpus options", "chunking options", "model options", "store options",
                      "recovery options", "output options", "build options"]
    pruning = run_cli(["cache-prune", "--help"], cwd=Path(".")).stdout
    assert " ".join(cli.KEEP_HELP.split()[:6]) in " ".join(pruning.split())


# ---- 21 ---------------------------------------------------------------------------------------

def test_verify_before_any_build_creates_nothing_and_its_fixes_run_as_printed(tmp_path):
    write_corpus(tmp_path / "corpus", 4)
    (tmp_path / "golden.jsonl").write_text(json.dumps({"query": "alpha", "uris": ["doc0001.md"]}) + "\n")
    before = files(tmp_path)
    args = ["verify", "--docs", "corpus", "--embed-model", "hash:32", "--queries", "golden.jsonl"]
    failed = run_cli(args, cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    assert files(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "golden.jsonl"]
    fixes = {line.split("fix: ", 1)[1] for line in (failed.stdout + failed.stderr).splitlines() if "fix: " in line}
    assert fixes and all(fix.startswith("chroma-resume build ") for fix in fixes)
    for fix in sorted(fixes):
        assert run_shell(fix, cwd=tmp_path).returncode == 0, fix
    assert run_cli(args, cwd=tmp_path).returncode == 0


# ---- 22 ---------------------------------------------------------------------------------------

def test_a_bad_value_is_blamed_on_where_it_came_from(two):
    given = run_cli(["build", "--index", "docs", "--chroma-port", "0"], cwd=two)
    assert given.returncode == 2
    assert "--chroma-port 0: a TCP port, 1 to 65535 (given: --chroma-port;" in given.stderr
    assert not given.stderr.split("error: ", 1)[1].startswith("./pyproject.toml")  # not the table's fault
    mixed = run_cli(["build", "--index", "docs", "--overlap-chars", "900"], cwd=two)  # with the table's 800
    assert "(given: --overlap-chars; the other values from ./pyproject.toml [tool.chroma-resume.indexes.docs])" \
        in mixed.stderr
    (two / "pyproject.toml").write_text(TABLES.replace("chunk-chars = 800", "chunk-chars = 100"))
    table = run_cli(["build", "--index", "docs", "--chroma-port", "8001"], cwd=two)
    assert table.returncode == 2
    assert "error: ./pyproject.toml [tool.chroma-resume.indexes.docs]: --overlap-chars must be" in table.stderr
    (two / "pyproject.toml").write_text(TABLES.replace("chunk-chars = 800", "chunk-chars = 800\nchunk-char = 1"))
    typo = run_cli(["build", "--index", "docs"], cwd=two)
    assert "unknown key(s) chunk-char (did you mean chunk-chars?)" in typo.stderr
