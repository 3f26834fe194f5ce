"""`verify`, the CI gate (DESIGN §6): passes on a good index, fails naming the check for each kind of damage,
and the fix it prints repairs it."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chroma_resume import config as cfg
from conftest import HASH_BUILD, run_cli, run_shell

pytestmark = pytest.mark.timeout(120)

ALL_CHECKS = ["manifest", "wal", "store", "fingerprint", "count", "ids", "metadata", "text", "dimension", "vectors"]
KILL_AT_3RD_COMMIT = {"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@3=kill"}


def state_dir(root: Path) -> Path:
    """The state folder of the schema LATEST names (the one the last build wrote)."""
    collection = Path(cfg.collection_dir(cfg.make_config(root=str(root), docs="corpus", collection="test")))
    return collection / (collection / "LATEST").read_text().strip()


def build(root: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(["build", *HASH_BUILD, *extra], cwd=root, env=env)


def verify(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["verify", *HASH_BUILD, *extra], cwd=root)


def printed_fix(failing: subprocess.CompletedProcess) -> str:
    """The overall fix verify printed (its `fix: ` line on stderr)."""
    return next(line for line in failing.stderr.splitlines() if line.startswith("fix: "))[len("fix: "):]


def apply_fix(root: Path, failing: subprocess.CompletedProcess, base: list[str] = HASH_BUILD) -> None:
    """Run the overall `fix:` line exactly as printed, from a shell (`base`: the options verify ran with,
    which the printed line must carry by itself)."""
    line = printed_fix(failing)
    for option in base[::2]:
        assert option in line, f"the fix does not carry {option}: {line}"
    done = run_shell(line, cwd=root)
    assert done.returncode == 0, line + "\n" + done.stdout + done.stderr


def checks(stdout: str) -> dict[str, tuple[bool, str]]:
    """`[PASS] name: detail` lines -> name -> (ok, detail)."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith(("[PASS] ", "[FAIL] ")):
            name, detail = line[7:].split(": ", 1)
            out[name] = (line.startswith("[PASS]"), detail)
    return out


def failed(stdout: str) -> set[str]:
    return {name for name, (ok, _) in checks(stdout).items() if not ok}


def first_chunk_id(root: Path, uri: str = "doc0002.md") -> str:
    entry = json.loads((state_dir(root) / "index_state.json").read_text())["documents"][uri]
    return f"{entry['doc_id']}:{entry['content_sha256'][:12]}:0"


def behind_the_back(root: Path, code: str) -> None:
    """Change the collection with chromadb directly, in another process (as another program would)."""
    script = ("import sys, chromadb\nclient = chromadb.PersistentClient(path=sys.argv[1])\n"
              "col = client.get_collection('test')\n" + code)
    done = subprocess.run([sys.executable, "-c", script, str(root / ".chroma")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def built(workdir: Path) -> Path:
    result = build(workdir)
    assert result.returncode == 0, result.stderr
    return workdir


def test_verify_passes_after_a_build(built):
    result = verify(built)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(checks(result.stdout)) == ALL_CHECKS and not failed(result.stdout)
    assert "verify: ok" in result.stdout


# Damage done behind the tool's back: (chromadb code using col/client/VICTIM, checks that must fail, text named).
TAMPER = {
    "deleted_chunk": ("col.delete(ids=[VICTIM])", {"count", "ids"}, "VICTIM"),
    "orphan": ("col.add(ids=['foreign:0'], embeddings=[[0.5] * 32], documents=['not ours'])", {"count", "ids"},
               "foreign:0"),
    # equal counts prove nothing: only the id sets differ
    "orphan_for_a_deleted_chunk": ("col.delete(ids=[VICTIM])\n"
                                   "col.add(ids=['foreign:0'], embeddings=[[0.5] * 32], documents=['not ours'])",
                                   {"ids"}, "VICTIM"),
    "metadata": ("col.update(ids=[VICTIM], metadatas=[{'content_sha256': 'x'}])", {"metadata"}, "VICTIM"),
    "collection_dropped": ("client.delete_collection('test')", {"collection"}, "'test'"),
}


def tamper(root: Path, code: str, named: str = "") -> str:
    """Apply `code` with VICTIM bound to the first chunk of doc0002.md; returns `named` with it filled in."""
    victim = first_chunk_id(root)
    behind_the_back(root, code.replace("VICTIM", repr(victim)))
    return named.replace("VICTIM", victim)


def assert_fails_then_fix_repairs(root: Path, must_fail: set[str], named: str, *flags: str) -> None:
    """verify fails exactly `must_fail`, each naming `named` with its fix; the overall fix, run as printed, repairs."""
    result = verify(root, *flags)
    assert result.returncode == 1, result.stdout + result.stderr
    assert failed(result.stdout) == must_fail, result.stdout
    for name in must_fail - {"count"}:
        assert named in checks(result.stdout)[name][1], result.stdout
    assert result.stdout.count("       fix: ") == len(must_fail)
    assert f"verify: FAILED ({', '.join(n for n in checks(result.stdout) if n in must_fail)})" in result.stderr
    assert "fix: chroma-resume " in result.stderr

    apply_fix(root, result)
    again = verify(root, *flags)
    assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.parametrize("case", list(TAMPER))
def test_verify_fails_naming_the_check_and_its_fix_repairs_it(built, case):
    code, must_fail, named = TAMPER[case]
    assert_fails_then_fix_repairs(built, must_fail, tamper(built, code, named))


def test_verify_fails_on_an_unfinished_wal_and_passes_once_resumed(built):
    for i in range(5):  # give the next build work to do, then kill it mid-way
        (built / "corpus" / f"doc{i:04d}.md").write_text(f"edited document {i}.\n" * 40)
    killed = build(built, env=KILL_AT_3RD_COMMIT)
    assert killed.returncode == -signal.SIGKILL
    wal = state_dir(built) / "index_state.stage.jsonl"
    run_id = json.loads(wal.read_bytes().splitlines()[0])["run_id"]

    result = verify(built)
    assert result.returncode == 1
    assert "wal" in failed(result.stdout)
    detail = checks(result.stdout)["wal"][1]
    assert run_id in detail and str(wal) in detail and "3 documents committed" in detail
    assert "chroma-resume clean-wal" in detail and "--force` would discard it" in detail  # named; the fix resumes

    apply_fix(built, result)
    again = verify(built, "--fresh")
    assert again.returncode == 0, again.stdout


def test_a_finished_but_unrecorded_run_reads_the_same_in_verify_and_resume_status(built):
    """Killed between RUN_FINISH and the manifest's replace: both say what the next build does with it."""
    (built / "corpus" / "doc0003.md").write_text("edited after the first build.\n")
    killed = build(built, env={"CHROMA_RESUME_FAILPOINTS": "manifest.before_replace=kill"})
    assert killed.returncode == -signal.SIGKILL
    status = json.loads(run_cli(["resume-status", *HASH_BUILD, "--json"], cwd=built).stdout)
    assert status["wal_finished_ok"] is True and status["resume_active"] is True, status

    result = verify(built)
    assert failed(result.stdout) == {"wal", "ids"}, result.stdout  # Chroma holds the unrecorded generation
    detail = checks(result.stdout)["wal"][1]
    assert detail.startswith("finished but unrecorded") and status["wal_run_id"] in detail
    assert f"resume_active=true reason={status['resume_reason']}" in detail

    apply_fix(built, result)
    assert verify(built, "--fresh").returncode == 0


def test_verify_fails_after_a_killed_first_build(workdir):
    assert build(workdir, env=KILL_AT_3RD_COMMIT).returncode == -signal.SIGKILL
    result = verify(workdir)
    assert result.returncode == 1
    assert failed(result.stdout) == {"manifest", "wal"} and "no manifest at" in result.stdout
    apply_fix(workdir, result)
    assert verify(workdir).returncode == 0


def test_fresh_fails_naming_added_changed_and_removed_documents(built):
    corpus = built / "corpus"
    (corpus / "new.md").write_text("a brand new document\n")
    (corpus / "doc0004.md").write_text("rewritten\n")
    (corpus / "doc0007.md").unlink()
    stale = verify(built, "--fresh")
    assert stale.returncode == 1
    assert failed(stale.stdout) == {"fresh"}
    assert checks(stale.stdout)["fresh"][1] == "added=['new.md'] changed=['doc0004.md'] removed=['doc0007.md']"
    assert verify(built).returncode == 0  # without --fresh the index itself is still consistent
    apply_fix(built, stale)
    assert verify(built, "--fresh").returncode == 0


def test_an_empty_corpus_verifies(tmp_path):
    (tmp_path / "corpus").mkdir()
    assert build(tmp_path).returncode == 0
    result = verify(tmp_path, "--fresh", "--deep", "all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "count: collection has 0 chunks, manifest expects 0" in result.stdout


def test_an_unreachable_store_is_exit_5_with_the_cause(built):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = verify(built, "--chroma-host", "127.0.0.1", "--chroma-port", str(port), "--retry-for", "1")
    assert result.returncode == 5, result.stdout + result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
