"""[tool.chroma-resume.indexes.<name>]: inheritance, errors that name the table and key, one collection each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from chroma_resume import cli, indexes
from chroma_resume.errors import UsageError
from conftest import run_cli, write_corpus

TOP = """\
[tool.chroma-resume]
embed-model = "hash:32"
chunk-chars = 600
progress = "off"
"""


def project(tmp_path: Path, tables: str) -> str:
    (tmp_path / "pyproject.toml").write_text(TOP + tables)
    return str(tmp_path)


def test_each_index_inherits_the_top_table_and_overrides_it(tmp_path):
    folder = project(tmp_path, """
[tool.chroma-resume.indexes.docs]
docs = "docs"
[tool.chroma-resume.indexes.zh]
docs = "zh"
chunk-chars = 300
collection = "chinese"
task-dep = ["make_zh"]
min-recall = 0.8
""")
    docs, zh = (cli.resolve_config({}, folder=folder, index=name) for name in ("docs", "zh"))
    assert (docs.docs, docs.collection, docs.chunk_chars, docs.embed_model) == ("docs", "docs", 600, "hash:32")
    assert (zh.docs, zh.collection, zh.chunk_chars, zh.embed_model) == ("zh", "chinese", 300, "hash:32")
    assert cli.resolve_config({"chunk_chars": 500}, folder=folder, index="zh").chunk_chars == 500  # options win
    assert indexes.find(folder, "zh").task == {"task-dep": ["make_zh"], "min-recall": 0.8}


@pytest.mark.parametrize("tables, message", [
    ("[tool.chroma-resume.indexes.docs]\ndocs = 'd'\nchunk_size = 3\n",
     "[tool.chroma-resume.indexes.docs]: unknown key(s) chunk_size"),
    ("[tool.chroma-resume.indexes.docs]\nchunk-chars = 'big'\n", "[tool.chroma-resume.indexes.docs] chunk-chars: Expected `int`"),
    ("[tool.chroma-resume.indexes.docs]\nsync-mode = 'sometimes'\n",
     "[tool.chroma-resume.indexes.docs] sync-mode: expected one of incremental|rewrite-all|none|delete-stale"),
    ("[tool.chroma-resume.indexes.docs]\ntask-dep = 'gen'\n",
     "[tool.chroma-resume.indexes.docs] task-dep: expected a list of strings"),
    ("[tool.chroma-resume.indexes.docs]\nmin-recall = 2\n",
     "[tool.chroma-resume.indexes.docs] min-recall: expected a number between 0 and 1"),
    ("[tool.chroma-resume.indexes.docs]\ndocs = 'd'\nunits = 'u.jsonl'\n",
     "[tool.chroma-resume.indexes.docs]: give either --docs DIR or --units FILE.jsonl"),
    ("[tool.chroma-resume.indexes.a]\ndocs = 'a'\ncollection = 'shared'\n"
     "[tool.chroma-resume.indexes.b]\ndocs = 'b'\ncollection = 'shared'\n",
     "pyproject.toml [tool.chroma-resume.indexes.b]: both write collection 'shared'"),
    ("[tool.chroma-resume.indexes.'a:b']\ndocs = 'a'\n", "an index name is letters, digits"),
])
def test_config_errors_name_the_table_and_the_key(tmp_path, tables, message):
    folder = project(tmp_path, tables)
    with pytest.raises(UsageError) as caught:
        for index in indexes.load(folder):
            indexes.resolve(index, {})
    assert message in str(caught.value)


def test_the_top_table_keeps_its_own_messages(tmp_path):
    folder = project(tmp_path, "collection = 'a'\n")
    with pytest.raises(UsageError, match="invalid collection name 'a'"):
        cli.resolve_config({}, folder=folder)


def test_the_cli_asks_which_index(tmp_path):
    project(tmp_path, "[tool.chroma-resume.indexes.docs]\ndocs = 'docs'\n[tool.chroma-resume.indexes.notes]\n"
                      "docs = 'notes'\nqueries = 'golden.jsonl'\ntop-k = 2\n")
    texts = write_corpus(tmp_path / "notes", 3)
    (tmp_path / "golden.jsonl").write_text("".join(
        json.dumps({"query": text[:60], "uris": [uri]}) + "\n" for uri, text in texts.items()))
    missing = run_cli(["resume-status"], tmp_path)
    assert missing.returncode == 2 and "defines indexes docs, notes: give --index NAME" in missing.stderr
    wrong = run_cli(["resume-status", "--index", "nope"], tmp_path)
    assert wrong.returncode == 2 and "--index 'nope'" in wrong.stderr
    built = run_cli(["build", "--index", "notes"], tmp_path)
    assert built.returncode == 0, built.stderr
    assert "collection=notes" in built.stdout and (tmp_path / ".chroma-state" / "notes").is_dir()
    gate = run_cli(["verify", "--index", "notes", "--report", "r.json"], tmp_path)  # the table's golden file
    assert gate.returncode == 0, gate.stdout + gate.stderr
    scores = json.loads((tmp_path / "r.json").read_text())["retrieval"]
    assert (scores["k"], scores["overall"]["questions"], scores["queries"]) == (2, 3, str(tmp_path / "golden.jsonl"))
    assert "[PASS] retrieval: recall@2=" in gate.stdout


def test_cache_prune_keeps_every_index_that_shares_the_cache(tmp_path):
    """Two indexes, two models, one cache file: pruning for one must not drop the other's vectors."""
    project(tmp_path, "[tool.chroma-resume.indexes.small]\ndocs = 'docs'\nembed-model = 'hash:16'\n"
                      "[tool.chroma-resume.indexes.large]\ndocs = 'docs'\n")
    write_corpus(tmp_path / "docs", 4)
    for name in ("small", "large"):
        assert run_cli(["build", "--index", name], tmp_path).returncode == 0
    run_cli(["build", "--index", "large", "--embed-model", "hash:8", "--collection", "gone"], tmp_path)
    stats = run_cli(["cache-stats", "--index", "small"], tmp_path).stdout
    before = int(next(line for line in stats.splitlines() if line.startswith("entries=")).split("=")[1])
    pruned = run_cli(["cache-prune", "--index", "small"], tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    after = dict(line.split("=", 1) for line in pruned.stdout.splitlines() if "=" in line and "[" not in line)
    assert int(after["entries"]) == before * 2 // 3  # hash:8's entries go, hash:16's and hash:32's stay
    rebuilt = run_cli(["build", "--index", "large", "--on-missing-state", "reset", "--collection", "again"], tmp_path)
    assert "chunks_embedded=0" in rebuilt.stdout
