"""The harness must catch known bugs: with a planted-bug switch on, the matrix fails, for
the right reason, and prints how to reproduce each failing row; without it, the same rows pass."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

# (switch, scenario, boundary, what a failing row must say)
CASES = [
    # A changed document keeps its old generation: the final reconcile has to delete orphans.
    ("bug.skip_old_delete", "mix", "wal.after_append:DOC_DONE@5", "orphans"),
    # DOC_COMMITTED is logged before the upsert; a kill right after it leaves the WAL ahead
    # of Chroma: chunks the WAL called committed are lost and must be embedded again.
    ("bug.commit_before_upsert", "cold", "wal.after_append:DOC_COMMITTED@1", "lost chunks"),
]


def _matrix(tmp_path, scenario: str, kill: str, *plant: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / f"report-{len(plant)}.json"
    args = ["--scenario", scenario, "--kill", kill, "--real-model-rows", "0", "--work-dir", str(tmp_path),
            "--report", str(report)]
    for switch in plant:
        args += ["--plant", switch]
    proc = subprocess.run([sys.executable, "-m", "fault_injection", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=110)
    return proc, json.loads(report.read_text())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("switch,scenario,kill,reason", CASES, ids=[c[0] for c in CASES])
def test_planted_bug_is_caught(tmp_path, switch, scenario, kill, reason):
    proc, data = _matrix(tmp_path, scenario, kill, switch)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = data["results"]
    assert not row["ok"] and row["recovered"]
    assert any(reason in why for why in row["failures"]), row["failures"]
    assert f"reproduce: python -m fault_injection --scenario {scenario}" in proc.stdout
    assert f"--kill {kill}" in row["reproduce"] and f"--plant {switch}" in row["reproduce"]

    control, data = _matrix(tmp_path, scenario, kill)  # the same row without the bug passes
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
