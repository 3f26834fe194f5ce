"""The WAL as a crash leaves it: read its intact records, damage it as a crash could.

The harness reads the file itself (with the engine's own CRC check) instead of asking
the engine, so a bug in the engine's replay cannot hide a bug in its recovery.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from chroma_resume import wal

DAMAGES = ("none", "torn", "powerloss")


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


def damage(path: str, how: str) -> str:
    """Damage the WAL like a crash could; returns what was done, for the report.

    torn: the last line is cut in the middle (a write the kill interrupted).
    powerloss: the file is cut back to what was surely fsynced: the `synced_to` the last
    intact record declares, or its own end when it is a RUN_* record (always fsynced).
    """
    if how == "none" or not os.path.exists(path):
        return "none"
    size = os.path.getsize(path)
    if how == "torn":
        with open(path, "rb") as fh:
            data = fh.read()
        body = data[:-1] if data.endswith(b"\n") else data
        start = body.rfind(b"\n") + 1
        cut = start + (len(body) - start) // 2
    elif how == "powerloss":
        recs = records(path)
        last = recs[-1] if recs else None
        cut = 0 if last is None else (last.end if last.tag.startswith("RUN_") else last.event.synced_to)
    else:
        raise ValueError(f"unknown damage {how!r} (expected one of {', '.join(DAMAGES)})")
    with open(path, "r+b") as fh:
        fh.truncate(cut)
    return f"{how}:-{size - cut}B"


def wasted_chunks(before_damage: list[Record], after_damage: list[Record], since_seq: int,
                  final: dict[str, str]) -> int:
    """Chunks a killed run may have embedded for nothing: the generations it began
    (records after `since_seq`) that the surviving WAL does not show committed, or that
    are no longer current (`final`: uri -> content_sha256 of the finished index)."""
    committed = {(r.event.uri, r.event.content_sha256) for r in after_damage if r.tag == "DOC_COMMITTED"}
    begun = {(r.event.uri, r.event.content_sha256): r.event.n_chunks
             for r in before_damage if r.tag == "DOC_BEGIN" and r.event.seq > since_seq}
    return sum(n for (uri, sha), n in begun.items() if (uri, sha) not in committed or final.get(uri) != sha)
