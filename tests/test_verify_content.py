"""`verify` proves the content, not only the ids: every stored field, the collection's fingerprint,
re-embedding and findability (`--deep`), and reports CI can rely on (DESIGN §6)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import HASH_BUILD, REPO, run_cli
from test_verify import built  # noqa: F401 (a fixture)
from test_verify import ALL_CHECKS, apply_fix, assert_fails_then_fix_repairs, build, checks, failed, tamper, verify

pytestmark = pytest.mark.timeout(180)

VECTOR = "col.get(ids=[VICTIM], include=['embeddings'])['embeddings'][0]"
TAMPERED_TEXT = ("import hashlib\n"
                 f"col.update(ids=[VICTIM], documents=['tampered text'], embeddings=[{VECTOR}]"
                 "{extra})")
OTHER_VECTOR = ("other = [i for i in col.get()['ids'] if i != VICTIM][0]\n"
                "col.update(ids=[VICTIM], embeddings=[col.get(ids=[other], include=['embeddings'])['embeddings'][0]])")
FINGERPRINT = ("meta = {{k: v for k, v in col.metadata.items() if k != 'hnsw:space'}}  # Chroma refuses to modify it\n"
               "meta['chroma_resume:{key}'] = {value!r}\ncol.modify(metadata=meta)")

# Damage to one chunk's fields or to the collection: (code, verify flags, checks that must fail, text named).
CONTENT = {
    "chunk_index": ("col.update(ids=[VICTIM], metadatas=[{'chunk_index': 7}])", (), {"metadata"},
                    "VICTIM: chunk_index=7 (expected 0)"),
    "source_type": ("col.update(ids=[VICTIM], metadatas=[{'source_type': 'pdf'}])", (), {"metadata"},
                    "VICTIM: source_type='pdf' (expected 'md')"),
    "extra_key": ("col.update(ids=[VICTIM], metadatas=[{'colour': 'red'}])", (), {"metadata"},
                  "VICTIM: colour='red' (expected None)"),
    "text": (TAMPERED_TEXT.format(extra=""), (), {"text"}, "VICTIM"),
    # text and its hash changed together: consistent in Chroma, but not what the corpus chunks to
    "text_and_its_hash": (TAMPERED_TEXT.format(
        extra=", metadatas=[{'text_sha256': hashlib.sha256(b'tampered text').hexdigest()}]"),
        ("--fresh",), {"fresh_chunks"}, "VICTIM"),
    "vector_not_unit": ("col.update(ids=[VICTIM], embeddings=[[0.5] * 32])", (), {"vectors"}, "VICTIM"),
    # a unit vector, only the wrong one: only re-embedding can tell
    "vector_of_another_chunk": (OTHER_VECTOR, ("--deep", "all"), {"embedding"}, "VICTIM"),
    "fingerprint_schema": (FINGERPRINT.format(key="schema_hash", value="not-this-schema"), (), {"fingerprint"},
                           "schema_hash='not-this-schema'"),
    "fingerprint_incarnation": (FINGERPRINT.format(key="incarnation", value="another"), (), {"fingerprint"},
                                "incarnation='another'"),
}


@pytest.mark.parametrize("case", list(CONTENT))
def test_tampered_content_fails_naming_check_and_id_and_the_printed_fix_repairs_it(built, case):
    code, flags, must_fail, named = CONTENT[case]
    assert_fails_then_fix_repairs(built, must_fail, tamper(built, code, named), *flags)


@pytest.mark.parametrize("scale", [0.1, 1.009])
def test_a_scaled_vector_in_ip_space_fails_vectors_and_is_still_findable(workdir, scale):
    """In ip space a scaled vector keeps its cosine, and a shrunk one is still its own best match (its
    dot product with itself is the largest), but its scores change: the vectors check fails it, even
    at 0.9 % too long, and findable does not (the damage findable catches: test_verify_gate)."""
    (workdir / "pyproject.toml").write_text('[tool.chroma-resume]\nhnsw-space = "ip"\n')
    assert build(workdir).returncode == 0
    victim = tamper(workdir, f"col.update(ids=[VICTIM], embeddings=[[x * {scale} for x in {VECTOR}]])", "VICTIM")
    assert_fails_then_fix_repairs(workdir, {"vectors"}, victim, "--deep", "all")


def test_user_metadata_is_checked_and_a_change_in_the_units_file_is_stale(tmp_path):
    """Units carry their own metadata: it is on every chunk, and changing it is a change (DESIGN §1)."""
    units = tmp_path / "units.jsonl"
    rows = [{"source_uri": f"u{i}", "text": f"unit {i} " * 60, "metadata": {"team": "a"}} for i in range(4)]
    units.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [a for a in HASH_BUILD if a not in ("--docs", "corpus")] + ["--units", "units.jsonl"]
    assert run_cli(["build", *base], cwd=tmp_path).returncode == 0
    assert run_cli(["verify", *base], cwd=tmp_path).returncode == 0

    rows[1]["metadata"] = {"team": "b"}
    units.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stale = run_cli(["verify", *base, "--fresh"], cwd=tmp_path)
    assert failed(stale.stdout) == {"fresh"} and "changed=['u1']" in stale.stdout
    apply_fix(tmp_path, stale, base=base)
    result = run_cli(["verify", *base, "--fresh"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- --deep -------------------------------------------------------------------------------

def deep_sample(root: Path, *flags: str) -> list[str]:
    result = verify(root, *flags, "--report", "r.json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((root / "r.json").read_text())
    shown = re.search(r"^\[DEEP\] .* ids=(.*)$", result.stdout, re.M).group(1)
    assert shown.split() == report["sample"]
    return report["sample"]


def test_deep_sample_is_seeded_and_reported(built):
    manifest = json.loads(next((built / ".chroma-state").rglob("index_state.json")).read_text())
    ids = {f"{e['doc_id']}:{e['content_sha256'][:12]}:{i}" for e in manifest["documents"].values()
           for i in range(e["n_chunks"])}
    first = deep_sample(built, "--deep", "5", "--seed", "3")
    assert len(first) == 5 and set(first) <= ids
    assert deep_sample(built, "--deep", "5", "--seed", "3") == first
    assert deep_sample(built, "--deep", "5", "--seed", "4") != first


def test_deep_all_audits_every_chunk_with_progress_on_stderr(built):
    result = verify(built, "--deep", "all", "--progress", "on", "--report", "r.json")
    assert result.returncode == 0, result.stdout + result.stderr
    total = int(re.search(r"collection has (\d+) chunks", result.stdout).group(1))
    assert f"[DEEP] {total}/{total} chunks, re-embedded and looked up" in result.stderr
    assert checks(result.stdout)["findable"][1].startswith(f"all {total} chunks: recall@10 against exact search 1.0000 "
                                                           f"over {total} rows")
    assert len(json.loads((built / "r.json").read_text())["sample"]) == total


def test_exact_duplicate_texts_are_findable_as_ties(tmp_path):
    """More copies than the neighbours asked for: any hit at distance 0 with the same text counts."""
    (tmp_path / "corpus").mkdir()
    for i in range(14):
        (tmp_path / "corpus" / f"copy{i:02d}.md").write_text("the same short note in every file.\n")
    (tmp_path / "corpus" / "other.md").write_text("something else entirely.\n")
    assert build(tmp_path).returncode == 0
    result = verify(tmp_path, "--deep", "all")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("flags, named", [(("--deep", "0"), "--deep '0'"), (("--seed", "1"), "--seed"),
                                          (("--deep", "3", "--tolerance", "2"), "--tolerance 2.0")])
def test_bad_deep_options_are_usage_errors(built, flags, named):
    result = verify(built, *flags)
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr


# ---- reports ------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [None, "orphan"], ids=["passing", "failing"])
def test_report_json_and_junit_have_one_case_per_check(built, damage):
    if damage:
        tamper(built, "col.add(ids=['foreign:0'], embeddings=[[0.5] * 32], documents=['not ours'])")
    must_fail = {"count", "ids"} if damage else set()
    result = verify(built, "--fresh", "--deep", "4", "--report", "r.json", "--junit", "j.xml")
    assert result.returncode == (1 if must_fail else 0)
    names = [*ALL_CHECKS, "fresh", "fresh_chunks", "embedding", "findable"]

    report = json.loads((built / "r.json").read_text())
    assert report["ok"] is (not must_fail)
    assert [ch["name"] for ch in report["checks"]] == names
    assert {ch["name"] for ch in report["checks"] if ch["ok"] is False} == must_fail
    assert all(isinstance(ch["ok"], bool) and ch["detail"] for ch in report["checks"])
    assert {ch["name"] for ch in report["checks"] if ch["fix"]} == must_fail
    assert bool(report["fix"]) is bool(must_fail)
    assert report["deep"] == {"size": 4, "seed": 0, "tolerance": 0.999} and len(report["sample"]) == 4

    suite = ET.parse(built / "j.xml").getroot()
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == names
    assert {c.get("name") for c in cases if c.find("failure") is not None} == must_fail
    assert (suite.get("tests"), suite.get("failures")) == (str(len(names)), str(len(must_fail)))
    if must_fail:
        (ids_case,) = [c for c in cases if c.get("name") == "ids"]
        assert "foreign:0" in ids_case.find("failure").get("message")
        assert "fix: chroma-resume build --root=" in ids_case.find("failure").text
        assert "--strict-sync=true" in ids_case.find("failure").text


def test_reports_create_their_folders(built):
    result = verify(built, "--report", "out/a/b/verify.json", "--junit", "out/x/verify.xml")
    assert result.returncode == 0, result.stderr
    assert json.loads((built / "out/a/b/verify.json").read_text())["ok"] is True
    assert ET.parse(built / "out/x/verify.xml").getroot().get("failures") == "0"


@pytest.mark.parametrize("option", ["--report", "--junit"])
def test_an_unwritable_report_path_is_exit_2_naming_it_before_any_check(built, option):
    (built / "blocker").write_text("a file where a folder should be\n")
    result = verify(built, option, "blocker/out.file")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "blocker/out.file" in result.stderr and "Traceback" not in result.stderr
    assert not checks(result.stdout)


# ---- the README's CI lines, on a fresh copy of the sample setup (the packaged model) ------------

def readme_ci_lines() -> list[str]:
    """The `- run: doit …` lines of the README's GitHub Actions job, comments dropped (run with .venv/bin first)."""
    text = (REPO / "README.md").read_text()
    return [line.split("- run: ", 1)[1].split("#", 1)[0].strip()
            for line in text.splitlines() if line.strip().startswith("- run: doit")]


@pytest.fixture(scope="module")
def sample_project(tmp_path_factory) -> Path:
    """pyproject.toml, dodo.py and examples/corpus copied as a fresh checkout has them; .venv is this one."""
    root = tmp_path_factory.mktemp("sample")
    for name in ("pyproject.toml", "dodo.py"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "examples" / "corpus", root / "examples" / "corpus")
    (root / ".venv").symlink_to(REPO / ".venv")
    return root


def sh(root: Path, line: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    return subprocess.run(["bash", "-c", line], cwd=root, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_the_readme_ci_lines_pass_as_written(sample_project):
    lines = readme_ci_lines()
    assert lines == ["doit -n 2 build",
                     "doit --continue verify --fresh --junit reports/verify.xml --report reports/verify.json"]
    for line in lines:
        done = sh(sample_project, f"PATH=.venv/bin:$PATH {line}")
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    report = json.loads((sample_project / "reports" / "verify.json").read_text())
    checks = report["indexes"]["default"]["checks"]  # one index: the sample's [tool.chroma-resume] table
    assert report["ok"] is True and {ch["name"] for ch in checks} >= {"fresh", "fresh_chunks", "text"}
    assert ET.parse(sample_project / "reports" / "verify.xml").getroot().get("failures") == "0"


@pytest.mark.timeout(600)
def test_deep_64_on_the_sample_corpus_takes_seconds(sample_project):
    if not (sample_project / ".chroma").exists():
        assert sh(sample_project, ".venv/bin/doit build").returncode == 0
    started = time.monotonic()
    done = sh(sample_project, ".venv/bin/chroma-resume verify --deep 64")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert checks(done.stdout)["embedding"][0] and checks(done.stdout)["findable"][0]
    assert "64 sampled (seed 0)" in done.stdout
    assert took < 90, f"verify --deep 64 took {took:.1f}s"
