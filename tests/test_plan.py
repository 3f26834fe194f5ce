"""The recovery rules of DESIGN §4 as plain function calls: manifest + corpus + WAL -> plan."""
from __future__ import annotations

import pytest

from chroma_resume import wal
from chroma_resume.corpus import Document, Listing
from chroma_resume.plan import make_plan, resume_decision
from chroma_resume.state import DocEntry, meta_sha256

pytestmark = pytest.mark.timeout(30)

A1, A2, A3 = "a" * 64, "b" * 64, "c" * 64


def doc(uri: str, sha: str) -> Document:
    return Document(uri=uri, doc_id=f"id-{uri}", content_sha256=sha, source_type="md")


def entry(uri: str, sha: str, n: int) -> DocEntry:
    return DocEntry(doc_id=f"id-{uri}", content_sha256=sha, n_chunks=n, source_type="md")


def replay_of(*events: wal.Event) -> wal.Replay:
    r = wal.Replay(path="x")
    for ev in events:
        wal._apply(r, ev)
    return r


def begun(uri, sha, n):
    return wal.DocBegin(uri=uri, doc_id=f"id-{uri}", content_sha256=sha, n_chunks=n, kind="added")


def committed(uri, sha, n):
    return wal.DocCommitted(uri=uri, doc_id=f"id-{uri}", content_sha256=sha, n_chunks=n, chunks_upserted_total=0,
                            meta_sha256=meta_sha256({}, "md"))


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


@pytest.mark.parametrize("mode, action, stale", [("rewrite-all", "embed", 1), ("none", "unchanged", 0)])
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


# ---- crash + change: the WAL's facts beat the manifest (issue: recovery under change) ----------

def intent(uri, sha, n, reason="old"):
    return wal.DeleteIntent(uri=uri, doc_id=f"id-{uri}", old_content_sha256=sha, n_chunks=n, reason=reason)


def old_done(uri, sha, n):
    return wal.DeleteOldDone(uri=uri, doc_id=f"id-{uri}", old_content_sha256=sha, deleted_chunks=n)


def test_edit_undone_after_its_old_generation_was_deleted_is_put_back_then_the_edit_is_dropped():
    r = replay_of(begun("x", A2, 2), committed("x", A2, 2), intent("x", A1, 3), old_done("x", A1, 3))
    d = by_uri(make_plan([doc("x", A1)], {"x": entry("x", A1, 3)}, r, "incremental"))["x"]
    assert (d.action, d.kind) == ("embed", "restore")
    assert [(g.content_sha256, g.n_chunks) for g in d.old_generations] == [(A2, 2)]


def test_delete_intent_without_its_done_record_means_maybe_deleted():
    """Power loss can drop DELETE_OLD_DONE; the fsynced intent says the delete may have run."""
    r = replay_of(begun("x", A2, 2), committed("x", A2, 2), intent("x", A1, 3))
    d = by_uri(make_plan([doc("x", A1)], {"x": entry("x", A1, 3)}, r, "incremental"))["x"]
    assert (d.action, d.kind) == ("embed", "restore")


def test_removed_file_restored_after_its_stale_delete_is_put_back():
    r = replay_of(intent("x", A1, 3, "stale"),
                  wal.DeleteStaleDone(uri="x", doc_id="id-x", old_content_sha256=A1, deleted_chunks=3))
    plan = make_plan([doc("x", A1)], {"x": entry("x", A1, 3)}, r, "incremental")
    d = by_uri(plan)["x"]
    assert (d.action, d.kind, d.old_generations) == ("embed", "restore", []) and plan.stale == []


def test_a_generation_begun_again_after_its_delete_is_partial_not_gone():
    r = replay_of(begun("x", A2, 2), committed("x", A2, 2), intent("x", A1, 3), old_done("x", A1, 3),
                  begun("x", A1, 3))
    d = by_uri(make_plan([doc("x", A2)], {"x": entry("x", A1, 3)}, r, "incremental"))["x"]
    assert d.action == "resumed" and [(g.content_sha256, g.n_chunks) for g in d.old_generations] == [(A1, 3)]


def test_metadata_change_with_the_same_text_is_a_change_without_old_generations():
    known = DocEntry(doc_id="id-x", content_sha256=A1, n_chunks=2, source_type="md", metadata={"lang": "en"})
    changed = Document(uri="x", doc_id="id-x", content_sha256=A1, source_type="md", metadata={"lang": "fr"})
    d = by_uri(make_plan([changed], {"x": known}, None, "incremental"))["x"]
    assert (d.action, d.kind, d.old_generations) == ("embed", "meta", [])
    same = Document(uri="x", doc_id="id-x", content_sha256=A1, source_type="md", metadata={"lang": "en"})
    assert by_uri(make_plan([same], {"x": known}, None, "incremental"))["x"].action == "unchanged"


def test_doc_id_change_rekeys_from_the_old_generation():
    renamed = Document(uri="x", doc_id="new-id", content_sha256=A1, source_type="md")
    d = by_uri(make_plan([renamed], {"x": entry("x", A1, 3)}, None, "incremental"))["x"]
    assert (d.action, d.kind) == ("embed", "changed")
    assert [(g.doc_id, g.content_sha256) for g in d.reuse] == [("id-x", A1)]
    assert [(g.doc_id, g.content_sha256) for g in d.old_generations] == [("id-x", A1)]


@pytest.mark.parametrize("listing", [Listing(files={"sub/x"}), Listing(dirs={"sub"}), Listing(dirs={"."})])
def test_unreadable_document_keeps_its_entry_and_chunks(listing):
    plan = make_plan([], {"sub/x": entry("sub/x", A1, 3), "gone": entry("gone", A2, 1)}, None, "incremental", listing)
    d = by_uri(plan)
    if listing.dirs == {"."}:
        assert plan.stale == [] and plan.deleted == 0 and set(d) == {"sub/x", "gone"}
        return
    assert d["sub/x"].kind == "kept" and d["sub/x"].entry.content_sha256 == A1 and d["sub/x"].old_generations == []
    assert [g.uri for g in plan.stale] == ["gone"] and plan.deleted == 1 and plan.kept == 1


def test_unreadable_document_keeps_the_wal_committed_generation_over_the_manifest_one():
    r = replay_of(begun("x", A2, 2), committed("x", A2, 2))
    d = by_uri(make_plan([], {"x": entry("x", A1, 3)}, r, "incremental", Listing(files={"x"})))["x"]
    assert (d.kind, d.content_sha256, d.entry) == ("kept", A2, None)  # the build reads its entry from Chroma
    assert [g.content_sha256 for g in d.old_generations] == [A1]


def test_resume_refused_for_a_recreated_collection_or_with_the_wal_off():
    r = replay_of(_start(incarnation="one"))
    common = dict(mode="auto", schema_hash="s", collection="c", db="d", manifest_run_id=None)
    assert resume_decision(r, incarnation="one", **common).active
    assert resume_decision(r, incarnation="two", **common).reason.startswith("collection_recreated")
    assert resume_decision(r, incarnation="one", wal_enabled=False, **common).reason == "wal_off"


def test_a_doc_id_moved_to_another_uri_is_not_an_old_generation_of_its_first_uri():
    """Units: a's doc_id X (text T) moves to b; a gets doc_id Z. X:T is b's now: a must not delete it."""
    moved = Document(uri="b", doc_id="id-a", content_sha256=A1, source_type="md")
    renamed = Document(uri="a", doc_id="z", content_sha256=A2, source_type="md")
    d = by_uri(make_plan([moved, renamed], {"a": entry("a", A1, 3)}, None, "incremental"))
    assert d["a"].old_generations == [] and d["b"].action == "embed"


def test_resume_off_still_believes_the_wals_deletions_and_doubts_its_commits():
    r = replay_of(begun("x", A2, 2), committed("x", A2, 2), intent("x", A1, 3), old_done("x", A1, 3))
    d = by_uri(make_plan([doc("x", A2)], {"x": entry("x", A1, 3)}, r, "incremental", trust_commits=False))["x"]
    assert (d.action, d.n_chunks) == ("embed", 2) and d.old_generations == []


def test_sync_none_keeps_what_it_would_delete_and_a_later_sync_deletes_it():
    manifest = {"edit": entry("edit", A1, 2), "gone": entry("gone", A2, 1)}
    none = make_plan([doc("edit", A3)], manifest, None, "none")
    assert none.stale == [] and sorted(g.uri for g in none.leftovers) == ["edit", "gone"]
    later = make_plan([doc("edit", A3)], {"edit": entry("edit", A3, 1)}, None, "incremental",
                      leftovers=none.leftovers)
    assert sorted((g.uri, g.content_sha256) for g in later.stale) == [("edit", A1), ("gone", A2)]
