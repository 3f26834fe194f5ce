"""A power cut can revert Chroma's index files to the previous build's fsynced copy while
chroma.sqlite3 moves on: every file reads, yet rows have no vector and the index holds deleted
ids. After an unclean end the build checks the store deeply and rebuilds it from the embedding
cache; verify and repair name it broken (never unreachable) in any state."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import HASH_BUILD, collection_rows, run_cli, summary, write_corpus

pytestmark = pytest.mark.timeout(300)
SIZES = (400, 900, 1500)  # words: 300 documents make ~1,500 chunks, past Chroma's sync_threshold of 1,000


FAST = [*HASH_BUILD, "--upsert-batch", "256"]  # fewer round trips: these builds write ~1,500 chunks each


def build(root: Path, *extra: str, env: dict | None = None):
    return run_cli(["build", *FAST, "--embed-log", "embedded.log", *extra], cwd=root, env=env)


def index_folders(db: Path) -> list[Path]:
    return sorted(p for p in db.iterdir() if p.is_dir())


def revert_index(root: Path, older: Path) -> int:
    """The cut: the index folders back at the copy taken after the previous build; sqlite stays."""
    reverted = 0
    for folder in index_folders(root / ".chroma"):
        if (older / folder.name).is_dir():
            shutil.rmtree(folder)
            shutil.copytree(older / folder.name, folder)
            reverted += 1
    return reverted


def edit(corpus: Path) -> None:
    """Build 2's changes: half the documents rewritten (new generations added, old ones deleted:
    ~1,500 records, so Chroma re-writes its index files), a few removed and added."""
    rng = random.Random(3)
    docs = sorted(corpus.iterdir())
    for path in docs[:150]:
        path.write_text(path.read_text(encoding="utf-8").replace("alpha", "omega") + " edited\n", encoding="utf-8")
    for path in docs[-5:]:
        path.unlink()
    write_corpus(corpus / "new", 5, seed=rng.randrange(1000), sizes=SIZES)


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """`before`: build 1 done and its index folders copied (`older`), corpus edited for build 2;
    `golden`: a clean build of the edited corpus."""
    base = tmp_path_factory.mktemp("deep")
    before = base / "before"
    write_corpus(before / "corpus", 300, seed=11, sizes=SIZES)
    first = build(before)
    assert first.returncode == 0, first.stderr
    older = base / "older"
    for folder in index_folders(before / ".chroma"):
        shutil.copytree(folder, older / folder.name)
    assert index_folders(older), "Chroma wrote no index files in build 1"
    edit(before / "corpus")
    golden = base / "golden"
    shutil.copytree(before / "corpus", golden / "corpus")
    assert build(golden).returncode == 0
    return {"before": before, "older": older, "golden": golden}


def copy_of(stages, tmp_path: Path) -> Path:
    return Path(shutil.copytree(stages["before"], tmp_path / "row"))


def test_rerun_after_a_cut_finds_the_stale_index_and_rebuilds_from_the_cache(stages, tmp_path):
    """Killed late in build 2 (its WAL unfinished), the index reverted: the rerun sets the store
    aside and rebuilds it with no model call, equal to a clean build."""
    root = copy_of(stages, tmp_path)
    killed = build(root, env={"CHROMA_RESUME_FAILPOINTS": "build.reconcile=kill"})
    assert killed.returncode == -9, killed.stderr
    assert revert_index(root, stages["older"])
    embedded = (root / "embedded.log").read_text().split()
    rerun = build(root)
    assert rerun.returncode == 0, rerun.stderr
    s = summary(rerun.stdout)
    assert s["store_set_aside"] and "key=store_set_aside" in rerun.stderr
    assert "rows without a vector" in rerun.stderr and "vectors of deleted rows" in rerun.stderr
    assert s["chunks_embedded"] == "0" and (root / "embedded.log").read_text().split() == embedded
    assert collection_rows(root / ".chroma", "test") == collection_rows(stages["golden"] / ".chroma", "test")
    assert run_cli(["verify", *FAST], cwd=root).returncode == 0


def test_sound_store_after_an_unclean_end_is_checked_and_kept(stages, tmp_path):
    """Killed after RUN_FINISH but before the manifest (a power cut there can revert the index
    too), no cut: the deep check runs and passes, nothing is set aside; a clean rerun after
    that does not pay for it."""
    root = copy_of(stages, tmp_path)
    assert build(root, env={"CHROMA_RESUME_FAILPOINTS": "manifest.before_replace=kill"}).returncode == -9
    rerun = build(root)
    assert rerun.returncode == 0, rerun.stderr
    assert "[STORE] checked deeply" in rerun.stdout and "the vector index agrees" in rerun.stdout
    assert summary(rerun.stdout)["store_set_aside"] == "" and not list(root.glob(".chroma.corrupt-*"))
    again = build(root)
    assert again.returncode == 0 and "[STORE] checked deeply" not in again.stdout


def test_verify_and_repair_name_a_stale_index_broken(stages, tmp_path):
    """The state the issue met: build 2 finished (no WAL to say anything went wrong), the index
    reverted. verify fails the store check at once (exit 1, no retries, never 'unreachable');
    repair says broken, rebuilds from the cache and verifies."""
    root = copy_of(stages, tmp_path)
    assert build(root).returncode == 0
    assert revert_index(root, stages["older"])
    status = run_cli(["resume-status", *FAST], cwd=root)
    assert status.returncode == 0 and "store_files_ok=true" in status.stdout  # every file reads...
    assert "store_index_ok=false" in status.stdout and "rows without a vector" in status.stdout  # ...yet
    verify = run_cli(["verify", *FAST], cwd=root, timeout=60)
    out = verify.stdout + verify.stderr
    assert verify.returncode == 1 and "[FAIL] store" in verify.stdout and "disagrees with its rows" in out
    assert "unreachable" not in out and "[WAIT]" not in out and "repair" in out
    repair = run_cli(["repair", *FAST], cwd=root)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "[REPAIR] store broken: set aside at" in repair.stdout and "chunks_embedded=0" in repair.stdout
    assert collection_rows(root / ".chroma", "test") == collection_rows(stages["golden"] / ".chroma", "test")
    assert "store_index_ok=true" in run_cli(["resume-status", *FAST], cwd=root).stdout
    sound = run_cli(["repair", *FAST], cwd=root)
    assert sound.returncode == 0 and "[REPAIR] store sound (checked deeply)" in sound.stdout


def test_index_agreement_over_a_random_history(tmp_path):
    """The model of Chroma's replay (index files + log past their max_seq_id vs rows) agrees with
    a healthy store after every step of a seeded mix of adds, upserts, updates and deletes that
    crosses the sync threshold, and names the ids once the index folder is reverted."""
    import chromadb

    from chroma_resume.store import index_disagreement

    rng, draw = random.Random(5), np.random.default_rng(5)
    root = tmp_path / "db"
    collection = chromadb.PersistentClient(path=str(root)).get_or_create_collection("hist", embedding_function=None)
    live: set[str] = set()
    saved = None
    for step in range(40):
        op = rng.choice(("add", "upsert", "upsert", "update", "delete"))
        if op in ("add", "upsert"):
            ids = [f"s{step}-{i}" for i in range(rng.randint(50, 150))]
            ids += rng.sample(sorted(live), min(len(live), 5 if op == "upsert" else 0))
            getattr(collection, op)(ids=ids, embeddings=draw.random((len(ids), 8)).astype("float32"))
            live |= set(ids)
        elif live:
            ids = rng.sample(sorted(live), min(len(live), rng.randint(5, 100)))
            if op == "update":
                collection.update(ids=ids, embeddings=draw.random((len(ids), 8)).astype("float32"))
            else:
                collection.delete(ids=ids)
                live -= set(ids)
        assert index_disagreement(str(root), str(collection.id)) == "", step
        if saved is None and index_folders(root):  # the first index files Chroma wrote
            segment = index_folders(root)[0]
            saved = Path(shutil.copytree(segment, tmp_path / "saved"))
    assert collection.count() == len(live) and saved is not None
    shutil.rmtree(segment)
    shutil.copytree(saved, segment)
    wrong = index_disagreement(str(root), str(collection.id))
    assert "rows without a vector" in wrong and str(segment) in wrong
