"""The parts of the crash matrix that decide what a crash + change row expects, tested alone:
each change does what it claims, power loss keeps what was fsynced and its holes read as a torn
tail, `--kill POINT@target` names the target's boundary, a switch to sync mode none may keep or
drop stale generations and nothing else, and copied folders name themselves."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

from chroma_resume import corpus, state, wal  # noqa: E402
from fault_injection import compare, matrix, runner, walfile  # noqa: E402
from fault_injection.changes import CHANGES  # noqa: E402
from fault_injection.runner import Boundary, Golden  # noqa: E402
from fault_injection.scenarios import SCENARIOS, engine_config, engine_paths, mixed, prepare  # noqa: E402


@pytest.fixture(scope="module")
def mix_start(tmp_path_factory) -> Path:
    """The starting state of the mix scenarios: an index of 32 documents, then the mix."""
    folder = tmp_path_factory.mktemp("start") / "start"
    prepare(SCENARIOS["undo-after-crash"], folder, seed=0)
    return folder


def _copy(start: Path, tmp_path: Path) -> Path:
    return runner._copy(start, tmp_path / "row")


def _manifest(folder: Path) -> state.Manifest:
    return state.load_manifest(engine_paths(folder, SCENARIOS["undo-after-crash"])["manifest"])


@pytest.mark.timeout(120)
def test_undo_and_restore_put_back_the_indexed_bytes(mix_start, tmp_path):
    folder = _copy(mix_start, tmp_path)
    documents = _manifest(folder).documents
    for change, kind in (("undo", "grown"), ("restore", "removed")):
        uris = mixed(folder, kind)
        CHANGES[change].apply(folder, uris)
        for uri in uris:
            assert hashlib.sha256((folder / "corpus" / uri).read_bytes()).hexdigest() == documents[uri].content_sha256


@pytest.mark.timeout(120)
def test_unreadable_files_are_skipped_not_absent(mix_start, tmp_path):
    folder = _copy(mix_start, tmp_path)
    targets = CHANGES["unreadable"].candidates(folder, SCENARIOS["unreadable-after-crash"])
    CHANGES["unreadable"].apply(folder, targets)
    warned: list[tuple[str, str]] = []
    c = engine_config(folder, SCENARIOS["unreadable-after-crash"])
    scanned = {d.uri for d in corpus.scan(c, lambda key, **f: warned.append((key, f.get("path"))))}
    assert len(targets) == 2 and not scanned & set(targets)
    assert {path for _, path in warned} == set(targets)  # reported, so "skipped", not silently absent
    assert set(mixed(folder, "unchanged")) - set(targets) <= scanned


@pytest.mark.timeout(120)
def test_tampering_keeps_the_count_and_swaps_one_id(mix_start, tmp_path):
    folder = _copy(mix_start, tmp_path)
    (target,) = CHANGES["tamper"].candidates(folder, SCENARIOS["tamper-after-crash"])
    before = compare.ids(folder, SCENARIOS["tamper-after-crash"])
    CHANGES["tamper"].apply(folder, [target])
    after = compare.ids(folder, SCENARIOS["tamper-after-crash"])
    entry = _manifest(folder).documents[target]
    assert len(after) == len(before) and entry.n_chunks >= 2
    assert before - after == {state.chunk_id(entry.doc_id, entry.content_sha256, entry.n_chunks - 1)}
    (foreign,) = after - before
    assert foreign.startswith(entry.doc_id + ":")


def test_a_hole_after_the_fsync_point_is_a_torn_tail(observed_wal):
    """Power loss may keep later pages and lose an earlier one: zeros, then intact records that
    declare an older fsync point. The engine must read that as a torn tail, not corruption."""
    path, writer, sync_log = observed_wal
    for i in range(60):  # more than a page, none fsynced
        writer.append(wal.DocBegin(uri=f"d{i}", doc_id=f"id{i}", content_sha256=f"sha{i}", n_chunks=1, kind="added"))
    writer.close()
    synced = walfile.synced_size(sync_log, path)
    size = os.path.getsize(path)
    assert 0 < synced < size - walfile.PAGE

    walfile.damage(path, "hole", synced)
    data = Path(path).read_bytes()
    end = (synced // walfile.PAGE + 1) * walfile.PAGE
    assert len(data) == size and data[synced:end] == bytes(end - synced)
    assert any(wal.decode(line) for line in data[end:].split(b"\n")[1:])  # intact records after the hole
    replay = wal.read(path)  # does not raise WalCorrupt
    assert replay.truncated_tail and replay.good_size == synced and replay.last_event == "RUN_START"


def _golden(boundaries: list[str], anchor: int | None) -> Golden:
    bounds = runner._boundaries(boundaries)
    return Golden("undo-after-crash", compare.Facts({}, {}, False, True), [], bounds, ["doc0001.md"], anchor)


def test_kill_at_target_names_the_last_hit_up_to_the_anchor():
    gold = _golden(["lock.acquired:", "store.after_delete:", "wal.after_append:DELETE_OLD_DONE",
                    "store.after_delete:", "wal.after_append:DELETE_OLD_DONE", "store.after_delete:"], anchor=4)
    assert matrix.resolve("store.after_delete@target", gold) == Boundary("store.after_delete", 2)
    assert matrix.resolve("wal.after_append:DELETE_OLD_DONE@target", gold) == \
        Boundary("wal.after_append:DELETE_OLD_DONE", 2)
    assert matrix.resolve("store.after_delete@3", gold) == Boundary("store.after_delete", 3)
    assert matrix._eligible(SCENARIOS["undo-after-crash"], gold)[0] == Boundary("wal.after_append:DELETE_OLD_DONE", 2)
    with pytest.raises(matrix.NoSuchBoundary):
        matrix.resolve("manifest.before_replace@target", gold)
    with pytest.raises(matrix.NoSuchBoundary):
        matrix.resolve("store.after_delete@target", _golden(["store.after_delete:"], anchor=None))


def _facts(ids: list[str], manifest: dict) -> compare.Facts:
    rows = {i: ("text", {"source_uri": i.split(":")[0], "chunk_index": int(i.rsplit(":", 1)[1])},
                np.zeros(2, dtype=np.float32)) for i in ids}
    return compare.Facts(rows, manifest, False, True)


def test_only_stale_generations_may_differ_after_a_switch_to_sync_none():
    manifest = {"a.md": ("a", "1" * 64, 1)}
    current, stale_old = "a:111111111111:0", "a:222222222222:0"
    golden = _facts([current, stale_old], manifest)
    assert golden.stale == {stale_old}
    dropped = _facts([current], manifest)
    assert compare.diff(golden, dropped).lost == [stale_old]
    assert compare.diff(golden, dropped, golden.stale).lost == []
    foreign = _facts([current, stale_old, "a:333333333333:0"], manifest)
    assert compare.diff(golden, foreign, golden.stale).orphans == ["a:333333333333:0"]
    assert compare.diff(golden, _facts([stale_old], manifest), golden.stale).lost == [current]
    assert [n for n, s in SCENARIOS.items() if s.stale_may_differ] == \
        ["to-sync-none", "to-sync-none+fsync-off", "to-sync-none+fsync-interval"]


def test_a_copy_names_itself_in_its_manifests(tmp_path):
    src = tmp_path / "start"
    manifest = src / "state" / "matrix" / "abc" / state.MANIFEST_NAME
    manifest.parent.mkdir(parents=True)
    manifest.write_text(f'{{"db": "{src / "db"}"}}', encoding="utf-8")
    dst = runner._copy(src, tmp_path / "row")
    assert (dst / manifest.relative_to(src)).read_text() == f'{{"db": "{dst / "db"}"}}'
    assert manifest.read_text() == f'{{"db": "{src / "db"}"}}'
