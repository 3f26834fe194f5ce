"""A gate to trust in both directions (issue 14): `findable` passes healthy indexes that the old
self-hit rule failed and fails damaged ones; a poisoned cache entry is caught and its fix corrects
the cache; kept unreadable files are named as such; every printed fix, pasted into a shell, repairs
the index it was printed for; verify creates nothing."""
from __future__ import annotations

import glob
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import HASH_BUILD, run_cli, run_shell, summary
from test_verify import checks, failed, printed_fix

pytestmark = pytest.mark.timeout(240)

HNSW_LINKS = 4 + 32 * 4  # hnswlib level-0 block: link count + 2*M links (Chroma's max_neighbors M=16)


def stub_corpus(folder: Path, pages: int = 850, stubs: int = 250) -> None:
    """One-paragraph pages and many identical stubs: identical vectors trap HNSW's greedy search, so a
    healthy index does not return every row for its own vector. Over 1,000 rows: Chroma writes its graph."""
    import random
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for i in range(pages):
        (folder / f"page{i:04d}.md").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(30, 90))))
    for i in range(stubs):
        (folder / f"stub{i:04d}.md").write_text("This page is a stub. You can help by expanding it.\n")


@pytest.fixture(scope="module", params=["cosine", "l2", "ip"])
def stubs(request, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp(f"stubs-{request.param}")
    stub_corpus(root / "corpus")
    base = [*HASH_BUILD, "--hnsw-space", request.param]
    done = run_cli(["build", *base], cwd=root)
    assert done.returncode == 0, done.stderr
    assert glob.glob(str(root / ".chroma" / "*" / "data_level0.bin")), "Chroma wrote no HNSW graph"
    return root, base


def deep(root: Path, base: list[str]):
    return run_cli(["verify", *base, "--deep", "all"], cwd=root)


def test_findable_passes_a_healthy_index_with_many_identical_stubs(stubs):
    root, base = stubs
    result = deep(root, base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 vector(s) Chroma cannot search with" in checks(result.stdout)["findable"][1]


def damage_graph(root: Path, how: str) -> None:
    """Damage Chroma's HNSW segment file, as a bad copy or bit rot would; the rows stay as they were."""
    segment = Path(glob.glob(str(root / ".chroma" / "*" / "data_level0.bin"))[0])
    data = bytearray(segment.read_bytes())
    size = HNSW_LINKS + 4 * 32 + 8
    if how == "nan_vector":  # one element's vector: nothing is ever near it
        data[7 * size + HNSW_LINKS:7 * size + HNSW_LINKS + 128] = np.full(32, np.nan, dtype="<f4").tobytes()
    else:  # every element loses its level-0 neighbours: searches stop where they start
        for element in range(len(data) // size):
            data[element * size:element * size + 4] = bytes(4)
    segment.write_bytes(bytes(data))


@pytest.mark.parametrize("how, must_fail", [("nan_vector", {"vectors", "embedding", "findable"}),
                                            ("no_links", {"findable"})])
def test_findable_fails_a_damaged_graph_and_its_printed_fix_rebuilds_it(stubs, tmp_path, how, must_fail):
    root, base = stubs
    if "--hnsw-space" in base and base[-1] != "ip":
        pytest.skip("one space is enough for the damage; the three spaces are for false failures")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    damage_graph(copy, how)
    result = deep(copy, base)
    assert result.returncode == 1 and failed(result.stdout) == must_fail, result.stdout
    fix = printed_fix(result)
    assert fix.startswith("mv ") and "--on-missing-state=reset" in fix  # spelled out: a pyproject may say fail
    repaired = run_shell(fix, cwd=copy)
    assert repaired.returncode == 0, repaired.stderr
    assert summary(repaired.stdout)["chunks_embedded"] == ("1100" if "embedding" in must_fail else "0")
    again = deep(copy, base)
    assert again.returncode == 0, again.stdout


# ---- the embedding cache ------------------------------------------------------------------

def cache_rows(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / ".chroma-state" / "embed-cache.sqlite3", isolation_level=None)


def test_a_poisoned_cache_entry_is_caught_by_deep_and_its_fix_corrects_the_cache(workdir):
    assert run_cli(["build", *HASH_BUILD], cwd=workdir).returncode == 0
    with cache_rows(workdir) as db:  # a flipped sign bit: still a finite unit vector, so no lookup rejects it
        key, blob = db.execute("SELECT key, vector FROM vectors LIMIT 1").fetchone()
        vector = np.frombuffer(blob, dtype="<f4").copy()
        vector[0] = -vector[0]
        db.execute("UPDATE vectors SET vector = ? WHERE key = ?", (vector.tobytes(), key))
    shutil.rmtree(workdir / ".chroma")  # the next build fills the collection from the cache
    assert run_cli(["build", *HASH_BUILD], cwd=workdir).returncode == 0
    assert run_cli(["verify", *HASH_BUILD], cwd=workdir).returncode == 0  # only re-embedding can tell

    result = run_cli(["verify", *HASH_BUILD, "--deep", "all"], cwd=workdir)
    assert failed(result.stdout) == {"embedding"}, result.stdout
    fix = printed_fix(result)
    assert run_shell(fix, cwd=workdir).returncode == 0

    shutil.rmtree(workdir / ".chroma")  # the cache is right now: a rebuild from it is too
    rebuilt = run_cli(["build", *HASH_BUILD], cwd=workdir)
    assert rebuilt.returncode == 0 and summary(rebuilt.stdout)["chunks_embedded"] == "0"
    assert run_cli(["verify", *HASH_BUILD, "--deep", "all"], cwd=workdir).returncode == 0


def test_a_cache_row_of_another_dimension_is_a_miss_with_a_warn(workdir):
    assert run_cli(["build", *HASH_BUILD], cwd=workdir).returncode == 0
    with cache_rows(workdir) as db:  # self-consistent: 16 floats, dim 16, in a hash:32 cache
        db.execute("UPDATE vectors SET dim = 16, vector = ? WHERE rowid = (SELECT min(rowid) FROM vectors)",
                   (np.full(16, 0.25, dtype="<f4").tobytes(),))
    shutil.rmtree(workdir / ".chroma")
    rebuilt = run_cli(["build", *HASH_BUILD], cwd=workdir)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "key=embed_cache_wrong_dimension count=1 expected=32" in rebuilt.stderr
    assert summary(rebuilt.stdout)["chunks_embedded"] == "1"
    assert run_cli(["verify", *HASH_BUILD], cwd=workdir).returncode == 0


# ---- --fresh, printed fixes, a missing store -------------------------------------------------

def test_fresh_names_a_kept_unreadable_file_and_its_fix_works(workdir):
    assert run_cli(["build", *HASH_BUILD], cwd=workdir).returncode == 0
    (workdir / "corpus" / "doc0003.md").write_bytes(b"caf\xe9 latin-1 now\n")  # kept: skipped is not deleted
    result = run_cli(["verify", *HASH_BUILD, "--fresh"], cwd=workdir)
    assert failed(result.stdout) == {"fresh_unreadable"}, result.stdout
    assert "removed=[]" in checks(result.stdout)["fresh"][1]
    assert "['doc0003.md']" in checks(result.stdout)["fresh_unreadable"][1]
    fix = printed_fix(result)
    assert "--exclude=doc0003.md" in fix
    assert run_shell(fix, cwd=workdir).returncode == 0
    after = run_cli(["verify", *HASH_BUILD, "--fresh", "--exclude", "doc0003.md"], cwd=workdir)
    assert after.returncode == 0, after.stdout


def test_a_printed_fix_carries_root_db_state_root_and_collection_and_runs_from_elsewhere(tmp_path):
    from conftest import write_corpus
    project = tmp_path / "project"
    write_corpus(project / "docs", 6)
    (project / "pyproject.toml").write_text('[tool.chroma-resume]\ndocs = "docs"\nchunk-chars = 500\n')
    options = ["--root", str(project), "--db", "store/chroma db", "--state-root", "st", "--collection", "notes",
               "--embed-model", "hash:16", "--progress", "off"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run_cli(["build", *options, "--docs", "docs", "--chunk-chars", "500"], cwd=elsewhere).returncode == 0
    (project / "docs" / "doc0001.md").write_text("edited after the build\n")
    stale = run_cli(["verify", *options, "--docs", "docs", "--chunk-chars", "500", "--fresh"], cwd=elsewhere)
    fix = printed_fix(stale)
    assert f"--root={project}" in fix and "'--db=store/chroma db'" in fix and "--chunk-chars=500" in fix
    assert run_shell(fix, cwd=tmp_path).returncode == 0  # yet another folder: the fix names everything
    again = run_cli(["verify", *options, "--docs", "docs", "--chunk-chars", "500", "--fresh"], cwd=elsewhere)
    assert again.returncode == 0, again.stdout


def test_verify_and_resume_status_create_no_database(workdir):
    assert run_cli(["build", *HASH_BUILD], cwd=workdir).returncode == 0
    shutil.rmtree(workdir / ".chroma")
    result = run_cli(["verify", *HASH_BUILD], cwd=workdir)
    assert result.returncode == 1 and failed(result.stdout) == {"store"}, result.stdout
    assert "no Chroma database at" in checks(result.stdout)["store"][1]
    status = run_cli(["resume-status", *HASH_BUILD], cwd=workdir)
    assert status.returncode == 0 and not (workdir / ".chroma").exists()
    fix = printed_fix(result)
    assert run_shell(fix, cwd=workdir).returncode == 0
    assert run_cli(["verify", *HASH_BUILD], cwd=workdir).returncode == 0


def test_a_verify_that_forgets_a_schema_option_names_it(workdir):
    """Not 'no manifest' alone: the fix would rebuild the collection under the options given."""
    assert run_cli(["build", *HASH_BUILD, "--chunk-chars", "500"], cwd=workdir).returncode == 0
    forgot = run_cli(["verify", *HASH_BUILD], cwd=workdir)
    assert failed(forgot.stdout) == {"manifest"}
    detail = checks(forgot.stdout)["manifest"][1]
    assert "no manifest at" in detail and "with --chunk-chars 500 (given: 1200)" in detail
    assert "--upsert-batch" not in detail  # options that do not change the schema are not named
    assert run_cli(["verify", *HASH_BUILD, "--chunk-chars", "500"], cwd=workdir).returncode == 0


def test_an_emptied_corpus_is_named_and_its_fix_says_it_deletes_everything(workdir):
    assert run_cli(["build", *HASH_BUILD], cwd=workdir).returncode == 0
    shutil.rmtree(workdir / "corpus")
    (workdir / "corpus").mkdir()
    result = run_cli(["verify", *HASH_BUILD, "--fresh"], cwd=workdir)
    assert failed(result.stdout) == {"fresh"}
    assert "fix deletes all 12 indexed document(s)" in checks(result.stdout)["fresh"][1]
    fix = printed_fix(result)
    assert "--allow-empty=true" in fix
    assert run_shell(fix, cwd=workdir).returncode == 0
    after = run_cli(["verify", *HASH_BUILD, "--fresh"], cwd=workdir)
    assert after.returncode == 0, after.stdout
    assert summary(run_cli(["build", *HASH_BUILD], cwd=workdir).stdout)["docs_current"] == "0"
