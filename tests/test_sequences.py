"""Randomized sequences (fault_injection/sequences.py): crashes, torn writes, SIGTERM, edits, metadata
flips, re-keys, reverts, option changes, `--write-state false`, `--wal off`, `--resume off`, moved
database folders and folders backed up, restored or copied between runs, chained at random, each ending with a normal build equal to a clean build of the
final corpus and options (rows read back in a fresh process) and `verify` passing.

CI runs a small budget; `CHROMA_RESUME_SEQUENCES=N` (and `CHROMA_RESUME_SEQUENCE_SEED=S`) runs more,
as does `python -m fault_injection.sequences --sequences N --seed S`."""
from __future__ import annotations

import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

from fault_injection import sequences  # noqa: E402

COUNT = int(os.environ.get("CHROMA_RESUME_SEQUENCES", "3"))
SEED = int(os.environ.get("CHROMA_RESUME_SEQUENCE_SEED", "13"))


@pytest.mark.timeout(max(240, 60 * COUNT))
def test_random_sequences_end_equal_to_a_clean_build(tmp_path):
    outcomes = sequences.run(COUNT, SEED, steps=6, workers=2, work_dir=str(tmp_path))
    assert len(outcomes) == COUNT
    failed = [o.report() for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)
    # Each sequence really ran its steps: the first build, six steps, the final build.
    assert all(len(o.steps) == 8 for o in outcomes)
    modes = {step.split(" | run ")[1].split()[0] for o in outcomes for step in o.steps if " | run " in step}
    assert len(modes) >= 3, modes
    # Folders are backed up, restored, copied or switched between runs (issue 24: copies vouched for by
    # records written for another copy).
    assert any(w in step for o in outcomes for step in o.steps for w in ("back up", "restore", "copy", "switch"))


def test_a_failing_sequence_names_its_seed_and_steps():
    o = sequences.Outcome(seed=5, index=2, steps=["run finish: exit 0", "edit u001 | run kill x@1=kill: exit -9"],
                          n_steps=1, failure="differs from a clean build: 1 differ")
    text = o.report()
    assert "seed 5" in text and "2. edit u001" in text
    assert "reproduce: python -m fault_injection.sequences --seed 5 --only 2 --steps 1 --keep" in text
