"""The WAL as a crash leaves it: read its intact records, damage it as a crash could.

The harness reads the file itself (with the engine's own CRC check) instead of asking
the engine, so a bug in the engine's replay cannot hide a bug in its recovery. What power
loss keeps is what the engine really fsynced, as engine.py observed it, not what the WAL
declares.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from chroma_resume import wal

DAMAGES = ("none", "torn", "powerloss", "hole", "powercut", "stalehnsw")
PAGE = 4096  # what a power loss drops or keeps at once


@dataclass(frozen=True)
class Record:
    event: wal.Event
    end: int  # byte offset just past this record's line

    @property
    def tag(self) -> str:
        return self.event.__struct_config__.tag


def records(path: str) -> list[Record]:
    """The intact records before the first damaged line ([] when the file is absent)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []
    out: list[Record] = []
    offset = 0
    for raw in data.splitlines(keepends=True):
        ev = wal.decode(raw[:-1]) if raw.endswith(b"\n") else None
        if ev is None:
            break
        offset += len(raw)
        out.append(Record(ev, offset))
    return out


def last_seq(path: str) -> int:
    recs = records(path)
    return recs[-1].event.seq if recs else 0


def synced_size(sync_log: Path, path: str) -> int:
    """The size the file at `path` had at its last fsync that returned (0 if never): the
    last line of the observer's log naming this file (same path and inode)."""
    try:
        inode = os.stat(path).st_ino
        lines = sync_log.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    real = os.path.realpath(path)
    sizes = [int(size) for synced, ino, size in (line.split("\t") for line in lines)
             if synced == real and int(ino) == inode]
    return sizes[-1] if sizes else 0


def damage(path: str, how: str, synced: int = 0) -> str:
    """Damage the WAL like a crash could; returns what was done, for the report.

    torn: the last line is cut in the middle (a write the kill interrupted).
    powerloss: the file is cut back to `synced`, the size of its last fsync.
    hole: the page after `synced` is zeroed and later pages kept: power loss writes back
    un-fsynced pages in any order (DESIGN §3: a torn tail, not corruption).
    powercut: powerloss, and Chroma's segment files (never fsynced by Chroma) emptied: see
    `empty_segments`, which the runner applies to the row's database.
    stalehnsw: powerloss, and Chroma's index folders back at the previous build's fsynced copy
    while chroma.sqlite3 moved on: see `restore_segments`, which the runner applies.
    """
    if how == "none" or not os.path.exists(path):
        return "none"
    size = os.path.getsize(path)
    if how == "torn":
        with open(path, "rb") as fh:
            data = fh.read()
        body = data[:-1] if data.endswith(b"\n") else data
        start = body.rfind(b"\n") + 1
        return _cut(path, size, start + (len(body) - start) // 2)
    if how in ("powerloss", "powercut", "stalehnsw"):
        return _cut(path, size, min(synced, size))
    if how == "hole":
        end = min(size, (synced // PAGE + 1) * PAGE)
        with open(path, "r+b") as fh:
            fh.seek(synced)
            fh.write(bytes(max(0, end - synced)))
        return f"hole:{synced}-{end}"
    raise ValueError(f"unknown damage {how!r} (expected one of {', '.join(DAMAGES)})")


SEGMENT_FILES = ("header.bin", "data_level0.bin", "length.bin", "link_lists.bin", "index_metadata.pickle")


def empty_segments(db: str) -> int:
    """What a power cut leaves of Chroma's vector index files when no build finished since they
    were written (only a finished build fsyncs them): 0 bytes each. Returns how many were cut."""
    cut = 0
    for folder, _, files in os.walk(db):
        for name in files:
            if name in SEGMENT_FILES:
                open(os.path.join(folder, name), "wb").close()
                cut += 1
    return cut


def restore_segments(older_db: str, db: str) -> int:
    """What a power cut leaves when Chroma re-wrote its index files during the run: each index
    folder of `db` back at its copy in `older_db` (the previous build's, fsynced when it finished),
    every file readable, while chroma.sqlite3 keeps what it committed. Returns how many folders."""
    restored = 0
    for name in os.listdir(db):
        older = os.path.join(older_db, name)
        if os.path.isdir(os.path.join(db, name)) and os.path.isdir(older):
            shutil.rmtree(os.path.join(db, name))
            shutil.copytree(older, os.path.join(db, name))
            restored += 1
    return restored


def _cut(path: str, size: int, cut: int) -> str:
    with open(path, "r+b") as fh:
        fh.truncate(cut)
    return f"cut:-{size - cut}B"


def wasted_chunks(before_damage: list[Record], after_damage: list[Record], since_seq: int,
                  final: dict[str, str]) -> int:
    """Chunks a killed run may have embedded for nothing: the generations it began
    (records after `since_seq`) that the surviving WAL does not show committed, or that
    are no longer current (`final`: uri -> content_sha256 of the finished index; empty when
    the run built another schema, whose vectors the final index cannot use)."""
    committed = {(r.event.uri, r.event.content_sha256) for r in after_damage if r.tag == "DOC_COMMITTED"}
    begun = {(r.event.uri, r.event.content_sha256): r.event.n_chunks
             for r in before_damage if r.tag == "DOC_BEGIN" and r.event.seq > since_seq}
    return sum(n for (uri, sha), n in begun.items() if (uri, sha) not in committed or final.get(uri) != sha)


def first_about(path: str, tag: str, uris: list[str]) -> tuple[str, int] | None:
    """The first `tag` record about one of `uris`: that uri, and which hit of `tag` it is
    (1-based, in the WAL's order, as failpoints count hits)."""
    hits = [r for r in records(path) if r.tag == tag]
    return next(((r.event.uri, i) for i, r in enumerate(hits, 1) if getattr(r.event, "uri", None) in uris), None)
