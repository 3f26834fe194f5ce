"""The resume promise under Windows' file semantics, simulated on Linux (tests/windows_sim.py).

First that each simulated behaviour is on (and that it catches the bug it stands for), then the
whole life of an index under it: build, a kill at a boundary, resume (documents skipped, nothing
reset), verify, clean-wal --archive (a valid gzip), repair of a broken store.
"""
from __future__ import annotations

import errno
import gzip
import json
import ntpath
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HASH_BUILD, REPO, summary, write_corpus

pytestmark = [pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="simulates Windows on Linux (/proc, fcntl)"),
              pytest.mark.timeout(300)]
SIM = REPO / "tests" / "windows_sim.py"


@pytest.fixture
def windows_semantics(monkeypatch):
    import windows_sim

    windows_sim.install(lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False))
    return windows_sim


# ---- each behaviour is on ----------------------------------------------------------------------

def test_a_folder_cannot_be_opened_and_a_read_only_handle_cannot_be_fsynced(windows_semantics, tmp_path):
    with pytest.raises(PermissionError) as refused:
        os.open(tmp_path, os.O_RDONLY)
    assert refused.value.errno == errno.EACCES
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_BINARY)
    try:
        with pytest.raises(OSError) as bad:
            os.fsync(fd)
        assert bad.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_without_o_binary_newlines_are_written_as_crlf(windows_semantics, tmp_path):
    for name, flags in (("text", 0), ("binary", os.O_BINARY)):
        fd = os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT | flags, 0o644)
        assert os.write(fd, b"a\nb\n") == 4
        os.close(fd)
    assert (tmp_path / "text").read_bytes() == b"a\r\nb\r\n" and (tmp_path / "binary").read_bytes() == b"a\nb\n"


def test_an_open_file_or_a_folder_holding_one_cannot_be_renamed_or_removed(windows_semantics, tmp_path):
    (tmp_path / "d").mkdir()
    held = tmp_path / "d" / "held"
    held.write_bytes(b"x")
    with open(held, "rb"):
        for act in (lambda: os.replace(held, tmp_path / "moved"), lambda: os.unlink(held),
                    lambda: os.rename(tmp_path / "d", tmp_path / "e")):
            with pytest.raises(PermissionError) as refused:
                act()
            assert refused.value.winerror == 32
    os.replace(held, tmp_path / "moved")  # closed: allowed
    assert ntpath.normcase("A/B") == os.path.normcase("A/B") == "a\\b"


def test_chroma_releases_its_files_so_a_broken_store_can_be_set_aside(windows_semantics, tmp_path):
    import chromadb

    from chroma_resume import osfs, store

    db = tmp_path / "db"
    chromadb.PersistentClient(path=str(db)).get_or_create_collection("col").add(ids=["a"], embeddings=[[1.0, 0.0]])
    with pytest.raises(PermissionError):  # Chroma holds its SQLite file: Windows refuses
        os.replace(db, tmp_path / "aside")
    store.release_files(str(db))
    osfs.replace(str(db), str(tmp_path / "aside"))
    assert (tmp_path / "aside" / "chroma.sqlite3").exists()


# ---- the life of an index ----------------------------------------------------------------------

def cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The CLI in a process where every Windows behaviour is on."""
    full = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    full.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO / "tests"), full.get("PYTHONPATH", "")]),
                **env)
    return subprocess.run([sys.executable, str(SIM), *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=240)


KILL_AT_3RD_COMMIT = "wal.after_append:DOC_COMMITTED@3=kill"


def _wal(root: Path) -> Path:
    return next((root / ".chroma-state").rglob("index_state.stage.jsonl"))


def test_build_kill_resume_verify_archive_repair(tmp_path):
    texts = write_corpus(tmp_path / "corpus", 10)
    killed = cli(["build", *HASH_BUILD], tmp_path, CHROMA_RESUME_FAILPOINTS=KILL_AT_3RD_COMMIT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    raw = _wal(tmp_path).read_bytes()
    assert b"\r" not in raw and [json.loads(line)["t"] for line in raw.splitlines()].count("DOC_COMMITTED") == 3

    resumed = cli(["build", *HASH_BUILD], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    s = summary(resumed.stdout)
    assert "resume_active=true" in resumed.stdout and s["docs_resumed_skipped"] == "3", resumed.stdout
    assert s["chunks_deleted"] == "0" and "reset" not in resumed.stderr, resumed.stdout + resumed.stderr
    assert cli(["verify", *HASH_BUILD], tmp_path).returncode == 0

    (tmp_path / "corpus" / "doc0001.md").write_text(texts["doc0001.md"] + "more\n", encoding="utf-8")
    killed = cli(["build", *HASH_BUILD], tmp_path, CHROMA_RESUME_FAILPOINTS="wal.after_append:DOC_COMMITTED@1=kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    wal_bytes = _wal(tmp_path).read_bytes()
    archived = cli(["clean-wal", *HASH_BUILD, "--force", "--archive", "arch"], tmp_path)
    assert archived.returncode == 0, archived.stderr
    assert gzip.decompress(next((tmp_path / "arch").glob("*.jsonl.gz")).read_bytes()) == wal_bytes

    for segment in (tmp_path / ".chroma").glob("*/*.bin"):  # a power cut empties Chroma's segment files
        segment.write_bytes(b"")
    repaired = cli(["repair", *HASH_BUILD], tmp_path)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "[REPAIR] store broken: set aside at" in repaired.stdout
    assert list(tmp_path.glob(".chroma.corrupt-*")) and cli(["verify", *HASH_BUILD], tmp_path).returncode == 0


def test_the_simulation_catches_a_text_mode_wal(tmp_path):
    """With O_BINARY forgotten, Windows writes `\\r\\n`: the rerun must find no WAL to resume (the silent
    loss of the issue). So the passing test above depends on osfs opening binary."""
    write_corpus(tmp_path / "corpus", 6)
    killed = cli(["build", *HASH_BUILD], tmp_path, CHROMA_RESUME_FAILPOINTS=KILL_AT_3RD_COMMIT,
                 WINDOWS_SIM_FORGET_BINARY="1")
    assert killed.returncode == -signal.SIGKILL and b"\r\n" in _wal(tmp_path).read_bytes()
    rerun = cli(["build", *HASH_BUILD], tmp_path, WINDOWS_SIM_FORGET_BINARY="1")
    assert summary(rerun.stdout)["docs_resumed_skipped"] == "0" and "resume_active=false" in rerun.stdout
