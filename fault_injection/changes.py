"""What happens between a crash and the resume (DESIGN §9): the corpus or Chroma changes.

Each change names the documents it may touch (its candidates) from the starting state, and
the golden decides its targets once, so the golden build, the choice of kill points and
every row agree on them. A change with an `anchor` targets the candidate the clean run
logged that WAL event for first (the engine chooses its own order), and kills are sampled
from that event on: before it the change would meet a plain edit, not the situation it
exists for. `in_golden` says whether the golden's corpus carries the change (a skipped
document keeps its previous content, and tampering is undone by the reconcile, so their
goldens are the unchanged corpus).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .scenarios import ATTIC, COLLECTION, MOVED_DB, UNITS, UNITS_START, Scenario, engine_paths, mixed, read_units, write_units

FOREIGN_SHA = "f0e1d2c3b4a5"  # the generation part of the id tampering adds


@dataclass(frozen=True)
class Change:
    name: str
    candidates: Callable[[Path, Scenario], list[str]]  # uris, from the folder's starting state
    apply: Callable[[Path, list[str]], None]
    anchor: str | None = None  # WAL event about the target: sampled kills come after the first one
    in_golden: bool = True
    finish_first: bool = False  # a build with the first options is run to exit 0 before the change
    new_schema: bool = False  # the change makes another schema (a model swapped behind its path)


def _documents(folder: Path, s: Scenario) -> list[str]:
    return sorted(p.name for p in (folder / "corpus").iterdir())


def _edited(folder: Path, s: Scenario) -> list[str]:
    return [uri for kind in ("grown", "shrunk", "same-size") for uri in mixed(folder, kind)]


def _edit(folder: Path, uris: list[str]) -> None:
    for uri in uris:
        path = folder / "corpus" / uri
        path.write_text(path.read_text(encoding="utf-8") + "Edited after the crash. " * 40, encoding="utf-8")


def _delete(folder: Path, uris: list[str]) -> None:
    for uri in uris:
        (folder / "corpus" / uri).unlink()


def _put_back(folder: Path, uris: list[str]) -> None:
    """The exact bytes the starting index was built from (an undone edit, a restored file)."""
    for uri in uris:
        shutil.copy2(folder / ATTIC / uri, folder / "corpus" / uri)


def _make_unreadable(folder: Path, uris: list[str]) -> None:
    """As root, chmod stops nothing: the first target becomes a FIFO (not a regular file),
    the second a symlink to a missing file. The scanner skips both with a WARN."""
    fifo, link = (folder / "corpus" / uri for uri in uris)
    fifo.unlink()
    os.mkfifo(fifo)
    link.unlink()
    link.symlink_to(folder / "unmounted" / link.name)


def _tamper(folder: Path, uris: list[str]) -> None:
    """Behind the tool's back: the last chunk of a document is deleted and a foreign id of the
    same document added, so the count does not change."""
    import chromadb
    from chromadb.api.client import SharedSystemClient

    try:
        col = chromadb.PersistentClient(path=str(folder / "db")).get_collection(COLLECTION)
        got = col.get(where={"source_uri": uris[0]}, include=["documents", "metadatas", "embeddings"])
        last = max(range(len(got["ids"])), key=lambda i: got["metadatas"][i]["chunk_index"])
        meta = dict(got["metadatas"][last])
        foreign = f"{meta['doc_id']}:{FOREIGN_SHA}:0"
        col.delete(ids=[got["ids"][last]])
        col.add(ids=[foreign], embeddings=[got["embeddings"][last]], documents=[got["documents"][last]],
                metadatas=[{**meta, "content_sha256": FOREIGN_SHA.ljust(64, "0"), "chunk_index": 0}])
    finally:
        SharedSystemClient.clear_system_cache()


def _tamper_target(folder: Path, s: Scenario) -> list[str]:
    """An unchanged document of two chunks or more: the resume has no reason to touch it."""
    from chroma_resume import state

    manifest = state.load_manifest(engine_paths(folder, s, final=False)["manifest"])
    return [next(uri for uri in mixed(folder, "unchanged") if manifest.documents[uri].n_chunks >= 2)]


def _revert_units(folder: Path, uris: list[str]) -> None:
    """The units' lines as the starting index was built from them (a metadata flip undone)."""
    start = {u["source_uri"]: u for u in read_units(folder / ATTIC / UNITS_START)}
    write_units(folder / UNITS, [start[u["source_uri"]] if u["source_uri"] in uris else u
                                 for u in read_units(folder / UNITS)])


def _move_db_and_revert(folder: Path, uris: list[str]) -> None:
    (folder / "db").rename(folder / MOVED_DB)
    _revert_units(folder, uris)


def _swap_model(folder: Path, uris: list[str]) -> None:
    from . import tinymodel

    tinymodel.swap_weights(folder / "tiny-model")


def _tamper_meta(folder: Path, uris: list[str]) -> None:
    """Behind the tool's back: one stored row of a committed document gets other metadata (same id,
    text and vector), so only a resume check that reads content finds it."""
    import chromadb
    from chromadb.api.client import SharedSystemClient

    try:
        col = chromadb.PersistentClient(path=str(folder / "db")).get_collection(COLLECTION)
        got = col.get(where={"source_uri": uris[0]}, include=["metadatas"])
        col.update(ids=[got["ids"][0]], metadatas=[{**got["metadatas"][0], "lang": "tampered"}])
    finally:
        SharedSystemClient.clear_system_cache()


CHANGES: dict[str, Change] = {c.name: c for c in (
    Change("edit", _documents, _edit, anchor="DOC_COMMITTED"),
    Change("delete", _documents, _delete, anchor="DOC_COMMITTED"),
    Change("undo", _edited, _put_back, anchor="DELETE_OLD_DONE"),
    Change("restore", lambda folder, s: mixed(folder, "removed"), _put_back, anchor="DELETE_STALE_DONE"),
    Change("unreadable", lambda folder, s: mixed(folder, "unchanged")[:2], _make_unreadable, in_golden=False),
    Change("tamper", _tamper_target, _tamper, in_golden=False),
    Change("revert", lambda folder, s: mixed(folder, "flipped"), _revert_units, anchor="DOC_COMMITTED"),
    Change("finish-then-revert", lambda folder, s: mixed(folder, "flipped"), _revert_units, anchor="DOC_COMMITTED",
           finish_first=True),
    Change("move-db-then-revert", lambda folder, s: mixed(folder, "flipped"), _move_db_and_revert,
           anchor="DOC_COMMITTED"),
    Change("swap-model", lambda folder, s: [], _swap_model, new_schema=True),
    Change("tamper-meta", lambda folder, s: mixed(folder, "flipped"), _tamper_meta, anchor="DOC_COMMITTED",
           in_golden=False),
)}
