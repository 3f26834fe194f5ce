"""Breaks the crash matrix and the randomized sequences found in DESIGN §13's rules, one test each."""
from __future__ import annotations

import json
import signal
import shutil

import pytest

from conftest import HASH_BUILD, collection_rows, run_cli

from chroma_resume import wal
from chroma_resume.corpus import doc_id_for

UNITS = [a for a in HASH_BUILD if a not in ("--docs", "corpus")] + ["--units", "units.jsonl", "--upsert-batch", "2"]


def _carried() -> tuple[str, str]:
    """Two units files: A (several chunks) and C; then A's doc_id and text under source_uri B, and C."""
    text = " ".join(f"word{i}" for i in range(700))
    other = json.dumps({"source_uri": "C", "text": "other text here " * 20})
    a = json.dumps({"source_uri": "A", "text": text, "metadata": {"k": 1}})
    b = json.dumps({"source_uri": "B", "doc_id": doc_id_for("A"), "text": text, "metadata": {"k": 1}})
    return f"{a}\n{other}\n", f"{b}\n{other}\n"


def test_a_doc_begin_demotes_the_same_ids_committed_under_another_uri(tmp_path):
    """A doc_id carried to another source_uri rewrites the same chunk ids: their commit under the old
    uri no longer says what the rows hold."""
    path = str(tmp_path / "wal.jsonl")
    writer = wal.Writer(path, "run1", policy="off", interval=50)
    writer.append(wal.RunStart(wal_version=wal.WAL_VERSION, schema_hash="s", collection="c", db="d",
                               sync_mode="incremental", config={}, pid=1, host="h"))
    writer.append(wal.DocBegin(uri="A", doc_id="D", content_sha256="T", n_chunks=3, kind="added", meta_sha256="m"))
    writer.append(wal.DocCommitted(uri="A", doc_id="D", content_sha256="T", n_chunks=3, chunks_upserted_total=3,
                                   meta_sha256="m"))
    writer.append(wal.DocBegin(uri="B", doc_id="D", content_sha256="T", n_chunks=3, kind="added", meta_sha256="m"))
    writer.close()
    replay = wal.read(path)
    assert replay.generations["A"]["D:T"].state == "begun"
    assert replay.generations["B"]["D:T"].state == "begun"


@pytest.mark.timeout(240)
def test_a_rewrite_under_another_source_uri_cut_short_then_reverted(tmp_path):
    """DESIGN §4 "same ids, other source": run 1 commits A and dies before its manifest; A's doc_id
    is carried to source_uri B and run 2 dies after rewriting half of its rows; the corpus goes back to
    A. The WAL's commit of A is demoted, so the next build restores A's rows as planned work (before,
    only the resume check's repair, a functional WARN wal_ahead_of_db, saved it)."""
    root = tmp_path / "run"
    root.mkdir()
    units = root / "units.jsonl"
    a, b = _carried()
    units.write_text(a)
    first = run_cli(["build", *UNITS], cwd=root, env={"CHROMA_RESUME_FAILPOINTS": "build.reconcile=kill"})
    assert first.returncode == -signal.SIGKILL
    units.write_text(b)
    cut = run_cli(["build", *UNITS], cwd=root, env={"CHROMA_RESUME_FAILPOINTS": "store.after_upsert@1=kill"})
    assert cut.returncode == -signal.SIGKILL
    sources = {m["source_uri"] for _, m, _ in collection_rows(root / ".chroma", "test").values() if m["doc_id"] == doc_id_for("A")}
    assert sources == {"A", "B"}  # half rewritten
    units.write_text(a)
    after = run_cli(["build", *UNITS], cwd=root)
    assert after.returncode == 0, after.stderr
    assert "wal_ahead_of_db" not in after.stderr and "missing_after_build" not in after.stderr
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(units, clean / "units.jsonl")
    assert run_cli(["build", *UNITS], cwd=clean).returncode == 0
    assert collection_rows(root / ".chroma", "test") == collection_rows(clean / ".chroma", "test")


@pytest.mark.timeout(240)
def test_a_doc_id_carried_away_and_back_is_not_trusted_from_the_manifest(tmp_path):
    """Found by fault_injection.sequences (seed 5, sequence 6): the manifest says A holds generation D:T;
    a run carries doc_id D (same text) to source_uri B, rewriting the same ids with B's metadata, and dies
    before its manifest; the corpus goes back to A. The manifest's claim is older than the WAL's record
    of those ids under B, so it is no evidence: before, the build said "up to date" over rows naming B."""
    root = tmp_path / "run"
    root.mkdir()
    units = root / "units.jsonl"
    a, b = _carried()
    units.write_text(a)
    assert run_cli(["build", *UNITS], cwd=root).returncode == 0
    units.write_text(b)
    moved = run_cli(["build", *UNITS], cwd=root, env={"CHROMA_RESUME_FAILPOINTS": "manifest.before_replace=kill"})
    assert moved.returncode == -signal.SIGKILL
    units.write_text(a)
    after = run_cli(["build", *UNITS], cwd=root)
    assert after.returncode == 0, after.stderr
    assert "up to date" not in after.stdout and "wal_ahead_of_db" not in after.stderr
    sources = {m["source_uri"] for _, m, _ in collection_rows(root / ".chroma", "test").values()}
    assert sources == {"A", "C"}
    assert run_cli(["verify", *UNITS], cwd=root).returncode == 0
