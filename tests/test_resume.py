"""Crash, resume and sync behaviour of the real CLI against real Chroma (stand-in embedder)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import HASH_BUILD, collection_rows, run_cli, summary, write_corpus

pytestmark = pytest.mark.timeout(180)


def state_dir(root: Path) -> Path:
    (found,) = [p for p in (root / ".chroma-state" / "test").iterdir() if p.is_dir()]
    return found


def wal_records(root: Path) -> list[dict]:
    path = state_dir(root) / "index_state.stage.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def embedded_ids(root: Path) -> list[str]:
    log = root / "embedded.log"
    return log.read_text().split() if log.exists() else []


def build(root: Path, *extra: str, fail: str | None = None):
    env = {"CHROMA_RESUME_FAILPOINTS": fail} if fail else None
    return run_cli(["build", *HASH_BUILD, "--embed-log", "embedded.log", *extra], cwd=root, env=env)


def golden(tmp_path: Path, corpus: Path, *extra: str) -> dict:
    """The index an uninterrupted build of the same corpus produces."""
    clean = tmp_path / "golden"
    shutil.copytree(corpus, clean / "corpus")
    assert build(clean, *extra).returncode == 0
    return collection_rows(clean / ".chroma", "test")


@pytest.fixture
def crashed(tmp_path: Path) -> Path:
    """A 40-document build killed right after its 10th DOC_COMMITTED."""
    root = tmp_path / "run"
    write_corpus(root / "corpus", 40, seed=3)
    result = build(root, fail="wal.after_append:DOC_COMMITTED@10=kill")
    assert result.returncode == -9
    return root


def test_rerun_skips_committed_documents_and_equals_a_clean_build(tmp_path, crashed):
    records = wal_records(crashed)
    committed = {r["doc_id"] for r in records if r["t"] == "DOC_COMMITTED"}
    assert len(committed) == 10
    before = len(embedded_ids(crashed))
    result = build(crashed)
    assert result.returncode == 0, result.stderr
    assert "resume_active=true" in result.stdout and "done_docs=10" in result.stdout
    rerun_ids = embedded_ids(crashed)[before:]
    assert rerun_ids and not {i.split(":")[0] for i in rerun_ids} & committed
    assert summary(result.stdout)["docs_resumed_skipped"] == "10"
    assert collection_rows(crashed / ".chroma", "test") == golden(tmp_path, crashed / "corpus")
    assert not (state_dir(crashed) / "index_state.stage.jsonl").exists()


def test_chunks_upserted_total_never_goes_backwards(crashed):
    last = [r for r in wal_records(crashed) if r["t"] == "UPSERT_BATCH_COMMITTED"][-1]["chunks_upserted_total"]
    result = build(crashed, fail="wal.after_append:UPSERT_BATCH_COMMITTED@1=kill")
    assert result.returncode == -9
    assert f"chunks_upserted_total_last={last}" in result.stdout
    totals = [r["chunks_upserted_total"] for r in wal_records(crashed) if r["t"] == "UPSERT_BATCH_COMMITTED"]
    assert totals == sorted(totals) and totals[-1] > last


def test_wal_cut_mid_line_is_a_torn_tail_and_resumes(tmp_path, crashed):
    path = state_dir(crashed) / "index_state.stage.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])
    status = run_cli(["resume-status", *HASH_BUILD], cwd=crashed)
    assert "wal_truncated_tail_ignored=true" in status.stdout and "resume_active=true" in status.stdout
    assert path.read_bytes() == data[: len(data) - 25]  # status never repairs
    result = build(crashed)
    assert result.returncode == 0, result.stderr
    assert "truncated_tail_ignored=true" in result.stdout
    assert collection_rows(crashed / ".chroma", "test") == golden(tmp_path, crashed / "corpus")


def test_flipped_byte_in_an_earlier_line_refuses_with_exit_4_and_the_line(crashed):
    path = state_dir(crashed) / "index_state.stage.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"DOC_BEGIN"', b'"DOC_BEGIn"', 1)
    damaged = b"".join(lines)
    path.write_bytes(damaged)
    result = build(crashed)
    assert result.returncode == 4
    assert "line 3" in result.stderr and "refusing to resume" in result.stderr
    assert path.read_bytes() == damaged  # nothing written


def test_committed_document_edited_between_crash_and_resume(tmp_path, crashed):
    first = next(r for r in wal_records(crashed) if r["t"] == "DOC_COMMITTED")
    edited = crashed / "corpus" / first["uri"]
    edited.write_text("A brand new text for this document.\n" * 30)
    result = build(crashed)
    assert result.returncode == 0, result.stderr
    rows = collection_rows(crashed / ".chroma", "test")
    assert not any(i.startswith(f"{first['doc_id']}:{first['content_sha256'][:12]}:") for i in rows)
    assert rows == golden(tmp_path, crashed / "corpus")


def test_wal_ahead_of_db_is_caught_and_re_embedded(tmp_path, crashed):
    import chromadb

    first = next(r for r in wal_records(crashed) if r["t"] == "DOC_COMMITTED")
    lost = f"{first['doc_id']}:{first['content_sha256'][:12]}:0"
    chromadb.PersistentClient(path=str(crashed / ".chroma")).get_collection("test").delete(ids=[lost])
    before = len(embedded_ids(crashed))
    result = build(crashed)
    assert result.returncode == 0 and "key=wal_ahead_of_db" in result.stderr
    restored = summary(result.stdout)  # the cache holds its vector: restored without a model call
    assert lost not in embedded_ids(crashed)[before:] and int(restored["chunks_from_cache"]) >= 1
    assert collection_rows(crashed / ".chroma", "test") == golden(tmp_path, crashed / "corpus")


def test_incremental_sync_embeds_only_added_and_changed(tmp_path):
    root = tmp_path / "run"
    texts = write_corpus(root / "corpus", 20, seed=5)
    assert build(root).returncode == 0
    again = build(root)
    assert summary(again.stdout)["docs_processed"] == "0" and "up to date" in again.stdout
    uris = sorted(texts)
    (root / "corpus" / uris[0]).write_text("short now.\n")                       # shrinks
    (root / "corpus" / uris[1]).write_text(texts[uris[1]] * 4)                   # grows
    (root / "corpus" / uris[2]).unlink()                                         # deleted
    (root / "corpus" / "new.md").write_text("a new document. " * 50)            # added
    before = len(embedded_ids(root))
    result = build(root)
    assert result.returncode == 0, result.stderr
    s = summary(result.stdout)
    assert (s["added"], s["changed"], s["deleted"], s["docs_processed"]) == ("1", "2", "1", "3")
    embedded_docs = {i.split(":")[0] for i in embedded_ids(root)[before:]}
    assert len(embedded_docs) == 3
    assert collection_rows(root / ".chroma", "test") == golden(tmp_path, root / "corpus")


def test_strict_sync_mismatch_exits_1_and_keeps_the_wal(tmp_path):
    root = tmp_path / "run"
    texts = write_corpus(root / "corpus", 6, seed=9)
    assert build(root).returncode == 0
    (root / "corpus" / sorted(texts)[0]).write_text("changed text.\n")
    result = build(root, "--sync-mode", "none", "--strict-sync", "true")
    assert result.returncode == 1 and "strict sync" in result.stderr
    last = wal_records(root)[-1]
    assert last["t"] == "RUN_FINISH" and last["reason"] == "strict_sync_mismatch" and last["ok"] is False
    repaired = build(root, "--strict-sync", "true")
    assert repaired.returncode == 0, repaired.stderr
    assert collection_rows(root / ".chroma", "test") == golden(tmp_path, root / "corpus")


def test_schema_change_resets_or_fails(tmp_path):
    root = tmp_path / "run"
    write_corpus(root / "corpus", 8, seed=2)
    assert build(root).returncode == 0
    refused = build(root, "--chunk-chars", "600", "--schema-change", "fail")
    assert refused.returncode == 2 and "schema changed" in refused.stderr
    result = build(root, "--chunk-chars", "600")
    assert result.returncode == 0 and "key=schema_reset" in result.stderr
    latest = (root / ".chroma-state" / "test" / "LATEST").read_text().strip()
    assert latest in result.stdout
    assert collection_rows(root / ".chroma", "test") == golden(tmp_path, root / "corpus", "--chunk-chars", "600")


@pytest.mark.parametrize("policy, code", [("fail", 2), ("reset", 0), ("full-upsert", 0)])
def test_missing_state_with_a_populated_collection(tmp_path, policy, code):
    root = tmp_path / "run"
    write_corpus(root / "corpus", 6, seed=4)
    assert build(root).returncode == 0
    import chromadb
    chromadb.PersistentClient(path=str(root / ".chroma")).get_collection("test").add(
        ids=["foreign:1"], embeddings=[[0.1] * 32], documents=["not ours"])
    shutil.rmtree(root / ".chroma-state")
    result = build(root, "--on-missing-state", policy)
    assert result.returncode == code, result.stderr
    if code == 0:
        assert collection_rows(root / ".chroma", "test") == golden(tmp_path, root / "corpus")


def test_crash_after_run_finish_before_manifest_is_not_forgotten(tmp_path):
    root = tmp_path / "run"
    write_corpus(root / "corpus", 10, seed=6)
    assert build(root, fail="manifest.before_replace=kill").returncode == -9
    assert not (state_dir(root) / "index_state.json").exists()
    before = len(embedded_ids(root))
    result = build(root)
    assert result.returncode == 0, result.stderr
    assert embedded_ids(root)[before:] == []  # everything was committed: nothing re-embedded
    assert (state_dir(root) / "index_state.json").exists()
