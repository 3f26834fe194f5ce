"""The recovery rules of DESIGN §4 as plain function calls: manifest + corpus + WAL -> plan."""
from __future__ import annotations

import pytest

from chroma_resume import wal
from chroma_resume.corpus import Document
from chroma_resume.plan import make_plan, resume_decision
from chroma_resume.state import DocEntry

pytestmark = pytest.mark.timeout(30)

A1, A2, A3 = "a" * 64, "b" * 64, "c" * 64


def doc(uri: str, sha: str) -> Document:
    return Document(uri=uri, doc_id=f"id-{uri}", content_sha256=sha, source_type="md")


def entry(uri: str, sha: str, n: int) -> DocEntry:
    return DocEntry(doc_id=f"id-{uri}", content_sha256=sha, n_chunks=n)


def replay_of(*events: wal.Event) -> wal.Replay:
    r = wal.Replay(path="x")
    for ev in events:
        wal._apply(r, ev)
    return r


def begun(uri, sha, n):
    return wal.DocBegin(uri=uri, doc_id=f"id-{uri}", content_sha256=sha, n_chunks=n, kind="added")


def committed(uri, sha, n):
    return wal.DocCommitted(uri=uri, doc_id=f"id-{uri}", content_sha256=sha, n_chunks=n, chunks_upserted_total=0)


def by_uri(plan):
    return {d.uri: d for d in plan.docs}


def test_incremental_diff_without_wal():
    plan = make_plan([doc("same", A1), doc("edit", A2), doc("new", A3)],
                     {"same": entry("same", A1, 2), "edit": entry("edit", A1, 3), "gone": entry("gone", A1, 4)},
                     None, "incremental")
    d = by_uri(plan)
    assert (plan.added, plan.changed, plan.unchanged, plan.deleted) == (1, 1, 1, 1)
    assert d["same"].action == "unchanged" and d["new"].action == "embed" and d["new"].kind == "added"
    assert d["edit"].action == "embed" and d["edit"].old_content_sha256 == A1
    assert [(g.uri, g.content_sha256, g.n_chunks) for g in d["edit"].old_generations] == [("edit", A1, 3)]
    assert [(g.uri, g.n_chunks) for g in plan.stale] == [("gone", 4)]


def test_committed_document_is_skipped_and_begun_one_is_embedded_again():
    r = replay_of(begun("x", A1, 2), committed("x", A1, 2), begun("y", A2, 5))
    d = by_uri(make_plan([doc("x", A1), doc("y", A2)], {}, r, "incremental"))
    assert d["x"].action == "resumed" and d["x"].n_chunks == 2
    assert d["y"].action == "embed" and d["y"].old_generations == []


def test_committed_document_edited_after_the_crash_makes_its_generation_old():
    r = replay_of(begun("x", A1, 2), committed("x", A1, 2))
    d = by_uri(make_plan([doc("x", A2)], {}, r, "incremental"))["x"]
    assert d.action == "embed"
    assert [(g.content_sha256, g.n_chunks) for g in d.old_generations] == [(A1, 2)]


def test_partly_upserted_generation_of_an_edited_document_is_deleted_after_the_new_commit():
    r = replay_of(begun("x", A2, 7))  # began A2 over manifest's A1, crashed, then edited to A3
    d = by_uri(make_plan([doc("x", A3)], {"x": entry("x", A1, 3)}, r, "incremental"))["x"]
    assert d.action == "embed"
    assert sorted((g.content_sha256, g.n_chunks) for g in d.old_generations) == [(A1, 3), (A2, 7)]


def test_old_generation_already_deleted_is_not_deleted_again():
    r = replay_of(begun("x", A2, 2), committed("x", A2, 2),
                  wal.DeleteOldDone(uri="x", doc_id="id-x", old_content_sha256=A1, deleted_chunks=3))
    d = by_uri(make_plan([doc("x", A2)], {"x": entry("x", A1, 3)}, r, "incremental"))["x"]
    assert d.action == "resumed" and d.old_generations == []


def test_document_deleted_after_a_crash_loses_every_generation():
    r = replay_of(begun("x", A2, 2), committed("x", A2, 2))
    plan = make_plan([], {"x": entry("x", A1, 3)}, r, "incremental")
    assert sorted((g.content_sha256, g.n_chunks) for g in plan.stale) == [(A1, 3), (A2, 2)]
    done = replay_of(wal.DeleteStaleDone(uri="x", doc_id="id-x", old_content_sha256=A1, deleted_chunks=3))
    assert make_plan([], {"x": entry("x", A1, 3)}, done, "incremental").stale == []


def test_edit_reverted_after_crash_keeps_manifest_generation_and_drops_the_other():
    r = replay_of(begun("x", A2, 2), committed("x", A2, 2))
    d = by_uri(make_plan([doc("x", A1)], {"x": entry("x", A1, 3)}, r, "incremental"))["x"]
    assert d.action == "unchanged" and [g.content_sha256 for g in d.old_generations] == [A2]


@pytest.mark.parametrize("mode, action, stale", [("delete-stale", "embed", 1), ("none", "unchanged", 0)])
def test_sync_modes(mode, action, stale):
    plan = make_plan([doc("same", A1), doc("edit", A2)], {"same": entry("same", A1, 1), "edit": entry("edit", A1, 1),
                                                           "gone": entry("gone", A1, 1)}, None, mode)
    d = by_uri(plan)
    assert d["same"].action == action and len(plan.stale) == stale
    assert (d["edit"].old_generations != []) == (mode != "none")


def _start(**kw):
    base = dict(wal_version=1, schema_hash="s", collection="c", db="d", sync_mode="incremental",
                config={}, pid=1, host="h", run_id="r1")
    base.update(kw)
    return wal.RunStart(**base)


@pytest.mark.parametrize("kw, mode, manifest_run, active, reason", [
    ({}, "auto", None, True, "wal_resumable"),
    ({}, "off", None, False, "resume_off"),
    ({"db": "other"}, "auto", None, False, "db_mismatch"),
    ({"collection": "other"}, "auto", None, False, "collection_mismatch"),
])
def test_resume_decision(kw, mode, manifest_run, active, reason):
    r = replay_of(_start(**kw))
    decision = resume_decision(r, mode=mode, schema_hash="s", collection="c", db="d", manifest_run_id=manifest_run)
    assert decision.active is active and decision.reason.startswith(reason)


def test_finished_wal_is_stale_only_once_its_manifest_is_written():
    r = replay_of(_start(), wal.RunFinish(ok=True, reason="ok"))
    r.last_event = "RUN_FINISH"
    pending = resume_decision(r, mode="auto", schema_hash="s", collection="c", db="d", manifest_run_id="older")
    stale = resume_decision(r, mode="auto", schema_hash="s", collection="c", db="d", manifest_run_id="r1")
    assert pending.active and not stale.active and stale.reason == "wal_finished_ok"
