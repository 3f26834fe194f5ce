"""`resume-status` is read-only and model-free; `clean-wal` refuses unfinished runs unless forced (DESIGN §6)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chroma_resume import config as cfg
from chroma_resume import schema
from conftest import HASH_BUILD, lock_holder, run_cli, summary

pytestmark = pytest.mark.timeout(120)


def state_dir(root: Path, model: str = "hash:32") -> Path:
    return Path(schema.state_dir(cfg.make_config(root=str(root), docs="corpus", collection="test", embed_model=model)))


def wal_path(root: Path) -> Path:
    return state_dir(root) / "index_state.stage.jsonl"


def wal_records(root: Path) -> list[dict]:
    return [json.loads(line) for line in wal_path(root).read_bytes().splitlines()]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under the state root and the db: files by content, size and mtime; folders by mtime."""
    out = {}
    for top in (root / ".chroma-state", root / ".chroma"):
        for p in sorted([top, *top.rglob("*")]):
            info = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            out[str(p.relative_to(root))] = (digest, info.st_size if p.is_file() else 0, info.st_mtime_ns)
    return out


def key_values(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line and not line.startswith("["))


def status(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["resume-status", *HASH_BUILD, *extra], cwd=root)


def clean(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["clean-wal", *HASH_BUILD, *extra], cwd=root)


@pytest.fixture
def killed(workdir: Path) -> Path:
    """A first build SIGKILLed right after its 3rd DOC_COMMITTED: an unfinished, resumable WAL."""
    result = run_cli(["build", *HASH_BUILD], cwd=workdir,
                     env={"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@3=kill"})
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert wal_path(workdir).exists()
    return workdir


# ---- resume-status ----------------------------------------------------------------------

def test_status_after_a_killed_build_reports_the_wal_and_changes_nothing(killed):
    records = wal_records(killed)
    committed = {r["uri"] for r in records if r["t"] == "DOC_COMMITTED"}
    batches = [r for r in records if r["t"] == "UPSERT_BATCH_COMMITTED"]
    before = snapshot(killed)

    result = status(killed)
    assert result.returncode == 0, result.stderr
    got = key_values(result.stdout)
    assert got["resume_active"] == "true" and got["resume_reason"] == "wal_resumable"
    assert got["wal_docs_committed"] == str(len(committed)) == "3"
    assert got["wal_run_id"] == records[0]["run_id"]
    assert got["wal_committed_batches"] == str(len(batches))
    assert got["wal_upsert_rows_committed_total"] == str(batches[-1]["chunks_upserted_total"])
    assert (got["wal_present"], got["state_present"], got["wal_finished_ok"]) == ("true", "false", "false")
    assert got["wal_last_event"] == "DOC_COMMITTED" and got["wal_path"] == str(wal_path(killed))
    assert {s["uri"] for s in json.loads(got["samples"])} <= committed
    assert snapshot(killed) == before


def test_status_json_is_one_object_with_the_same_keys(killed):
    lines = key_values(status(killed).stdout)
    before = snapshot(killed)
    result = status(killed, "--json")
    assert result.returncode == 0, result.stderr
    (blob,) = [line for line in result.stdout.splitlines() if line.startswith("{")]
    report = json.loads(blob)
    assert set(report) == set(lines)
    assert report["resume_active"] is True and report["wal_docs_committed"] == 3
    assert report["wal_run_id"] == lines["wal_run_id"]
    assert snapshot(killed) == before


def test_status_json_stdout_parses_as_json(killed):
    result = status(killed, "--json")
    assert isinstance(json.loads(result.stdout), dict)


def test_status_needs_no_model_and_creates_nothing(killed):
    before = snapshot(killed)
    args = [a if a != "hash:32" else "./no/such/model" for a in HASH_BUILD]
    result = run_cli(["resume-status", *args], cwd=killed)
    assert result.returncode == 0, result.stderr
    got = key_values(result.stdout)
    assert got["schema_hash"] == schema.schema_hash(cfg.make_config(embed_model="./no/such/model"))
    assert got["resume_active"] == "false" and got["resume_reason"] == "no_wal"
    assert not state_dir(killed, "./no/such/model").exists()
    assert snapshot(killed) == before


def test_status_imports_no_model_library_and_no_chromadb(killed):
    code = """if True:
        import json, sys
        from chroma_resume.config import make_config
        from chroma_resume.status import status
        reports = [status(make_config(root=sys.argv[1], docs="corpus", collection="test", embed_model=model))
                   for model in ("hash:32", "BAAI/bge-small-en-v1.5", "./no/such/model")]
        heavy = [m for m in ("torch", "chromadb", "FlagEmbedding", "transformers", "sentence_transformers")
                 if m in sys.modules]
        print(json.dumps({"heavy": heavy, "active": [r["resume_active"] for r in reports]}))
    """
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    done = subprocess.run([sys.executable, "-c", code, str(killed)], capture_output=True, text=True, timeout=60,
                          env={**env, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {"heavy": [], "active": [True, False, False]}


# ---- the writer lock: status ignores it, clean-wal honours it ----------------------------

@pytest.mark.timeout(60)
def test_status_ignores_and_clean_wal_honours_a_held_writer_lock(killed):
    lock = state_dir(killed).parent / "writer.lock"
    wal_bytes = wal_path(killed).read_bytes()
    with lock_holder(killed, lock, HASH_BUILD) as holder:
        seen = status(killed)
        assert seen.returncode == 0 and key_values(seen.stdout)["resume_active"] == "true"
        refused = clean(killed, "--force")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert f"pid={holder.pid}" in refused.stderr
        assert wal_path(killed).read_bytes() == wal_bytes


# ---- clean-wal --------------------------------------------------------------------------

def test_clean_wal_refuses_an_unfinished_run_without_force(killed):
    wal_bytes = wal_path(killed).read_bytes()
    run_id = wal_records(killed)[0]["run_id"]
    for extra in ([], ["--archive", "arch"]):
        result = clean(killed, *extra)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"unfinished run {run_id}" in result.stderr and "3 committed document(s)" in result.stderr
        assert "--force" in result.stderr
    assert wal_path(killed).read_bytes() == wal_bytes
    assert not (killed / "arch").exists()


def test_clean_wal_force_removes_it_and_the_next_build_starts_over(killed):
    run_id = wal_records(killed)[0]["run_id"]
    result = clean(killed, "--force")
    assert result.returncode == 0, result.stderr
    assert str(wal_path(killed)) in result.stdout and run_id in result.stdout and "forced" in result.stdout
    assert not wal_path(killed).exists()

    rebuilt = run_cli(["build", *HASH_BUILD], cwd=killed)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "resume_active=false reason=no_wal" in rebuilt.stdout
    assert summary(rebuilt.stdout)["docs_processed"] == "12"
    assert run_cli(["verify", *HASH_BUILD], cwd=killed).returncode == 0


def test_clean_wal_archive_keeps_the_exact_bytes(killed):
    wal_bytes = wal_path(killed).read_bytes()
    run_id = wal_records(killed)[0]["run_id"]
    result = clean(killed, "--force", "--archive", "arch")
    assert result.returncode == 0, result.stderr
    target = killed / "arch" / f"index_state.stage.{run_id}.jsonl.gz"
    assert str(target) in result.stdout or f"arch/{target.name}" in result.stdout
    assert gzip.decompress(target.read_bytes()) == wal_bytes
    assert not wal_path(killed).exists()


@pytest.mark.parametrize("force", [False, True])
def test_clean_wal_on_a_wal_whose_first_record_is_torn(workdir, force):
    """A run killed inside its first append leaves no readable RUN_START: refused without --force,
    removed with it; never a traceback."""
    path = wal_path(workdir)
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"t":"RUN_START","seq":1,"run_')
    result = clean(workdir, *(["--force"] if force else []))
    assert "Traceback" not in result.stderr
    if force:
        assert result.returncode == 0 and "unreadable" in result.stdout and not path.exists(), result.stderr
    else:
        assert result.returncode == 2 and "first record is unreadable" in result.stderr and "--force" in result.stderr
        assert path.read_bytes() == b'{"t":"RUN_START","seq":1,"run_'


def test_clean_wal_without_a_wal_says_so(workdir):
    result = clean(workdir)
    assert result.returncode == 0
    assert "nothing to clean" in result.stdout
    assert not (workdir / ".chroma-state").exists()
