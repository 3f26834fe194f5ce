"""Crash, then change, then rebuild: the result must equal a clean build of what is there now.

Each test runs the real CLI against real Chroma (stand-in embedder) and compares the
collection, read back in a fresh process, with a clean build of the final corpus.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import HASH_BUILD, collection_rows, lock_holder, run_cli, summary, write_corpus

pytestmark = pytest.mark.timeout(240)
UNITS_BUILD = [a for a in HASH_BUILD if a not in ("--docs", "corpus")]


def build(root: Path, *extra: str, fail: str | None = None):
    env = {"CHROMA_RESUME_FAILPOINTS": fail} if fail else None
    return run_cli(["build", *HASH_BUILD, "--embed-log", "embedded.log", *extra], cwd=root, env=env)


def verify(root: Path, *extra: str):
    return run_cli(["verify", *HASH_BUILD, *extra], cwd=root)


def clean_build(tmp_path: Path, root: Path, *extra: str, name: str = "golden") -> dict:
    """The collection a clean build of root's corpus (and units file, if any) produces."""
    clean = tmp_path / name
    shutil.copytree(root / "corpus", clean / "corpus")
    result = build(clean, *extra)
    assert result.returncode == 0, result.stderr
    return collection_rows(clean / ".chroma", "test")


def state_dir(root: Path) -> Path:
    (found,) = [p for p in (root / ".chroma-state" / "test").iterdir() if p.is_dir()]
    return found


def wal_tags(root: Path) -> list[str]:
    path = state_dir(root) / "index_state.stage.jsonl"
    return [json.loads(line)["t"] for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def built(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    write_corpus(root / "corpus", 12, seed=11)
    assert build(root).returncode == 0
    return root


def test_edit_undone_after_its_old_generation_was_deleted_comes_back(tmp_path, built):
    target = built / "corpus" / "doc0003.md"
    original = target.read_text()
    target.write_text(original + "An edit that will be undone.\n")
    crashed = build(built, fail="wal.after_append:DELETE_OLD_DONE@1=kill")
    assert crashed.returncode == -9 and "DELETE_OLD_DONE" in wal_tags(built)
    target.write_text(original)
    result = build(built)
    assert result.returncode == 0, result.stderr
    assert "up to date" not in result.stdout
    assert collection_rows(built / ".chroma", "test") == clean_build(tmp_path, built)
    assert verify(built).returncode == 0


def test_removed_file_restored_after_its_stale_delete_comes_back(tmp_path, built):
    target = built / "corpus" / "doc0005.md"
    saved = target.read_text()
    target.unlink()
    crashed = build(built, fail="wal.after_append:DELETE_STALE_DONE@1=kill")
    assert crashed.returncode == -9
    target.write_text(saved)
    result = build(built)
    assert result.returncode == 0, result.stderr
    assert collection_rows(built / ".chroma", "test") == clean_build(tmp_path, built)
    assert verify(built).returncode == 0


def test_delete_intent_is_fsynced_before_chroma_deletes(built):
    """The intent must be in the WAL when Chroma's delete returns, under --wal-fsync off too."""
    (built / "corpus" / "doc0001.md").unlink()
    crashed = build(built, "--wal-fsync", "off", fail="store.after_delete@1=kill")
    assert crashed.returncode == -9
    assert wal_tags(built)[-1] == "DELETE_INTENT"


def test_unreadable_file_keeps_its_chunks_and_its_manifest_entry(tmp_path, built):
    before = collection_rows(built / ".chroma", "test")
    target = built / "corpus" / "doc0002.md"
    target.unlink()
    os.mkfifo(target)  # listed but not a regular file: the one unreadable file root cannot read around
    result = build(built)
    assert result.returncode == 0, result.stderr
    assert "key=not_regular_file" in result.stderr and summary(result.stdout)["kept_unreadable"] == "1"
    assert collection_rows(built / ".chroma", "test") == before
    assert verify(built).returncode == 0


def test_doc_id_change_rekeys_without_embedding(tmp_path):
    root = tmp_path / "units"
    root.mkdir()
    units = root / "units.jsonl"
    rows = [{"source_uri": f"u{i}", "text": f"unit number {i}. " * 60, "metadata": {"lang": "en"}} for i in range(4)]
    units.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [*UNITS_BUILD, "--units", "units.jsonl", "--embed-cache", "off"]
    assert run_cli(["build", *args], cwd=root).returncode == 0
    rows[1]["doc_id"] = "renamed"
    rows[2]["metadata"] = {"lang": "fr"}
    units.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli(["build", *args], cwd=root)
    assert result.returncode == 0, result.stderr
    s = summary(result.stdout)
    assert s["chunks_embedded"] == "0" and int(s["chunks_rekeyed"]) > 0 and int(s["chunks_metadata_updated"]) > 0
    got = collection_rows(root / ".chroma", "test")
    assert {m["doc_id"] for _, m, _ in got.values() if m["source_uri"] == "u1"} == {"renamed"}
    assert {m["lang"] for _, m, _ in got.values() if m["source_uri"] == "u2"} == {"fr"}
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(units, clean / "units.jsonl")
    assert run_cli(["build", *args], cwd=clean).returncode == 0
    assert got == collection_rows(clean / ".chroma", "test")
    assert run_cli(["verify", *args], cwd=root).returncode == 0


def test_duplicate_doc_id_in_a_units_file_exits_2_naming_both_lines(tmp_path):
    (tmp_path / "units.jsonl").write_text(
        json.dumps({"source_uri": "a", "text": "x", "doc_id": "same"}) + "\n"
        + json.dumps({"source_uri": "b", "text": "y", "doc_id": "same"}) + "\n")
    result = run_cli(["build", *UNITS_BUILD, "--units", "units.jsonl"], cwd=tmp_path)
    assert result.returncode == 2 and "duplicate doc_id 'same' (first on line 1)" in result.stderr
    assert "units.jsonl:2" in result.stderr


def test_the_collections_fingerprint_decides_even_without_latest(tmp_path, built):
    (built / ".chroma-state" / "test" / "LATEST").unlink()
    refused = build(built, "--chunk-chars", "500", "--schema-change", "fail")
    assert refused.returncode == 2 and "schema changed" in refused.stderr
    reset = build(built, "--chunk-chars", "500", "--hnsw-space", "l2")
    assert reset.returncode == 0 and "key=schema_reset" in reset.stderr
    assert collection_rows(built / ".chroma", "test") == clean_build(tmp_path, built, "--chunk-chars", "500",
                                                                      "--hnsw-space", "l2")
    probe = ("import chromadb,sys; c=chromadb.PersistentClient(path=sys.argv[1]).get_collection('test'); "
             "print(c.configuration_json['hnsw']['space'], c.metadata['chroma_resume:schema_hash'])")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", probe, str(built / ".chroma")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "l2" and out[1] == (built / ".chroma-state" / "test" / "LATEST").read_text().strip()


def test_a_manifest_from_before_a_reset_is_not_trusted(tmp_path, built):
    """Build B, switch to A (reset), switch back to B: B's old manifest describes a collection that is gone."""
    assert build(built, "--chunk-chars", "500").returncode == 0
    result = build(built)
    assert result.returncode == 0 and "up to date" not in result.stdout
    assert collection_rows(built / ".chroma", "test") == clean_build(tmp_path, built)


def test_a_second_build_with_other_options_on_the_same_collection_exits_3(built):
    lock = built / ".chroma-state" / "test" / "writer.lock"
    with lock_holder(built, lock, [*HASH_BUILD]) as holder:
        other = build(built, "--chunk-chars", "500")
    assert other.returncode == 3 and f"pid={holder.pid}" in other.stderr


def test_reconcile_compares_id_sets_not_counts(tmp_path, built):
    """One chunk deleted and one foreign id added behind the tool's back: counts agree, ids do not."""
    tamper = ("import chromadb,sys; c=chromadb.PersistentClient(path=sys.argv[1]).get_collection('test'); "
              "ids=sorted(c.get(include=[])['ids']); c.delete(ids=[ids[0]]); "
              "c.add(ids=['foreign:0'], embeddings=[[0.1]*32], documents=['x'], metadatas=[{'k': 1}])")
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", tamper, str(built / ".chroma")], check=True, capture_output=True)
    result = build(built)
    assert result.returncode == 0, result.stderr
    assert "key=orphans_deleted" in result.stderr and "key=missing_after_build" in result.stderr
    assert collection_rows(built / ".chroma", "test") == clean_build(tmp_path, built)


def test_leftovers_wal_off_and_manifest_temp_files(built):
    (built / "corpus" / "doc0004.md").write_text("changed text. " * 40)
    assert build(built, fail="wal.after_append:DOC_COMMITTED@1=kill").returncode == -9
    temp = state_dir(built) / "index_state.json.tmp.12345"
    temp.write_text("{half")
    result = build(built, "--wal", "off")
    assert result.returncode == 0 and "key=wal_abandoned" in result.stderr
    assert not temp.exists() and not (state_dir(built) / "index_state.stage.jsonl").exists()
    assert list(state_dir(built).glob("index_state.stage.jsonl.abandoned-*"))
    again = build(built)
    assert "resume_active=false" in again.stdout and "up to date" in again.stdout


def test_collection_name_too_long_for_the_lock_file_exits_2(tmp_path):
    write_corpus(tmp_path / "corpus", 2)
    name = "c" * 300  # Chroma accepts up to 512 characters; a path component is at most 255
    args = [a if a != "test" else name for a in HASH_BUILD]
    result = run_cli(["build", *args], cwd=tmp_path)
    assert result.returncode == 2 and "too long" in result.stderr and "Traceback" not in result.stderr


def test_a_moved_project_folder_keeps_its_index(tmp_path, built):
    """The collection's incarnation, not the folder's path, says which collection a manifest describes."""
    moved = tmp_path / "moved"
    built.rename(moved)
    result = build(moved)
    assert result.returncode == 0 and "up to date" in result.stdout, result.stdout + result.stderr
    assert "key=missing_state_reset" not in result.stderr and summary(result.stdout)["chunks_upserted"] == "0"
    assert verify(moved).returncode == 0


# ---- skipped is not deleted, whatever the WAL or the timing ------------------------------------

@pytest.fixture
def edited_and_killed(built: Path) -> Path:
    """doc0001 edited; the build committed the new generation, deleted the old one, and died."""
    target = built / "corpus" / "doc0001.md"
    target.write_text(target.read_text() + "A new paragraph, committed before the kill.\n")
    assert build(built, fail="wal.after_append:DOC_DONE@1=kill").returncode == -9
    return built


@pytest.mark.parametrize("unreadable, extra", [("utf8", ("--resume", "off")), ("fifo", ())])
def test_an_unreadable_file_keeps_the_generation_chroma_holds_even_without_the_wal(
        edited_and_killed, unreadable, extra):
    root = edited_and_killed
    held = {i: row for i, row in collection_rows(root / ".chroma", "test").items() if row[1]["source_uri"] == "doc0001.md"}
    target = root / "corpus" / "doc0001.md"
    target.unlink()
    if unreadable == "fifo":
        os.mkfifo(target)
    else:
        target.write_bytes(b"\xff\xfe not utf-8")
    result = build(root, *extra)
    assert result.returncode == 0, result.stderr
    assert "key=orphans_deleted" not in result.stderr and "key=missing_after_build" not in result.stderr
    after = collection_rows(root / ".chroma", "test")
    assert {i: row for i, row in after.items() if row[1]["source_uri"] == "doc0001.md"} == held
    assert verify(root).returncode == 0


def test_a_file_unreadable_between_planning_and_embedding_is_kept(built, tmp_path):
    import subprocess
    import sys
    import time

    before = {i: r for i, r in collection_rows(built / ".chroma", "test").items() if r[1]["source_uri"] == "doc0006.md"}
    trace = tmp_path / "trace"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHROMA_RESUME_FAILPOINTS": f"trace={trace};lock.acquired=sleep(3000)"}
    proc = subprocess.Popen([sys.executable, "-m", "chroma_resume", "build", *HASH_BUILD, "--sync-mode", "delete-stale"],
                            cwd=built, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (trace.exists() and "lock.acquired" in trace.read_text()):  # planned: the scan is over
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    (built / "corpus" / "doc0006.md").write_bytes(b"\xff\xfe no longer utf-8")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "key=vanished_during_build" in err and "key=orphans_deleted" not in err
    after = {i: r for i, r in collection_rows(built / ".chroma", "test").items() if r[1]["source_uri"] == "doc0006.md"}
    assert after == before and verify(built).returncode == 0


# ---- units files: what a clean build stores, exactly ------------------------------------------

def _units_build(root: Path, rows: list[dict], *extra: str):
    (root / "units.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_cli(["build", *UNITS_BUILD, "--units", "units.jsonl", *extra], cwd=root)


def test_metadata_type_changes_are_written(tmp_path):
    """1 == True == 1.0 in Python; Chroma stores them apart, and a clean build stores the new type."""
    rows = [{"source_uri": "a", "text": "alpha beta. " * 30, "metadata": {"flag": 1, "score": 2}}]
    root, clean = tmp_path / "run", tmp_path / "clean"
    root.mkdir(), clean.mkdir()
    assert _units_build(root, rows).returncode == 0
    rows[0]["metadata"] = {"flag": True, "score": 2.0}
    assert _units_build(root, rows).returncode == 0
    assert _units_build(clean, rows).returncode == 0
    got = [m for _, m, _ in collection_rows(root / ".chroma", "test").values()]
    assert got == [m for _, m, _ in collection_rows(clean / ".chroma", "test").values()]
    assert all(m["flag"] is True and isinstance(m["score"], float) for m in got)


def test_a_doc_id_moved_to_another_uri_needs_no_repair(tmp_path):
    before = [{"source_uri": "a", "text": "text of x. " * 40, "doc_id": "X"}, {"source_uri": "c", "text": "c. " * 40}]
    after = [{"source_uri": "b", "text": "text of x. " * 40, "doc_id": "X"},
             {"source_uri": "a", "text": "a new text. " * 40, "doc_id": "Z"}, {"source_uri": "c", "text": "c. " * 40}]
    root, clean = tmp_path / "run", tmp_path / "clean"
    root.mkdir(), clean.mkdir()
    assert _units_build(root, before).returncode == 0
    result = _units_build(root, after)
    assert result.returncode == 0 and "key=missing_after_build" not in result.stderr, result.stderr
    assert _units_build(clean, after).returncode == 0
    assert collection_rows(root / ".chroma", "test") == collection_rows(clean / ".chroma", "test")


def test_doit_sees_a_metadata_or_doc_id_change_as_work(tmp_path):
    from chroma_resume import cli
    from chroma_resume.status import up_to_date

    rows = [{"source_uri": "a", "text": "alpha. " * 40, "metadata": {"lang": "en"}}]
    assert _units_build(tmp_path, rows).returncode == 0
    c = cli.resolve_config({"root": str(tmp_path), "units": "units.jsonl", "collection": "test",
                            "embed_model": "hash:32"}, folder=str(tmp_path))
    assert up_to_date(c)[0]
    for change in ({"metadata": {"lang": "fr"}}, {"doc_id": "renamed"}, {"source_type": "faq"}):
        (tmp_path / "units.jsonl").write_text(json.dumps({**rows[0], **change}) + "\n")
        current, reason = up_to_date(c)
        assert not current and reason.startswith("corpus changed: "), change


def test_a_corrupt_cached_vector_is_a_miss(tmp_path, built):
    import sqlite3

    cache = built / ".chroma-state" / "embed-cache.sqlite3"
    with sqlite3.connect(cache) as db:
        key, blob = db.execute("SELECT key, vector FROM vectors LIMIT 1").fetchone()
        db.execute("UPDATE vectors SET vector = ? WHERE key = ?", (bytes(len(blob)), key))  # all zeros
    shutil.rmtree(built / ".chroma")
    result = build(built)
    assert result.returncode == 0 and "key=embed_cache_bad_vector" in result.stderr
    assert summary(result.stdout)["chunks_embedded"] == "1"
    assert collection_rows(built / ".chroma", "test") == clean_build(tmp_path, built)


def test_status_verify_and_build_agree_when_the_db_folder_is_lost_after_a_crash(built):
    (built / "corpus" / "doc0002.md").write_text("changed. " * 50)
    assert build(built, fail="wal.after_append:DOC_COMMITTED@1=kill").returncode == -9
    shutil.rmtree(built / ".chroma")
    said = [run_cli([verb, *HASH_BUILD], cwd=built) for verb in ("resume-status", "verify")]
    result = build(built)
    assert "resume_active=false reason=collection_recreated" in result.stdout
    assert "resume_active=false" in said[0].stdout and "collection_recreated" in said[0].stdout
    assert "resume_active=false reason=collection_recreated" in said[1].stdout


def test_resume_off_after_a_crash_mid_metadata_change_rewrites_what_the_crash_left(tmp_path):
    rows = [{"source_uri": f"u{i}", "text": f"unit {i} text. " * 80, "metadata": {"v": 1}} for i in range(3)]
    root, clean = tmp_path / "run", tmp_path / "clean"
    root.mkdir(), clean.mkdir()
    assert _units_build(root, rows).returncode == 0
    changed = [{**r, "metadata": {"v": "two"}} for r in rows]
    (root / "units.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
    env = {"CHROMA_RESUME_FAILPOINTS": "store.after_upsert@1=kill"}
    killed = run_cli(["build", *UNITS_BUILD, "--units", "units.jsonl", "--upsert-batch", "4"], cwd=root, env=env)
    assert killed.returncode == -9
    result = _units_build(root, rows, "--resume", "off")  # the metadata change reverted
    assert result.returncode == 0 and "up to date" not in result.stdout, result.stdout
    assert _units_build(clean, rows).returncode == 0
    assert collection_rows(root / ".chroma", "test") == collection_rows(clean / ".chroma", "test")


def test_sync_none_then_incremental_deletes_the_leftovers_without_a_repair(tmp_path, built):
    (built / "corpus" / "doc0001.md").unlink()
    (built / "corpus" / "doc0002.md").write_text("a new text. " * 40)
    assert build(built, "--sync-mode", "none").returncode == 0
    from chroma_resume import cli
    from chroma_resume.status import up_to_date

    c = cli.resolve_config({"root": str(built), **{k.lstrip("-").replace("-", "_"): v for k, v in
                                                    zip(HASH_BUILD[::2], HASH_BUILD[1::2])}}, folder=str(built))
    assert not up_to_date(c)[0]
    result = build(built)
    assert result.returncode == 0 and "key=orphans_deleted" not in result.stderr, result.stderr
    assert collection_rows(built / ".chroma", "test") == clean_build(tmp_path, built)
    assert up_to_date(c)[0]
