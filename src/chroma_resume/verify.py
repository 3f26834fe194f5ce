"""verify: the CI gate that proves the collection matches the manifest (DESIGN §6)."""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import msgspec

from . import config as cfg
from . import corpus, state, store, wal
from .config import Config
from .errors import ChromaResumeError
from .reporting import Warnings

SHOW = 5  # ids named in a failing check's detail


class Check(msgspec.Struct):
    name: str
    ok: bool
    detail: str


class VerifyResult(msgspec.Struct):
    checks: list[Check]
    fix: str

    @property
    def ok(self) -> bool:
        return all(ch.ok for ch in self.checks)


def verify(c: Config, *, fresh: bool = False) -> VerifyResult:
    p = state.paths(c)
    schema = cfg.schema_hash(c)
    checks: list[Check] = []
    build_cmd = "doit -a build (or chroma-resume build)"
    try:
        manifest = state.load_manifest(p["manifest"])
    except ChromaResumeError as exc:
        return VerifyResult([Check("manifest", False, str(exc))], f"restore the manifest or rebuild: {build_cmd}")
    latest = state.read_latest(p["collection_dir"])
    if manifest is None:
        checks.append(Check("manifest", False, f"no manifest at {p['manifest']}"))
        return VerifyResult(checks, f"run {build_cmd}")
    checks.append(Check("manifest", latest == schema == manifest.schema_hash,
                        f"{p['manifest']} schema={manifest.schema_hash} LATEST={latest} config={schema}"))
    checks.append(_wal_check(p["wal"]))
    db = store.open_store(c)
    if db is None:
        checks.append(Check("collection", False, f"collection {c.collection!r} does not exist in {cfg.db_identity(c)}"))
        return VerifyResult(checks, f"run {build_cmd}")
    expected = {i: (uri, entry) for uri, entry in manifest.documents.items()
                for i in state.generation_ids(entry.doc_id, entry.content_sha256, entry.n_chunks)}
    count = db.count()
    checks.append(Check("count", count == len(expected), f"collection has {count} chunks, manifest expects {len(expected)}"))
    actual: set[str] = set()
    bad_meta: list[str] = []
    bad_dim: list[str] = []
    for row in db.scan(include=("metadatas", "embeddings")):
        actual.add(row["id"])
        if row["id"] in expected and not _metadata_ok(row["metadata"] or {}, *expected[row["id"]]):
            bad_meta.append(row["id"])
        if manifest.dim is not None and len(row["embedding"]) != manifest.dim:
            bad_dim.append(row["id"])
    missing, orphans = sorted(set(expected) - actual), sorted(actual - set(expected))
    checks.append(Check("ids", not missing and not orphans,
                        f"missing={len(missing)} {missing[:SHOW]} orphans={len(orphans)} {orphans[:SHOW]}"))
    checks.append(Check("metadata", not bad_meta, f"{len(bad_meta)} chunk(s) disagree with the manifest {bad_meta[:SHOW]}"))
    checks.append(Check("dimension", not bad_dim and manifest.dim is not None,
                        f"manifest dim={manifest.dim}; {len(bad_dim)} vector(s) differ {bad_dim[:SHOW]}"))
    if fresh:
        checks.append(_fresh_check(c, manifest))
    return VerifyResult(checks, _fix(checks, build_cmd))


def _wal_check(path: str) -> Check:
    try:
        replay = wal.read(path)
    except ChromaResumeError as exc:
        return Check("wal", False, str(exc))
    if replay is None or replay.finished_ok:
        return Check("wal", True, "no unfinished WAL")
    return Check("wal", False, f"unfinished run {replay.start.run_id if replay.start else '?'} in {path} "
                               f"({replay.docs_committed} documents committed)")


def _metadata_ok(meta: dict, uri: str, entry: state.DocEntry) -> bool:
    return (meta.get("doc_id") == entry.doc_id and meta.get("content_sha256") == entry.content_sha256
            and meta.get("source_uri") == uri)


def _fresh_check(c: Config, manifest: state.Manifest) -> Check:
    with open(os.devnull, "w") as quiet:
        current = {d.uri: d.content_sha256 for d in corpus.scan(c, Warnings(stream=quiet))}
    recorded = {uri: e.content_sha256 for uri, e in manifest.documents.items()}
    added = sorted(set(current) - set(recorded))
    removed = sorted(set(recorded) - set(current))
    changed = sorted(u for u in set(current) & set(recorded) if current[u] != recorded[u])
    ok = not (added or removed or changed)
    return Check("fresh", ok, f"added={added[:SHOW]} changed={changed[:SHOW]} removed={removed[:SHOW]}")


def _fix(checks: list[Check], build_cmd: str) -> str:
    failed = {ch.name for ch in checks if not ch.ok}
    if "wal" in failed:
        return f"resume the unfinished run with {build_cmd}, or discard it with doit clean-wal --force"
    if "metadata" in failed or "dimension" in failed:
        return ("re-embed every document: doit -a build --sync-mode delete-stale "
                "(or chroma-resume build --sync-mode delete-stale)")
    if failed:
        return f"run {build_cmd} to repair the collection (it deletes orphans and re-embeds missing chunks)"
    return ""


def write_report(result: VerifyResult, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"ok": result.ok, "fix": result.fix, "checks": msgspec.to_builtins(result.checks)}, fh, indent=1)


def write_junit(result: VerifyResult, path: str) -> None:
    failures = sum(not ch.ok for ch in result.checks)
    suite = ET.Element("testsuite", name="chroma-resume.verify", tests=str(len(result.checks)),
                       failures=str(failures), errors="0")
    for ch in result.checks:
        case = ET.SubElement(suite, "testcase", classname="chroma_resume.verify", name=ch.name)
        if not ch.ok:
            ET.SubElement(case, "failure", message=ch.detail[:200]).text = f"{ch.detail}\nfix: {result.fix}"
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
