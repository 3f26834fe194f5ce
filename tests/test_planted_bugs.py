"""The harness must catch known bugs: with a planted-bug switch on, the matrix fails, for
the right reason, and prints how to reproduce each failing row; without it, the same rows pass.

Each bug has the row designed to expose it. A row needing the reconcile's repair fails by
design (a functional WARN), so a count-only reconcile shows only where the repair is the
right outcome: tampering behind the tool's back that leaves the count unchanged."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

# (switch, scenario, boundary, damage, what a failing row must say)
CASES = [
    # A changed document keeps its old generation: the final reconcile has to delete orphans.
    ("bug.skip_old_delete", "mix", "wal.after_append:DOC_DONE@5", "none", "orphans"),
    # DOC_COMMITTED is logged before the upsert; a kill right after it leaves the WAL ahead
    # of Chroma: chunks the WAL called committed are lost and must be embedded again. (Past the first
    # batch's commits: before any upsert the collection is empty, and a WAL over an empty collection is
    # set aside as describing nothing, so the first run's lie is never read.)
    ("bug.commit_before_upsert", "cold", "wal.after_append:DOC_COMMITTED@12", "none", "lost chunks"),
    # The edit is undone after its old generation was deleted: a plan that forgets the WAL's
    # deletion finds the manifest's generation equal to the file and keeps it as unchanged.
    ("bug.ignore_wal_deletions", "undo-after-crash", "wal.after_append:DELETE_OLD_DONE@target", "none", "lost"),
    ("bug.ignore_wal_deletions", "restore-after-crash", "wal.after_append:DELETE_STALE_DONE@target", "none",
     "lost"),
    # Killed right after the delete of the target's old generation, nothing since RUN_START was
    # fsynced (--wal-fsync off, no barrier): power loss takes the new generation's DOC_COMMITTED
    # and the delete's records, and the undone edit finds its old generation gone unannounced.
    ("bug.delete_before_barrier", "undo-after-crash+fsync-off", "store.after_delete@target", "powerloss", "lost"),
    # A power cut reverted Chroma's index files behind chroma.sqlite3: a store check that only opens
    # the store trusts it, and the rerun exits 0 over rows whose vectors the index lacks.
    ("bug.shallow_store_check", "stale-index", "build.reconcile@1", "stalehnsw", "Error finding id"),
    # One chunk deleted and a foreign id added behind the tool's back: the counts agree.
    ("bug.count_only_reconcile", "tamper-after-crash", "lock.acquired@1", "none", "not repaired"),
    # DESIGN §13. A --wal off run killed at its reconcile leaves no record but the collection's mark;
    # its metadata flips are reverted: trusting the manifest unaudited keeps the flipped rows, and
    # only the final reconcile's metadata comparison puts them back.
    ("bug.skip_audit", "wal-off-then-revert", "build.reconcile@1", "none", "engine repaired rewritten rows"),
    # A committed document's stored metadata changed behind the tool's back: a resume check by ids
    # passes it, and only the final reconcile's metadata comparison repairs the row (a functional WARN).
    ("bug.resume_ids_only", "meta-tamper-after-crash", "wal.after_append:DOC_COMMITTED@target", "none",
     "engine repaired rewritten rows"),
    # A committed flip, then a rewrite back cut half way, then the flip redone: a DOC_BEGIN that leaves
    # the commit standing skips the document as resumed, and only the content check's repair saves it.
    ("bug.begin_keeps_commit", "rewrite-cut-then-redone", "lock.acquired@1", "none", "engine repaired"),
]


def _matrix(tmp_path, scenario: str, kill: str, damage: str, *plant: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / f"report-{len(plant)}.json"
    args = ["--scenario", scenario, "--kill", kill, "--damage", damage, "--chain", "1", "--real-model-rows", "0",
            "--workers", "1", "--work-dir", str(tmp_path), "--report", str(report)]
    for switch in plant:
        args += ["--plant", switch]
    proc = subprocess.run([sys.executable, "-m", "fault_injection", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=110)
    return proc, json.loads(report.read_text())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("switch,scenario,kill,damage,reason", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_planted_bug_is_caught(tmp_path, switch, scenario, kill, damage, reason):
    proc, data = _matrix(tmp_path, scenario, kill, damage, switch)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = data["results"]
    assert not row["ok"] and row["recovered"]
    assert any(reason in why for why in row["failures"]), row["failures"]
    assert f"reproduce: python -m fault_injection --scenario {scenario}" in proc.stdout
    point = kill.rpartition("@")[0]
    assert f"--kill {point}@{row['hit']}" in row["reproduce"] and f"--plant {switch}" in row["reproduce"]

    control, data = _matrix(tmp_path, scenario, kill, damage)  # the same row without the bug passes
    assert control.returncode == 0 and data["ok"], control.stdout


@pytest.mark.timeout(120)
def test_skip_old_delete_is_caught_across_sampled_rows(tmp_path):
    """Not only at a hand-picked point: every sampled row of an incremental mix catches it."""
    report = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "fault_injection", "--scenario", "mix", "--points", "3",
                           "--plant", "bug.skip_old_delete", "--work-dir", str(tmp_path), "--report", str(report)],
                          cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 1
    rows = json.loads(report.read_text())["results"]
    assert len(rows) == 3 and all(r["orphans"] > 0 and not r["ok"] for r in rows)
