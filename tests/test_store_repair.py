"""A power cut can empty Chroma's segment files: the store is told broken, set aside and rebuilt
from the embedding cache; and a finished build has fsynced every file a cut could empty."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from conftest import HASH_BUILD, collection_rows, run_cli, summary, write_corpus

pytestmark = pytest.mark.timeout(300)
SEGMENT_FILES = ("header.bin", "data_level0.bin", "length.bin", "link_lists.bin", "index_metadata.pickle")


def build(root: Path, *extra: str):
    return run_cli(["build", *HASH_BUILD, "--embed-log", "embedded.log", *extra], cwd=root)


def cut_power(db: Path) -> list[Path]:
    """What the cut leaves: every segment file of every index folder 0 bytes long."""
    cut = [f for f in db.glob("*/*") if f.name in SEGMENT_FILES]
    for f in cut:
        f.write_bytes(b"")
    return cut


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A clean build of more than 1,000 chunks: Chroma has written its segment files."""
    root = tmp_path_factory.mktemp("big")
    write_corpus(root / "corpus", 300, seed=7, sizes=(400, 900, 1500))
    result = build(root)
    assert result.returncode == 0, result.stderr
    assert int(summary(result.stdout)["expected_chunks"]) > 1000
    return root


@pytest.fixture
def broken(big: Path, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(big, root)
    assert cut_power(root / ".chroma"), "Chroma wrote no segment files"
    return root


def test_status_and_verify_name_the_broken_store_and_the_fix(broken):
    status = run_cli(["resume-status", *HASH_BUILD], cwd=broken)
    assert status.returncode == 0 and "store_files_ok=false" in status.stdout and "store_fix=" in status.stdout
    verify = run_cli(["verify", *HASH_BUILD], cwd=broken)
    assert verify.returncode == 1 and "[FAIL] store" in verify.stdout
    assert "repair" in verify.stderr and "Traceback" not in verify.stdout + verify.stderr


def test_build_sets_the_folder_aside_and_rebuilds_from_the_cache(big, broken):
    before = (broken / "embedded.log").read_text().split()
    result = build(broken)
    assert result.returncode == 0, result.stderr
    s = summary(result.stdout)
    assert s["chunks_embedded"] == "0" and int(s["chunks_from_cache"]) == int(s["expected_chunks"])
    assert (broken / "embedded.log").read_text().split() == before  # no model call
    aside = Path(s["store_set_aside"])
    assert aside.name.startswith(".chroma.corrupt-") and aside.is_dir() and "key=store_set_aside" in result.stderr
    assert collection_rows(broken / ".chroma", "test") == collection_rows(big / ".chroma", "test")
    assert "[PASS] store" in result.stdout or run_cli(["verify", *HASH_BUILD], cwd=broken).returncode == 0


def test_fail_policy_reports_once_without_retrying(broken):
    result = build(broken, "--on-store-corrupt", "fail")
    assert result.returncode == 5 and "cannot read its own files" in result.stderr
    assert "[WAIT]" not in result.stderr and "repair" in result.stderr
    assert not list(broken.glob(".chroma.corrupt-*"))


def test_repair_verb_rebuilds_and_verifies(broken):
    result = run_cli(["repair", *HASH_BUILD, "--on-store-corrupt", "fail"], cwd=broken)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[REPAIR] store broken: set aside at" in result.stdout and "chunks_embedded=0" in result.stdout


def test_a_finished_build_has_fsynced_every_chroma_file_before_its_manifest(tmp_path, monkeypatch):
    """Durable finish, observed: which paths were fsynced, in what order."""
    engine = importlib.import_module("chroma_resume.build")  # the module; chroma_resume.build is the API
    from chroma_resume import cli

    write_corpus(tmp_path / "corpus", 40, seed=2, sizes=(400, 900, 1500))
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    c = cli.resolve_config({"root": str(tmp_path), "docs": "corpus", "collection": "test", "embed_model": "hash:32",
                            "progress": "off"}, folder=str(tmp_path))
    with open(os.devnull, "w") as quiet:
        engine.build(c, out=quiet, err=quiet)
    manifest_at = next(i for i, p in enumerate(synced) if "index_state.json.tmp" in p)
    db = tmp_path / ".chroma"
    files = [str(p) for p in db.rglob("*") if p.is_file()] + [str(p) for p in db.rglob("*") if p.is_dir()]
    assert files and all(f in synced[:manifest_at] for f in files), set(files) - set(synced[:manifest_at])


def test_release_files_closes_every_handle_this_process_holds_in_the_store(tmp_path):
    """Windows cannot rename or delete a folder with a file open inside: before a store is set aside,
    this process holds nothing there (observed in /proc/self/fd)."""
    import chromadb

    from chroma_resume import store

    db = tmp_path / "db"
    chromadb.PersistentClient(path=str(db)).get_or_create_collection("col").add(ids=["a"], embeddings=[[1.0, 0.0]])

    def held() -> list[str]:
        return [t for t in (os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                            if os.path.exists(f"/proc/self/fd/{fd}")) if t.startswith(str(db))]

    assert held(), "the client opened nothing: the check would prove nothing"
    store.release_files(str(db))
    assert held() == []
    assert chromadb.PersistentClient(path=str(db)).get_collection("col").count() == 1  # a new client starts afresh
