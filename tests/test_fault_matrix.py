"""The crash matrix (fault_injection/) on a CI-sized subset: kills at real boundaries of
the engine, damaged WALs, SIGTERM, a second writer, random SIGKILLs of a 200-document
build, crashes followed by a change of corpus or options (with and without power loss) and
two rows with the real model all recover to an index equal to a clean build."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, collection_rows, run_cli

sys.path.insert(0, str(REPO))

from chroma_resume import wal  # noqa: E402
from fault_injection import matrix, walfile  # noqa: E402
from fault_injection.scenarios import SCENARIOS, engine_args  # noqa: E402


def _run(tmp_path: Path, **options) -> list:
    rows = matrix.run(matrix.Options(work_dir=str(tmp_path), real_model_rows=0, **options))
    failed = [f"{r.scenario} {r.point}@{r.hit}: {r.failures}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
    return rows


# One row per kind of crash: kills at boundaries, power loss, SIGTERM, a second writer; and per
# kind of change between crash and resume: an edit, a delete, an undone edit, a restored file
# (under power loss), a switch to sync mode none, chunking, model and space changes,
# unreadable files, and tampering that only an id-set reconcile repairs.
KINDS = ("cold", "mix", "edit-after-crash", "delete-after-crash", "schema-reset", "fsync-off", "sigterm",
         "second-writer", "undo-after-crash", "restore-after-crash+fsync-off", "to-sync-none",
         "chunking-change+fsync-interval", "model-change", "space-change", "unreadable-after-crash",
         "tamper-after-crash")


@pytest.mark.timeout(300)
def test_a_row_of_every_kind_recovers(tmp_path):
    rows = _run(tmp_path, scenarios=KINDS, points=1, chain=2)
    assert [r.scenario for r in rows] == list(KINDS)
    for r in rows:
        assert r.recovered and r.kills >= 1 and r.reembedded <= r.bound
        assert (r.lost, r.duplicated, r.orphans, r.mismatched) == (0, 0, 0, 0)
        assert r.verify in (("pass", "fail (as expected)") if r.scenario == "to-sync-none" else ("pass",))
        kind = SCENARIOS[r.scenario].kind
        assert r.exits[-1] == 0
        assert {"kill": -9, "sigterm": 130, "writer": 3}[kind] in r.exits, (r.scenario, r.exits)
    assert {r.damage for r in rows} >= {"none", "powerloss"}


# DESIGN §13, the rows no planted-bug case runs as its control (tests/test_planted_bugs.py runs
# wal-off-then-revert, meta-tamper-after-crash and rewrite-cut-then-redone): a model swapped behind
# its path, a --write-state false run finished then reverted, a moved --db then reverted, a metadata
# rewrite cut by a crash then reverted.
TRUST_KINDS = ("model-swap-after-crash", "write-state-false-then-revert", "moved-db-then-revert",
               "meta-revert-after-crash")


@pytest.mark.timeout(300)
def test_a_row_of_every_trust_by_evidence_kind_recovers(tmp_path):
    rows = _run(tmp_path, scenarios=TRUST_KINDS, points=1, chain=2)
    assert [r.scenario for r in rows] == list(TRUST_KINDS)
    for r in rows:
        assert r.recovered and r.kills >= 1 and -9 in r.exits and r.exits[-1] == 0 and r.verify == "pass"
        assert (r.lost, r.duplicated, r.orphans, r.mismatched) == (0, 0, 0, 0)
    swap = rows[0]
    assert swap.reembedded > 0  # the first model's vectors are not reused: a swapped model is another schema


@pytest.mark.timeout(240)
def test_real_model_rows_recover(tmp_path):
    rows = matrix.run(matrix.Options(work_dir=str(tmp_path), scenarios=("real-model",), real_model_rows=2))
    assert len(rows) == 2
    assert all(r.ok for r in rows), [r.failures for r in rows]
    assert all(r.kills >= 1 and r.verify == "pass" for r in rows)


@pytest.mark.timeout(180)
def test_random_sigkills_of_a_200_document_build_equal_a_clean_build(tmp_path):
    (row,) = _run(tmp_path, scenarios=("random-kills",), keep=True, seed=7)
    assert row.kills >= 3 and row.exits.count(-9) == row.kills
    # An independent look with the test helpers: same rows as the golden, and verify passes.
    got = collection_rows(Path(row.folder) / "db", "matrix")
    golden = collection_rows(Path(row.golden) / "db", "matrix")
    assert len(got) > 400 and got == golden
    assert run_cli(["verify", *engine_args(SCENARIOS["random-kills"])], cwd=Path(row.folder)).returncode == 0


@pytest.mark.timeout(120)
def test_cli_prints_the_table_and_writes_the_report(tmp_path):
    report = tmp_path / "matrix.json"
    proc = subprocess.run([sys.executable, "-m", "fault_injection", "--scenario", "cold", "--points", "2",
                           "--real-model-rows", "0", "--work-dir", str(tmp_path), "--report", str(report)],
                          cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "re-emb/bound" in proc.stdout and "2 rows, " in proc.stdout and " kills, 0 failed" in proc.stdout
    data = json.loads(report.read_text())
    assert data["ok"] and data["rows"] == 2 and data["kills"] == sum(r["kills"] for r in data["results"]) >= 2
    assert all(r["kills"] >= 1 and r["recovered"] for r in data["results"])


@pytest.mark.timeout(30)
def test_damage_cuts_the_wal_as_a_crash_could(observed_wal):
    path, writer, sync_log = observed_wal
    for i in range(3):
        writer.append(wal.DocBegin(uri=f"d{i}", doc_id=f"id{i}", content_sha256=f"sha{i}", n_chunks=2 + i,
                                   kind="added"))
    writer.sync()  # e.g. the barrier before a delete: durable, yet no record declares it
    durable = writer.size
    writer.append(wal.DocCommitted(uri="d0", doc_id="id0", content_sha256="sha0", n_chunks=2,
                                   chunks_upserted_total=2))
    writer.close()
    before = walfile.records(path)
    assert [r.tag for r in before] == ["RUN_START", "DOC_BEGIN", "DOC_BEGIN", "DOC_BEGIN", "DOC_COMMITTED"]
    assert before[-1].event.synced_to == durable and before[-2].event.synced_to < durable
    # d1 and d2 were begun, not committed; d0 is committed but no longer current.
    assert walfile.wasted_chunks(before, before, 0, {"d0": "other", "d1": "sha1", "d2": "sha2"}) == 2 + 3 + 4

    walfile.damage(path, "torn")
    replay = wal.read(path)
    assert replay.truncated_tail and replay.last_event == "DOC_BEGIN" and replay.last_seq == 4

    # The last intact record declares an older fsync point: a cut there would drop durable records.
    assert walfile.records(path)[-1].event.synced_to < durable == walfile.synced_size(sync_log, path)
    walfile.damage(path, "powerloss", walfile.synced_size(sync_log, path))
    assert Path(path).stat().st_size == durable
    assert [r.tag for r in walfile.records(path)] == ["RUN_START", "DOC_BEGIN", "DOC_BEGIN", "DOC_BEGIN"]


@pytest.mark.timeout(60)
def test_a_row_dies_at_the_hit_it_names(tmp_path):
    """`@N` of a point without an event must be its N-th hit, or rows would test other boundaries."""
    (row,) = _run(tmp_path, scenarios=("cold",), kill="store.after_upsert@3", chain=1, damage="torn")
    assert row.exits == [-9, 0] and row.point == "store.after_upsert" and row.hit == 3 and row.damage == "torn"
