"""The WAL's on-disk rules (DESIGN §3): CRC per line, seq, torn tail vs corruption."""
from __future__ import annotations

import json
import os

import pytest

from chroma_resume import wal
from chroma_resume.errors import WalCorrupt

pytestmark = pytest.mark.timeout(30)


def _start() -> wal.RunStart:
    return wal.RunStart(wal_version=wal.WAL_VERSION, schema_hash="s", collection="c", db="d",
                        sync_mode="incremental", config={}, pid=1, host="h")


def _write(path, events, policy="doc") -> wal.Writer:
    w = wal.Writer(str(path), "run1", policy=policy, interval=2)
    for ev in events:
        w.append(ev)
        if isinstance(ev, wal.DocDone):
            w.commit_group()
    w.close()
    return w


def _doc_events(i: int) -> list[wal.Event]:
    uri, sha = f"d{i}.md", f"{i:064x}"
    return [wal.DocBegin(uri=uri, doc_id=f"id{i}", content_sha256=sha, n_chunks=2, kind="added"),
            wal.UpsertBatchCommitted(batch_no=i, batch_size=2, chunks_upserted_total=2 * i),
            wal.DocCommitted(uri=uri, doc_id=f"id{i}", content_sha256=sha, n_chunks=2, chunks_upserted_total=2 * i),
            wal.DocDone(uri=uri, doc_id=f"id{i}", content_sha256=sha)]


def _lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_records_are_one_crc_checked_line_each_with_seq(tmp_path):
    path = tmp_path / "w.jsonl"
    _write(path, [_start(), *_doc_events(1)])
    lines = _lines(path)
    assert len(lines) == 5
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["t"] for r in records] == ["RUN_START", "DOC_BEGIN", "UPSERT_BATCH_COMMITTED", "DOC_COMMITTED", "DOC_DONE"]
    assert all(r["run_id"] == "run1" and "crc" in r for r in records)
    replay = wal.read(str(path))
    assert [(g.content_sha256, g.state) for g in replay.generations["d1.md"].values()] == [(f"{1:064x}", "committed")]
    assert replay.chunks_upserted_total == 2 and not replay.truncated_tail


def test_a_flipped_byte_fails_its_crc():
    line = wal.encode(_start())[:-1]
    assert wal.decode(line) is not None
    flipped = line.replace(b'"collection":"c"', b'"collection":"x"')
    assert wal.decode(flipped) is None


@pytest.mark.parametrize("damage", ["cut_mid_line", "zeros_after", "garbage_after"])
def test_damaged_last_record_is_a_torn_tail(tmp_path, damage):
    path = tmp_path / "w.jsonl"
    _write(path, [_start(), *_doc_events(1), *_doc_events(2)])
    good = path.read_bytes()
    last_start = good.rstrip(b"\n").rfind(b"\n") + 1
    if damage == "cut_mid_line":
        path.write_bytes(good[: last_start + 20])
        good_size = last_start
    elif damage == "zeros_after":
        path.write_bytes(good + b"\0" * 300)
        good_size = len(good)
    else:
        path.write_bytes(good + b'{"t":"DOC_BEG')
        good_size = len(good)
    replay = wal.read(str(path))
    assert replay.truncated_tail and replay.good_size == good_size
    wal.drop_torn_tail(str(path), replay.good_size)
    assert path.read_bytes() == good[:good_size]
    # appending after the cut continues seq with no gap, and the file reads clean
    w = wal.Writer(str(path), "run1", policy="doc", interval=1, next_seq=replay.last_seq + 1)
    w.append(wal.RunResume(pid=2, host="h"))
    w.close()
    again = wal.read(str(path))
    assert not again.truncated_tail and again.last_event == "RUN_RESUME" and again.resumes == 1


def test_damage_before_fsynced_records_is_corruption_naming_line_and_offset(tmp_path):
    path = tmp_path / "w.jsonl"
    _write(path, [_start(), *_doc_events(1), *_doc_events(2), *_doc_events(3)])
    lines = _lines(path)
    broken = bytearray(lines[2])
    broken[10] ^= 0x01  # line 3 belongs to a commit group that was fsynced, and later records say so
    path.write_bytes(b"".join(lines[:2]) + bytes(broken) + b"".join(lines[3:]))
    with pytest.raises(WalCorrupt) as err:
        wal.read(str(path))
    offset = len(lines[0]) + len(lines[1])
    assert "line 3" in str(err.value) and f"byte {offset}" in str(err.value)


def test_hole_after_the_last_fsync_point_is_a_torn_tail_not_corruption(tmp_path):
    """Power loss with --wal-fsync off may drop un-fsynced pages out of order."""
    path = tmp_path / "w.jsonl"
    _write(path, [_start(), *_doc_events(1), *_doc_events(2)], policy="off")
    lines = _lines(path)
    holed = b"".join(lines[:3]) + b"\0" * len(lines[3]) + b"".join(lines[4:])
    path.write_bytes(holed)
    replay = wal.read(str(path))
    assert replay.truncated_tail
    assert replay.good_size == sum(len(x) for x in lines[:3])
    assert replay.last_seq == 3


def test_seq_gap_is_corruption(tmp_path):
    path = tmp_path / "w.jsonl"
    _write(path, [_start(), *_doc_events(1)])
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    with pytest.raises(WalCorrupt, match="line 3.*seq 4 follows 2"):
        wal.read(str(path))


def test_newer_wal_version_refuses(tmp_path):
    path = tmp_path / "w.jsonl"
    start = _start()
    start.wal_version = wal.WAL_VERSION + 1
    _write(path, [start])
    with pytest.raises(WalCorrupt, match="newer"):
        wal.read(str(path))


def test_fsync_policy_declares_synced_offsets(tmp_path):
    """`doc` syncs per commit group, so each group's first record declares the previous group's end."""
    path = tmp_path / "w.jsonl"
    _write(path, [_start(), *_doc_events(1), *_doc_events(2)], policy="doc")
    records = [json.loads(line) for line in _lines(path)]
    sizes = [len(line) for line in _lines(path)]
    assert records[1]["synced_to"] == sizes[0]  # RUN_START is always fsynced
    assert records[5]["synced_to"] == sum(sizes[:5])  # after the first DOC_DONE group
    off = tmp_path / "off.jsonl"
    _write(off, [_start(), *_doc_events(1), *_doc_events(2)], policy="off")
    assert {json.loads(line)["synced_to"] for line in _lines(off)[1:]} == {len(_lines(off)[0])}


def test_single_write_per_record(tmp_path, monkeypatch):
    """One os.write per record: a kill can cut a record short but never interleave two."""
    calls = []
    real_write = os.write
    monkeypatch.setattr(wal.os, "write", lambda fd, data: calls.append(data) or real_write(fd, data))
    _write(tmp_path / "w.jsonl", [_start(), *_doc_events(1)])
    assert len(calls) == 5 and all(c.endswith(b"}\n") and c.count(b"\n") == 1 for c in calls)
