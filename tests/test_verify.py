"""`verify`, the CI gate (DESIGN §6): passes on a good index, fails naming the check for each kind of damage."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from chroma_resume import config as cfg
from conftest import HASH_BUILD, run_cli

pytestmark = pytest.mark.timeout(120)

ALL_CHECKS = ["manifest", "wal", "count", "ids", "metadata", "dimension"]
KILL_AT_3RD_COMMIT = {"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@3=kill"}


def state_dir(root: Path) -> Path:
    return Path(cfg.state_dir(cfg.make_config(root=str(root), docs="corpus", collection="test", embed_model="hash:32")))


def build(root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(["build", *HASH_BUILD], cwd=root, env=env)


def verify(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["verify", *HASH_BUILD, *extra], cwd=root)


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
    "metadata": ("col.update(ids=[VICTIM], metadatas=[{'content_sha256': 'x'}])", {"metadata"}, "VICTIM"),
    "collection_dropped": ("client.delete_collection('test')", {"collection"}, "'test'"),
}


def tamper(root: Path, case: str) -> tuple[set[str], str]:
    code, must_fail, named = TAMPER[case]
    victim = first_chunk_id(root)
    behind_the_back(root, code.replace("VICTIM", repr(victim)))
    return must_fail, named.replace("VICTIM", victim)


@pytest.mark.parametrize("case", list(TAMPER))
def test_verify_fails_naming_the_check_and_a_build_repairs_it(built, case):
    must_fail, named = tamper(built, case)
    result = verify(built)
    assert result.returncode == 1, result.stdout + result.stderr
    assert failed(result.stdout) == must_fail, result.stdout
    for name in must_fail - {"count"}:
        assert named in checks(result.stdout)[name][1]
    assert f"verify: FAILED ({', '.join(n for n in checks(result.stdout) if n in must_fail)})" in result.stderr
    assert "fix: " in result.stderr and "doit -a build" in result.stderr
    if case == "metadata":
        return  # not repaired by a build: see test_the_printed_fix_repairs_a_metadata_mismatch

    repair = build(built)
    assert repair.returncode == 0, repair.stderr
    again = verify(built)
    assert again.returncode == 0, again.stdout + again.stderr


def test_the_printed_fix_repairs_a_metadata_mismatch(built):
    """A count-preserving corruption needs a re-embed; the advice says so and works."""
    tamper(built, "metadata")
    assert "--sync-mode delete-stale" in verify(built).stderr
    assert run_cli(["build", *HASH_BUILD, "--sync-mode", "delete-stale"], cwd=built).returncode == 0
    result = verify(built)
    assert result.returncode == 0, result.stdout


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
    assert "clean-wal --force" in result.stderr

    assert build(built).returncode == 0
    again = verify(built, "--fresh")
    assert again.returncode == 0, again.stdout


def test_verify_fails_after_a_killed_first_build(workdir):
    assert build(workdir, env=KILL_AT_3RD_COMMIT).returncode == -signal.SIGKILL
    result = verify(workdir)
    assert result.returncode == 1
    assert failed(result.stdout) == {"manifest"} and "no manifest at" in result.stdout


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


@pytest.mark.parametrize("case", [None, "orphan"], ids=["passing", "failing"])
def test_report_json_and_junit_list_every_check(built, case):
    must_fail = tamper(built, case)[0] if case else set()
    result = verify(built, "--fresh", "--report", "r.json", "--junit", "j.xml")
    assert result.returncode == (1 if must_fail else 0)
    names = [*ALL_CHECKS, "fresh"]

    report = json.loads((built / "r.json").read_text())
    assert report["ok"] is (not must_fail)
    assert [ch["name"] for ch in report["checks"]] == names
    assert {ch["name"] for ch in report["checks"] if ch["ok"] is False} == must_fail
    assert all(isinstance(ch["ok"], bool) and ch["detail"] for ch in report["checks"])
    assert bool(report["fix"]) is bool(must_fail)

    suite = ET.parse(built / "j.xml").getroot()
    assert suite.tag == "testsuite"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == names
    assert {c.get("name") for c in cases if c.find("failure") is not None} == must_fail
    assert (suite.get("tests"), suite.get("failures")) == (str(len(names)), str(len(must_fail)))
    if must_fail:
        (ids_case,) = [c for c in cases if c.get("name") == "ids"]
        assert "foreign:0" in ids_case.find("failure").get("message")
        assert "fix: run" in ids_case.find("failure").text
